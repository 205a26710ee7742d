"""Captions from brain tokens for every test stimulus, and the field's caption metrics on them.

For each test mode (multi-trial: the subject's repeats averaged; single-trial: the first
presentation) and each subject, the brain-language model answers the brief-description
instruction from the trial's brain tokens. Two baselines run beside it:

- ``shuffled``: the same model fed the brain tokens of another test stimulus of the same subject
  (a seeded derangement), which measures what the LLM writes without the right brain signal;
- ``prior``: the most common training caption, written for every stimulus.

Each entry holds ``evaluation.captions.score``'s metrics against the stimulus's reference captions,
pooled over subjects, and ``object_f1``, the F1 of the (colour, shape) pairs a caption names
against the scene graph, where the dataset's objects carry colours (the in-silico NSD).
"""

from __future__ import annotations

from collections import Counter
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from nvl_jax.data import instruction_templates, language_pipeline, pipeline
from nvl_jax.evaluation import captions as caption_metrics
from nvl_jax.evaluation.object_f1 import object_f1
from nvl_jax.language import conversation as conversation_lib

# The instruction each caption task asks; "reasoning" asks each stimulus's own reasoning question.
TASK_INSTRUCTIONS = {"brief": instruction_templates.BRIEF_INSTRUCTIONS[0],
                     "detailed": instruction_templates.DETAILED_INSTRUCTIONS[0]}
TASKS = ("brief", "detailed", "reasoning")


def _prompts(task, kind: str, stimuli: np.ndarray) -> dict[int, conversation_lib.TokenizedConversation]:
    """Per stimulus, the tokenized generation prompt of ``kind`` (reasoning: the stimulus's own question)."""
    reasoning = {}
    if kind == "reasoning":
        for r in task.dataset.instructions():
            if r["kind"] == "reasoning":
                reasoning.setdefault(r["stimulus"], r["conversation"][0])
    prompts = {}
    for s in np.unique(stimuli):
        if kind == "reasoning":
            if int(s) not in reasoning:
                raise ValueError(f"stimulus {int(s)} has no reasoning conversation in the instruction data")
            question = reasoning[int(s)]
        else:
            question = {"role": "user", "content": f"<image>\n{TASK_INSTRUCTIONS[kind]}"}
        prompts[int(s)] = conversation_lib.tokenize_conversation(
            [question], task.config.conversation.format, task.tokenizer, max_length=task.config.data.max_length)
    return prompts


def _merged_inputs(model, prep, betas, subject, input_ids, attention_mask):
    patches = prep.patches({"betas": betas, "subject": subject})
    return model.merged_inputs(patches, prep.active, input_ids, attention_mask)[:2]


_merge = nnx.jit(_merged_inputs)


def answer(task, model, betas: np.ndarray, subject: np.ndarray, prompts: list, max_new_tokens: int) -> list[str]:
    """Greedy answers to tokenized generation ``prompts`` (one per row), each from its row's brain tokens.

    betas ``float32 [batch, max_voxels]``, subject ``int32 [batch]``; ``prompts``: tokenized
    conversations ending with a user turn (``language.conversation.tokenize_conversation``).
    """
    pad = language_pipeline.pad_id(task.tokenizer)
    eos = tuple(sorted({*task.model_config.llm.eos_token_ids,
                        *([task.tokenizer.eos_token_id] if task.tokenizer.eos_token_id is not None else [])}))
    batch = conversation_lib.collate(prompts, pad_id=pad, length=max(len(p.input_ids) for p in prompts),
                                     padding_side="left", require_labels=False)
    embeds, mask = _merge(model, task.stage1.prep, jnp.asarray(betas), jnp.asarray(subject),
                          jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
    generated = model.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   eos_token_id=eos, pad_token_id=pad)
    sequences, lengths = np.asarray(generated.sequences), np.asarray(generated.lengths)
    return [task.tokenizer.decode([t for t in sequences[k, :lengths[k]] if t not in eos],
                                  skip_special_tokens=True).strip() for k in range(len(prompts))]


