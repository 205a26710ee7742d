"""Training of any task: ``python -m nvl_jax.train --config=configs/nsd.py --workdir=DIR``.

The config's ``task`` field picks what trains (``nvl_jax/training/tasks/``: ``stage1`` for the
ViT3D extractor). Restarting the same command resumes from the newest checkpoint in DIR, on the
exact next batch; a resume whose config changes shapes, data or the task is refused. Without
flags it runs ``configs/demo.py`` (in-silico NSD, generated on first use) into ``runs/demo``.

Override any config field with ``--config.FIELD=VALUE`` (e.g. ``--config.data.root=/data/nsd``);
unknown fields are an error. Pick a variant with ``--config=configs/nsd.py:patch=12``. List a
config's fields with ``--print_config``.

Multi-process jobs: ``--multihost`` lets ``jax.distributed.initialize`` find the coordinator,
process count and id itself (Cloud TPU, SLURM, Open MPI); ``--coordinator=HOST:PORT
--num_processes=N --process_id=I`` name them where nothing can (several processes on one
machine: ``bash launch/local_multiprocess.sh N -- ARGS...``). Every process runs the same
command; each reads its share of the data, and all write one checkpoint into the shared DIR.
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
_MULTIHOST = flags.DEFINE_bool("multihost", False, "join a multi-process job whose coordinator, process count and "
                                "id jax.distributed.initialize() detects (Cloud TPU pods, SLURM, Open MPI)")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0's coordination service; with "
                                   "--num_processes and --process_id, joins a multi-process job without a cluster "
                                   "manager (launch/local_multiprocess.sh)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job (with --coordinator)", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's id, 0 .. num_processes - 1 (with --coordinator)",
                                   lower_bound=0)
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

    explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if any(v is not None for v in explicit):
        if None in explicit:
            raise app.UsageError("--coordinator, --num_processes and --process_id go together; got "
                                 f"{dict(zip(('coordinator', 'num_processes', 'process_id'), explicit))}")
        if _PROCESS_ID.value >= _NUM_PROCESSES.value:
            raise app.UsageError(f"--process_id={_PROCESS_ID.value} must be below "
                                 f"--num_processes={_NUM_PROCESSES.value}")
    if _MULTIHOST.value or _COORDINATOR.value:
        # CPU devices of different processes reduce through gloo; without it a CPU job has no
        # cross-process collectives. Accelerator backends do not read this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(*explicit)
    from nvl_jax.training import loop

    loop.train(_CONFIG.value, _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename))
    if jax.process_count() > 1:
        # Leave the job together: process 0 hosts the coordination service, and a process still
        # connected when it goes away is aborted by its client.
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("nvl_jax.train finished")
        jax.distributed.shutdown()


if __name__ == "__main__":
    app.run(main)
