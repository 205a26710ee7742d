"""A chat session with the brain-language model about one fMRI recording (``python -m nvl_jax.chat``).

The recording's brain tokens stand in for the image in the first user turn; every later turn
sees the whole dialogue. ``Locating the concept of "X"`` is answered with the concept's map on the
subject's voxels (``nvl_jax.localization``), not by the LLM.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
import re

import numpy as np

from nvl_jax.data import pipeline
from nvl_jax.evaluation import brain_captions
from nvl_jax.language import conversation as conversation_lib
from nvl_jax.training import loop

CONCEPT = re.compile(r'\s*Locating the concept of "([^"]+)"\s*\.?')


def recording(dataset, subject: str, *, stimulus: int | None = None, trial: int | None = None):
    """``(betas float32 [max_voxels], subject index)`` of one stimulus (repeats averaged) or one trial."""
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
    task, model, _ = loop.restore_model(workdir)
    if task.config.task != "stage2":
        raise ValueError(f"{workdir}: a {task.config.task!r} run; chat needs a stage-2 (brain-language) run")
    betas, index = recording(task.dataset, subject, stimulus=stimulus, trial=trial)
    dialogue = []
    for message in messages:
        concept = CONCEPT.fullmatch(message)
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
    """The concept's map from the stage-1 run the brain-language model reads, written under ``out``."""
    from nvl_jax.localization import figures, localize_concept

    result = localize_concept([task.stage1_workdir], subject, concept,
                              stimuli="test" if stimulus is None else str(stimulus))
    written = figures.write_outputs(result, Path(out))
    return f'The concept "{concept}" on {subject}\'s voxels: ' + ", ".join(str(p) for p in written)
