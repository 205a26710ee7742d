"""Captions from brain tokens: ``python -m nvl_jax.caption --workdir=RUN --split test --out FILE.jsonl``.

RUN is a stage-2 run folder (``python -m nvl_jax.train --config=configs/demo_language.py``); its
config names the stage-1 run, the dataset and the LLM. For every stimulus of the split, multi-trial
(repeats averaged) and single-trial (first presentation), per subject, the model answers the task's
instruction greedily. Each line of the output: ``{"stimulus", "subject", "mode", "task", "caption"}``.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "a stage-2 (brain-language) run folder", required=True)
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "train"], "which stimuli")
_TASK = flags.DEFINE_enum("task", "brief", ["brief", "detailed", "reasoning"],
                          "brief / detailed description, or each stimulus's reasoning question")
_OUT = flags.DEFINE_string("out", None, "output JSON-lines file (default: RUN/captions_<split>_<task>.jsonl)")
_LIMIT = flags.DEFINE_integer("limit", None, "caption only the first N records of each mode")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "default: the run's eval.max_new_tokens")


def caption_run(workdir: str | Path, *, split: str = "test", task_kind: str = "brief", out: str | Path | None = None,
                limit: int | None = None, max_new_tokens: int | None = None) -> Path:
    """Writes the captions of ``workdir``'s newest checkpoint; returns the output path."""
    from nvl_jax.data import pipeline
    from nvl_jax.evaluation import brain_captions
    from nvl_jax.training import loop

    task, model, step = loop.restore_model(workdir)
    if task.config.task != "stage2":
        raise ValueError(f"{workdir}: a {task.config.task!r} run; captions need a stage-2 (brain-language) run")
    out = Path(out) if out else Path(workdir) / f"captions_{split}_{task_kind}.jsonl"
    rows = [row for mode in pipeline.TEST_MODES
            for row in brain_captions.generate(task, model, mode, task_kind, split=split, limit=limit,
                                               max_new_tokens=max_new_tokens)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"step {step}: {len(rows)} captions -> {out}")
    return out


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    caption_run(_WORKDIR.value, split=_SPLIT.value, task_kind=_TASK.value, out=_OUT.value, limit=_LIMIT.value,
                max_new_tokens=_MAX_NEW_TOKENS.value)


if __name__ == "__main__":
    app.run(main)
