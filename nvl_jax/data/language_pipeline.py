"""The Grain input pipeline of stage 2: a trial's betas paired with one of its stimulus's conversations.

    (training trial, conversation of its stimulus) pairs -> seeded shuffle (a new order every epoch)
    -> this process's share -> batches -> global jax.Arrays sharded over the mesh's batch axes

Every conversation is tokenized once, up front, into fixed-length rows (``language.conversation``:
labels built segment by segment, the ``<image>`` placeholder one id), so the pipeline only reads
betas and copies rows. A training element holds ``betas [max_voxels]``, ``subject``, ``stimulus``,
``input_ids [L]``, ``attention_mask [L]`` and ``labels [L]`` (right-padded).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from pathlib import Path

import grain
import jax
import numpy as np

from nvl_jax.data import pipeline
from nvl_jax.data.format import PreparedDataset
from nvl_jax.language import conversation as conversation_lib


@dataclasses.dataclass(frozen=True)
class TokenizedConversations:
    """Conversations as fixed-length rows: input_ids, attention_mask, labels ``int32 [n, length]``;
    stimulus ``int32 [n]``; kind: each one's kind."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    stimulus: np.ndarray
    kind: tuple[str, ...]


def tokenize_instructions(records: Sequence[dict], fmt: str, tokenizer, *, max_length: int,
                          kinds: Sequence[str]) -> TokenizedConversations:
    """The instruction records of ``kinds`` (``PreparedDataset.instructions()``) as padded rows.

    A conversation cut so far that none of its answer tokens is left fails, naming it: raise
    ``max_length`` rather than train on empty labels.
    """
    chosen = [r for r in records if r["kind"] in kinds]
    if not chosen:
        raise ValueError(f"no instruction conversations of kinds {tuple(kinds)} (present: "
                         f"{sorted({r['kind'] for r in records})})")
    samples = []
    for record in chosen:
        sample = conversation_lib.tokenize_conversation(record["conversation"], fmt, tokenizer, max_length=max_length)
        if (sample.labels == conversation_lib.IGNORE_INDEX).all():
            raise ValueError(f"conversation {record['id']!r} keeps no answer token within max_length {max_length} "
                             f"({sample.n_truncated} tokens cut): raise config.data.max_length")
        samples.append(sample)
    batch = conversation_lib.collate(samples, pad_id=pad_id(tokenizer), length=max_length, require_labels=False)
    return TokenizedConversations(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                  np.asarray([r["stimulus"] for r in chosen], np.int32),
                                  tuple(r["kind"] for r in chosen))


def pad_id(tokenizer) -> int:
    """The tokenizer's padding id, else its end-of-sequence id (Llama tokenizers define no pad)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


class ConversationSource(grain.sources.RandomAccessDataSource):
    """Element i: training trial ``pairs[i, 0]`` (an index of ``records``) with conversation ``pairs[i, 1]``."""

    def __init__(self, root: str | Path, records: pipeline.Records, conversations: TokenizedConversations,
                 pairs: np.ndarray, max_voxels: int):
        self._trials = pipeline.RecordSource(root, records, max_voxels)
        self._conversations = conversations
        self._pairs = pairs

    def __len__(self) -> int:
        return len(self._pairs)

    def __repr__(self) -> str:  # deterministic: grain checks it when restoring iterator state
        return f"ConversationSource({self._trials!r}, pairs={len(self._pairs)})"

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        trial, row = (int(i) for i in self._pairs[index])
        element = self._trials[trial]
        c = self._conversations
        return {"betas": element["betas"], "subject": element["subject"], "stimulus": element["stimulus"],
                "input_ids": c.input_ids[row], "attention_mask": c.attention_mask[row], "labels": c.labels[row]}


def training_pairs(records: pipeline.Records, conversations: TokenizedConversations) -> np.ndarray:
    """``int64 [n_pairs, 2]``: every training trial with every conversation of its stimulus."""
    by_stimulus: dict[int, list[int]] = {}
    for row, stimulus in enumerate(conversations.stimulus):
        by_stimulus.setdefault(int(stimulus), []).append(row)
    pairs = [(i, row) for i, stimulus in enumerate(records.stimulus) for row in by_stimulus.get(int(stimulus), ())]
    if not pairs:
        raise ValueError("no training trial has a conversation: build the instruction data "
                         "(python -m nvl_jax.data.instructions --data ROOT)")
    return np.asarray(pairs, np.int64)


def train_dataset(root: str | Path, dataset: PreparedDataset, conversations: TokenizedConversations, *,
                  global_batch_size: int, seed: int, worker_count: int = 0) -> grain.IterDataset:
    """Endless training batches of this process's share, dicts of ``[local_batch, ...]`` numpy arrays."""
    processes = jax.process_count()
    if global_batch_size % processes:
        raise ValueError(f"global batch {global_batch_size} does not split over {processes} processes")
    records = pipeline.build_records(dataset, "train", "train")
    pairs = training_pairs(records, conversations)
    max_voxels = max(s.n_voxels for s in dataset.subjects.values())
    ds = grain.MapDataset.source(ConversationSource(root, records, conversations, pairs, max_voxels)).seed(seed)
    ds = ds.shuffle().repeat()[jax.process_index()::processes]
    ds = ds.batch(global_batch_size // processes, drop_remainder=True)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4))
    if worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it


def epoch_steps(dataset: PreparedDataset, conversations: TokenizedConversations, global_batch_size: int) -> int:
    """Batches in one pass over the training pairs."""
    records = pipeline.build_records(dataset, "train", "train")
    return max(1, len(training_pairs(records, conversations)) // global_batch_size)
