"""Captions from brain tokens: ``python -m nvl_jax.caption --workdir=RUN --split test --out FILE.jsonl``.

RUN is a stage-2 run folder (``python -m nvl_jax.train --config=configs/demo_language.py``); its
config names the stage-1 run, the dataset and the LLM. For every stimulus of the split, multi-trial
(repeats averaged) and single-trial (first presentation), per subject, the model answers the task's
instruction greedily. Each line of the output: ``{"stimulus", "subject", "mode", "task", "caption"}``.
"""

from __future__ import annotations

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "a stage-2 (brain-language) run folder", required=True)
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "train"], "which stimuli")
_TASK = flags.DEFINE_enum("task", "brief", ["brief", "detailed", "reasoning"],
                          "brief / detailed description, or each stimulus's reasoning question")
_OUT = flags.DEFINE_string("out", None, "output JSON-lines file (default: RUN/captions_<split>_<task>.jsonl)")
_LIMIT = flags.DEFINE_integer("limit", None, "caption only the first N records of each mode")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "default: the run's eval.max_new_tokens")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from nvl_jax.evaluation import brain_captions

    brain_captions.caption_run(_WORKDIR.value, split=_SPLIT.value, task_kind=_TASK.value, out=_OUT.value, limit=_LIMIT.value,
                max_new_tokens=_MAX_NEW_TOKENS.value)


if __name__ == "__main__":
    app.run(main)
