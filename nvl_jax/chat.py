"""Chat with the brain-language model about one fMRI recording:
``python -m nvl_jax.chat --workdir=RUN --subject subj01 --stimulus ID`` (or ``--trial N``).

RUN is a stage-2 run folder. ``--stimulus`` uses the subject's repeats of that stimulus averaged
(multi-trial); ``--trial`` one trial, by its index in the subject's trial list (single-trial). The
recording's brain tokens stand in for the image in the first turn; every later turn sees the whole
dialogue. Type a message after ``you>``; an empty line or end of input ends the chat. ``--message``
(repeatable) sends messages without a terminal. ``Locating the concept of "X"`` answers with the
concept's map on the subject's voxels, written as NIfTI and PNG under ``--out``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "a stage-2 (brain-language) run folder", required=True)
_SUBJECT = flags.DEFINE_string("subject", "subj01", "the subject whose recording is shown")
_STIMULUS = flags.DEFINE_integer("stimulus", None, "stimulus id: the subject's repeats of it, averaged")
_TRIAL = flags.DEFINE_integer("trial", None, "one trial, by its index in the subject's trials")
_MESSAGE = flags.DEFINE_multi_string("message", None, "messages to send in order, instead of reading the terminal")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "longest answer, in tokens")
_OUT = flags.DEFINE_string("out", "chat_maps", "where concept maps go")


def recording(dataset, subject: str, *, stimulus: int | None = None, trial: int | None = None):
    """``(betas float32 [max_voxels], subject index)`` of one stimulus (repeats averaged) or one trial."""
    import numpy as np

    from nvl_jax.data import pipeline

    if (stimulus is None) == (trial is None):
        raise ValueError("give exactly one of --stimulus and --trial")
    if subject not in dataset.subjects:
        raise ValueError(f"--subject {subject!r}: not in {dataset.root} (subjects: {', '.join(dataset.subjects)})")
    index, trials = list(dataset.subjects).index(subject), dataset.subjects[subject].trials
    if stimulus is not None:
        chosen = np.flatnonzero(trials.stimulus == stimulus)
        if not chosen.size:
            raise ValueError(f"--stimulus {stimulus}: {subject} never saw it")
    else:
        if not 0 <= trial < len(trials.stimulus):
            raise ValueError(f"--trial {trial}: {subject} has trials 0..{len(trials.stimulus) - 1}")
        chosen = np.array([trial])
    records = pipeline.Records(np.array([index], np.int32), np.array([trials.stimulus[chosen[0]]], np.int32),
                               chosen[None].astype(np.int32), np.full((1, 1), -1, np.int32))
    source = pipeline.RecordSource(dataset.root, records, max(s.n_voxels for s in dataset.subjects.values()))
    return source[0]["betas"], index


def chat(workdir: str | Path, subject: str, messages: Iterable[str], *, stimulus: int | None = None,
         trial: int | None = None, max_new_tokens: int = 128, out: str | Path = "chat_maps") -> Iterator[str]:
    """Answers each message in turn (a generator of answers), the dialogue carrying one recording."""
    import re

    import numpy as np

    from nvl_jax.evaluation import brain_captions
    from nvl_jax.language import conversation as conversation_lib
    from nvl_jax.training import loop

    task, model, _ = loop.restore_model(workdir)
    if task.config.task != "stage2":
        raise ValueError(f"{workdir}: a {task.config.task!r} run; chat needs a stage-2 (brain-language) run")
    betas, index = recording(task.dataset, subject, stimulus=stimulus, trial=trial)
    dialogue = []
    for message in messages:
        concept = re.fullmatch(r'\s*Locating the concept of "([^"]+)"\s*\.?', message)
        if concept:
            yield _localize(task, subject, concept.group(1), stimulus, out)
            continue
        content = ("<image>\n" if not dialogue else "") + message
        dialogue.append({"role": "user", "content": content})
        prompt = conversation_lib.tokenize_conversation(dialogue, task.config.conversation.format, task.tokenizer,
                                                        max_length=task.config.data.max_length * 4)
        (reply,) = brain_captions.answer(task, model, betas[None], np.array([index], np.int32), [prompt],
                                         max_new_tokens)
        dialogue.append({"role": "assistant", "content": reply})
        yield reply


def _localize(task, subject: str, concept: str, stimulus: int | None, out) -> str:
    from nvl_jax.localization import localize_concept

    written = localize_concept([task.stage1_workdir], subject, concept,
                               stimuli="test" if stimulus is None else [stimulus], out=Path(out))
    return f'The concept "{concept}" on {subject}\'s voxels: ' + ", ".join(str(p) for p in written)


def _terminal() -> Iterator[str]:
    while True:
        try:
            line = input("you> ")
        except EOFError:
            return
        if not line.strip():
            return
        yield line


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    messages = _MESSAGE.value if _MESSAGE.value else _terminal()
    for reply in chat(_WORKDIR.value, _SUBJECT.value, messages, stimulus=_STIMULUS.value, trial=_TRIAL.value,
                      max_new_tokens=_MAX_NEW_TOKENS.value, out=_OUT.value):
        print(f"model> {reply}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
