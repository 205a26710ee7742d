"""Stage-1 training: ``python -m nvl_jax.train --config=configs/nsd.py --workdir=DIR``.

Restarting the same command resumes from the newest checkpoint in DIR, on the
exact next batch. Without flags it runs ``configs/demo.py`` (in-silico NSD,
generated on first use) into ``runs/demo``. Override any config field with
``--config.FIELD=VALUE`` (e.g. ``--config.data.root=/data/nsd_prepared``);
unknown fields are an error.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from nvl_jax import runtime
from nvl_jax.training.experiment import DEFAULT_CONFIG, default_workdir

_CONFIG = config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and eval.json go "
                               "(default: runs/<config name>)")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first (TPU pods, SLURM)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
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
