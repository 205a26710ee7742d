"""The Grain input pipeline of stage 1.

    trial records -> seeded shuffle (a new order every epoch) -> this process's share
    -> MixUp between repeats of the same stimulus and subject (train only)
    -> batches -> global jax.Arrays sharded over the mesh's batch axes

A record is one subject's response to one stimulus: one trial for training,
the mean of all repeats for multi-trial testing, the first presentation for
single-trial testing. Every element carries the betas zero-padded to the
largest subject's voxel count, so batches mix subjects; the on-device
preprocessing (``nvl_jax.data.volumes``) scatters them into each subject's grid.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import grain
import jax
import numpy as np

from nvl_jax import sharding as sharding_lib
from nvl_jax.data.format import PreparedDataset

TEST_MODES = ("multi_trial", "single_trial")


@dataclasses.dataclass(frozen=True)
class Records:
    """Records over all subjects.

    subject ``[N]``: index into the dataset's subject order; stimulus ``[N]``;
    trials ``[N, R]``: the subject's trial indices a record averages, -1 = none;
    partners ``[N, R]``: the other repeats of the same stimulus a training trial
    can be mixed with, -1 = none.
    """

    subject: np.ndarray
    stimulus: np.ndarray
    trials: np.ndarray
    partners: np.ndarray

    def __len__(self) -> int:
        return len(self.subject)


def _padded(groups: list[list[int]], width: int) -> np.ndarray:
    out = np.full((len(groups), width), -1, np.int32)
    for i, group in enumerate(groups):
        out[i, :len(group)] = group
    return out


def build_records(dataset: PreparedDataset, split: str, mode: str = "train") -> Records:
    """The records of ``split`` ("train" / "test") in ``mode`` ("train", "multi_trial", "single_trial")."""
    if mode not in ("train", *TEST_MODES):
        raise ValueError(f"mode must be 'train' or one of {TEST_MODES}, got {mode!r}")
    in_split = np.zeros(dataset.n_stimuli, bool)
    in_split[dataset.split[split]] = True
    subjects, stimuli, trials, partners = [], [], [], []
    for s, subject in enumerate(dataset.subjects.values()):
        t = subject.trials
        keep = np.flatnonzero(in_split[t.stimulus])
        by_stimulus: dict[int, list[int]] = {}
        for i in keep[np.lexsort((t.repeat[keep], t.stimulus[keep]))]:
            by_stimulus.setdefault(int(t.stimulus[i]), []).append(int(i))
        for stimulus, repeats in sorted(by_stimulus.items()):
            if mode == "train":
                for i in repeats:
                    subjects.append(s), stimuli.append(stimulus), trials.append([i])
                    partners.append([j for j in repeats if j != i])
            else:
                chosen = repeats if mode == "multi_trial" else repeats[:1]
                subjects.append(s), stimuli.append(stimulus), trials.append(chosen), partners.append([])
    width = max([len(g) for g in trials + partners] + [1])
    return Records(np.asarray(subjects, np.int32), np.asarray(stimuli, np.int32),
                   _padded(trials, width), _padded(partners, width))


class _DatasetHandle:
    """Opens the prepared dataset lazily in whichever process uses it.

    Grain may pickle sources and transforms into worker processes; only the
    root travels, each process maps the files itself.
    """

    def __init__(self, root: str | Path):
        self.root = str(root)
        self._dataset: PreparedDataset | None = None
        self._targets = None

    @property
    def dataset(self) -> PreparedDataset:
        if self._dataset is None:
            self._dataset = PreparedDataset.open(self.root, check_values=False)
        return self._dataset

    @property
    def targets(self):
        if self._targets is None:
            self._targets = self.dataset.targets()
        return self._targets

    @functools.cached_property
    def subject_list(self) -> list:
        """The dataset's subjects in its order: records index them."""
        return list(self.dataset.subjects.values())

    def __getstate__(self):
        return {"root": self.root, "_dataset": None, "_targets": None}

    def read_betas(self, subject_index: int, trial_indices: np.ndarray, width: int) -> np.ndarray:
        """The betas of the given trials of one subject, ``float32 [len(trial_indices), width]`` zero-padded."""
        subject = self.subject_list[subject_index]
        out = np.zeros((len(trial_indices), width), np.float32)
        for k, i in enumerate(trial_indices):
            out[k, :subject.n_voxels] = self.dataset.betas(
                subject.name, int(subject.trials.session[i]), subject.trials.row[i:i + 1])[0]
        return out


