"""Evaluates a training run from its folder alone: ``python -m nvl_jax.evaluate --workdir=RUN``.

Reads the run's resolved config (``RUN/config.json``) and its newest checkpoint (or ``--step``),
runs the task's evaluation (stage 1: the test split in multi-trial and single-trial mode into
``RUN/eval.json``) and prints the headline figures.
"""

from __future__ import annotations

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's folder (python -m nvl_jax.train --workdir)",
                               required=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step to evaluate (default: the newest)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; the progress bar says enough
        logging.set_verbosity(logging.WARNING)
    from nvl_jax.training import loop

    loop.evaluate_run(_WORKDIR.value, _STEP.value)


if __name__ == "__main__":
    app.run(main)