def generate(task, model, mode: str, kind: str = "brief", *, split: str = "test", shuffled: bool = False,
             max_new_tokens: int | None = None, limit: int | None = None) -> list[dict]:
    """Greedy answers for every record of ``split`` in ``mode``: ``[{stimulus, subject, mode, task, caption}]``.

    ``shuffled`` feeds each record the betas of another stimulus of the same subject; ``limit`` keeps
    the first records only.
    """
    config, dataset = task.config, task.dataset
    records = pipeline.build_records(dataset, split, mode)
    if limit:
        records = pipeline.Records(*(getattr(records, f)[:limit] for f in ("subject", "stimulus", "trials",
                                                                          "partners")))
    source = pipeline.RecordSource(dataset.root, records, max(s.n_voxels for s in dataset.subjects.values()))
    donors = np.arange(len(records))
    if shuffled:
        rng = np.random.default_rng(config.seed)
        for s in np.unique(records.subject):
            rows = np.flatnonzero(records.subject == s)
            donors[rows] = rows[np.roll(rng.permutation(len(rows)), 1)] if len(rows) > 1 else rows
    prompts = _prompts(task, kind, records.stimulus)
    batch_size, names = config.eval.batch_size, list(dataset.subjects)
    out = []
    for start in tqdm(range(0, len(records), batch_size), desc=f"captions {mode}{' shuffled' if shuffled else ''}",
                      unit="batch", leave=False, disable=jax.process_index() != 0):
        rows = np.arange(start, min(start + batch_size, len(records)))
        # A fixed batch shape (the last batch repeats its final row), so one program serves every batch.
        padded = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
        elements = [source[int(donors[i])] for i in padded]
        captions = answer(task, model, np.stack([e["betas"] for e in elements]),
                          np.stack([e["subject"] for e in elements]),
                          [prompts[int(records.stimulus[i])] for i in padded],
                          max_new_tokens or config.eval.max_new_tokens)
        out += [{"stimulus": int(records.stimulus[i]), "subject": names[records.subject[i]], "mode": mode,
                 "task": kind, "caption": captions[k]} for k, i in enumerate(rows)]
    return out


def prior_caption(dataset) -> str:
    """The most common caption among the training stimuli (the first of the most common on ties)."""
    counts = Counter(c for s in dataset.split["train"] for c in dataset.captions()[int(s)])
    return counts.most_common(1)[0][0]


def _scene_objects(dataset) -> list[list[tuple[str, str]]] | None:
    """Each stimulus's (colour, shape) objects, or None when the dataset's objects have no colours."""
    from nvl_jax.data import instructions

    objects = instructions.stimulus_objects(dataset)
    if any(o.colour is None for scene in objects for o in scene):
        return None
    return [[(o.colour, o.name) for o in scene] for scene in objects]


def metrics(dataset, rows: list[dict], scene_objects) -> dict[str, float]:
    """Caption metrics of ``rows`` against their stimuli's captions, plus object_f1 where defined."""
    candidates = {f"{r['subject']}/{r['stimulus']}": r["caption"] for r in rows}
    references = {f"{r['subject']}/{r['stimulus']}": list(dataset.captions()[r["stimulus"]]) for r in rows}
    result = caption_metrics.score(candidates, references)
    if scene_objects is not None:
        result["object_f1"] = float(np.mean([object_f1(r["caption"], scene_objects[r["stimulus"]]) for r in rows]))
    return result


def evaluate(task, model, workdir: Path) -> dict:
    """``{mode: {"brain": {...}, "shuffled": {...}, "prior": {...}}}`` for both test modes, written to
    ``workdir/eval_captions.json``; the brain captions go to ``workdir/captions_test_brief.jsonl``.

    Every process of a job generates (the model's arrays span them all); process 0 alone scores, so
    pycocoevalcap's Java runs once per job, not once per host, and the others read its results.
    """
    limit = task.config.eval.limit or None
    captions = {mode: (generate(task, model, mode, limit=limit),
                       generate(task, model, mode, shuffled=True, limit=limit)) for mode in pipeline.TEST_MODES}
    path = workdir / "eval_captions.json"
    if jax.process_index() == 0:
        dataset = task.dataset
        scene_objects, prior = _scene_objects(dataset), prior_caption(dataset)
        results = {mode: {"brain": metrics(dataset, brain, scene_objects),
                          "shuffled": metrics(dataset, shuffled, scene_objects),
                          "prior": metrics(dataset, [{**r, "caption": prior} for r in brain], scene_objects)}
                   for mode, (brain, shuffled) in captions.items()}
        with open(workdir / "captions_test_brief.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for brain, _ in captions.values() for row in brain)
        path.write_text(json.dumps(results, indent=2))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("eval_captions.json written")
    return json.loads(path.read_text())


def caption_run(workdir: str | Path, *, split: str = "test", task_kind: str = "brief", out: str | Path | None = None,
                limit: int | None = None, max_new_tokens: int | None = None) -> Path:
    """Writes the captions of ``workdir``'s newest checkpoint; returns the output path."""
    from nvl_jax.training import loop

    task, model, step = loop.restore_model(workdir)
    if task.config.task != "stage2":
        raise ValueError(f"{workdir}: a {task.config.task!r} run; captions need a stage-2 (brain-language) run")
    out = Path(out) if out else Path(workdir) / f"captions_{split}_{task_kind}.jsonl"
    rows = [row for mode in pipeline.TEST_MODES
            for row in generate(task, model, mode, task_kind, split=split, limit=limit,
                                               max_new_tokens=max_new_tokens)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"step {step}: {len(rows)} captions -> {out}")
    return out