class RecordSource(grain.sources.RandomAccessDataSource):
    """Element i of ``records``: a dict of numpy arrays.

    betas ``float32 [max_voxels]`` (repeats averaged, zero-padded), subject ``int32 []``,
    stimulus ``int32 []``, partners ``int32 [R]`` (MixUp candidates, -1 = none),
    clip_target ``float32 [clip_dim]``, vae_target ``float32 [h, w, c]``.
    """

    def __init__(self, root: str | Path, records: Records, max_voxels: int):
        self._handle = _DatasetHandle(root)
        self._records = records
        self.max_voxels = max_voxels

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:  # deterministic: grain checks it when restoring iterator state
        return f"RecordSource(root={self._handle.root!r}, records={len(self._records)}, max_voxels={self.max_voxels})"

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        r, subject = self._records, int(self._records.subject[index])
        trials = r.trials[index][r.trials[index] >= 0]
        targets = self._handle.targets
        stimulus = int(r.stimulus[index])
        return {
            "betas": self._handle.read_betas(subject, trials, self.max_voxels).mean(0),
            "subject": np.int32(subject),
            "stimulus": np.int32(stimulus),
            "partners": r.partners[index],
            "clip_target": np.asarray(targets.clip_image_embeds[stimulus], np.float32),
            "vae_target": np.asarray(targets.vae_latents[stimulus], np.float32),
        }


class MixUpRepeats(grain.transforms.RandomMap):
    """MixUp between two presentations of the same stimulus to the same subject.

    ``betas = lam * betas + (1 - lam) * betas_of_another_repeat``, lam ~ U(0, 1).
    The targets belong to the stimulus, so they stay as they are.
    """

    def __init__(self, root: str | Path, max_voxels: int):
        self._handle = _DatasetHandle(root)
        self.max_voxels = max_voxels

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        partners = element["partners"][element["partners"] >= 0]
        if len(partners):
            partner = self._handle.read_betas(int(element["subject"]), partners[rng.integers(len(partners))][None],
                                              self.max_voxels)[0]
            lam = np.float32(rng.uniform())
            element = {**element, "betas": lam * element["betas"] + (1 - lam) * partner}
        return element


def _drop_partners(element: dict) -> dict:
    return {k: v for k, v in element.items() if k != "partners"}


def train_dataset(root: str | Path, dataset: PreparedDataset, *, global_batch_size: int, seed: int,
                  mixup: bool = True, worker_count: int = 0) -> grain.IterDataset:
    """Endless training batches of this process's share: dicts of ``[local_batch, ...]`` numpy arrays.

    Every process shuffles the same global order with ``seed`` (a new order each
    epoch) and takes every ``process_count``-th record, so the processes of a pod
    read disjoint shares and together cover the data.
    """
    processes = jax.process_count()
    if global_batch_size % processes:
        raise ValueError(f"global batch {global_batch_size} does not split over {processes} processes")
    max_voxels = max(s.n_voxels for s in dataset.subjects.values())
    records = build_records(dataset, "train", "train")
    ds = grain.MapDataset.source(RecordSource(root, records, max_voxels)).seed(seed)
    ds = ds.shuffle().repeat()
    if mixup:
        # Before the share is taken: each record's MixUp draw is seeded by its position in the global
        # order, so a run's batches do not depend on how many processes read them. Mapping is lazy:
        # a process still reads only its share.
        ds = ds.random_map(MixUpRepeats(root, max_voxels))
    ds = ds[jax.process_index()::processes].map(_drop_partners)
    ds = ds.batch(global_batch_size // processes, drop_remainder=True)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4))
    if worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it


def test_batches(root: str | Path, dataset: PreparedDataset, mode: str, global_batch_size: int):
    """The test records in ``mode``, in order, as fixed-size batches of this process's share.

    Yields dicts of ``[global_batch_size / process_count, ...]`` numpy arrays with
    an extra ``valid`` bool entry: the last batch is padded with copies of the
    final record, so every batch has one shape, every process the same number
    of batches, and nothing is dropped.
    """
    processes = jax.process_count()
    local = global_batch_size // processes
    max_voxels = max(s.n_voxels for s in dataset.subjects.values())
    source = RecordSource(root, build_records(dataset, "test", mode), max_voxels)
    for start in range(0, len(source), global_batch_size):
        indices = start + jax.process_index() * local + np.arange(local)
        valid = indices < len(source)
        elements = [_drop_partners(source[int(i)]) for i in np.minimum(indices, len(source) - 1)]
        batch = {k: np.stack([e[k] for e in elements]) for k in elements[0]}
        yield {**batch, "valid": valid}


def global_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
                 rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES) -> dict[str, jax.Array]:
    """Assembles each process's ``[local_batch, ...]`` arrays into global arrays split over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding_lib.batch_sharding(mesh, v.ndim, rules), v)
            for k, v in local_batch.items()}
