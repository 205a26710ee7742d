"""Training of any task: ``python -m nvl_jax.train --config=configs/nsd.py --workdir=DIR``.

The config's ``task`` field picks what trains (``nvl_jax/training/tasks/``: ``stage1`` for the
ViT3D extractor). Restarting the same command resumes from the newest checkpoint in DIR, on the
exact next batch; a resume whose config changes shapes, data or the task is refused. Without
flags it runs ``configs/demo.py`` (in-silico NSD, generated on first use) into ``runs/demo``.

Override any config field with ``--config.FIELD=VALUE`` (e.g. ``--config.data.root=/data/nsd``);
unknown fields are an error. Pick a variant with ``--config=configs/nsd.py:patch=12``. List a
config's fields with ``--print_config``.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from nvl_jax import runtime
from nvl_jax.training.experiment import DEFAULT_CONFIG, default_workdir

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(DEFAULT_CONFIG), "ml_collections config file, with an optional variant (configs/nsd.py:patch=12); "
    "--print_config lists its fields, each settable as --config.FIELD=VALUE", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and eval.json go "
                               "(default: runs/<config name>[-<variant>])")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first (TPU pods, SLURM)")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "print the config's fields and values, then exit")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _PRINT_CONFIG.value:
        print(_CONFIG.value)
        return
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; the progress bar says enough
        logging.set_verbosity(logging.WARNING)
    runtime.keep_freed_memory()  # before JAX's first thread: see nvl_jax/runtime.py
    import jax

    if _MULTIHOST.value:
        jax.distributed.initialize()
    from nvl_jax.training import loop

    loop.train(_CONFIG.value, _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename))


if __name__ == "__main__":
    app.run(main)
