"""Evaluates a stage-1 run: ``python -m nvl_jax.evaluate --config=configs/nsd.py --workdir=DIR``.

Loads the newest checkpoint in DIR (or ``--step``), runs the test split in
multi-trial and single-trial mode, writes ``DIR/eval.json`` and prints it.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from nvl_jax.training.experiment import DEFAULT_CONFIG, default_workdir

_CONFIG = config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's folder (default: runs/<config name>)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step to evaluate (default: the newest)")


def evaluate_run(config, workdir: str | Path, step: int | None = None) -> dict:
    from nvl_jax.training import experiment as experiment_lib
    from nvl_jax.training import loop, optim, state as state_lib
    from nvl_jax.training.checkpointing import Checkpointer

    workdir = Path(workdir)
    checkpointer = Checkpointer(workdir)
    step = step or checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"{checkpointer.directory}: no checkpoint to evaluate; train first with "
                                f"python -m nvl_jax.train --workdir={workdir}")
    experiment = experiment_lib.build(config)
    tx = optim.make_optimizer(config.optimizer, loop.total_steps(config, experiment.dataset))
    layout = state_lib.plan(loop.model_builder(experiment), tx, experiment.mesh, experiment.rules)
    params, _ = checkpointer.restore_params(step, layout)
    results = loop.evaluate(experiment, layout, params, workdir)
    checkpointer.close()
    return results


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; the progress bar says enough
        logging.set_verbosity(logging.WARNING)
    evaluate_run(_CONFIG.value, _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename), _STEP.value)


if __name__ == "__main__":
    app.run(main)
