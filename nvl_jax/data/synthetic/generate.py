"""Writes an in-silico NSD as a prepared dataset (docs/data_format.md; the model: docs/synthetic.md).

Stimulus ids: the shared test stimuli first (``0 .. test_stimuli - 1``), then each
subject's own training stimuli in subject order. Every random draw comes from a
generator keyed by the seed and by what it draws for (``rng_for(seed, "anatomy",
"subj01")``), so the same seed writes byte-identical files, and a subject's anatomy
does not change when another subject is added.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
import shutil
import zlib

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from nvl_jax.data import format as fmt
from nvl_jax.data.synthetic import anatomy, encoding, scenes, truth

DEFAULT_SUBJECTS = ("subj01", "subj02", "subj05", "subj07")
# What a previous run (or the tools that add to a dataset) may have left in the output folder.
DATASET_ENTRIES = ("dataset.json", "split.json", "stimuli", "subjects", "common", "targets", "ground_truth")
SPLIT_RULE = "test: the shared stimuli every subject saw; train: each subject's own stimuli"


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """The in-silico NSD's knobs. The defaults write a small dataset that trains in minutes on a CPU.

    scale: grid scale (1.0 = NSD's 1.8 mm grids; voxels are 1.8 / scale mm); train_stimuli: per
    subject, each its own; test_stimuli: shared by all subjects; snr: per voxel, the std of the
    signal across stimuli over the std of single-trial noise (NSD's ncsnr); dilation: voxels of
    dilation of nsdgeneral stored as well.
    """

    seed: int = 0
    scale: float = 0.5
    subjects: tuple[str, ...] = DEFAULT_SUBJECTS
    train_stimuli: int = 400
    test_stimuli: int = 100
    repeats: int = 3
    sessions: int = 3
    snr: float = 0.4
    image_size: int = 128
    dilation: int = 0

    def __post_init__(self):
        unknown = [s for s in self.subjects if s not in anatomy.NSD_GRIDS]
        if unknown or len(set(self.subjects)) != len(self.subjects) or not self.subjects:
            raise ValueError(f"subjects must be distinct NSD subjects {tuple(anatomy.NSD_GRIDS)}, got {self.subjects}")
        if self.image_size % encoding.FEATURE_GRID or self.image_size < 2 * encoding.FEATURE_GRID:
            raise ValueError(f"image_size must be a multiple of {encoding.FEATURE_GRID} and at least "
                             f"{2 * encoding.FEATURE_GRID}, got {self.image_size}")
        if min(self.train_stimuli, self.test_stimuli, self.sessions, self.scale, self.snr) <= 0 or self.repeats < 2:
            raise ValueError("train_stimuli, test_stimuli, sessions, scale and snr must be > 0 and repeats >= 2")
        if self.sessions > (self.train_stimuli + self.test_stimuli) * self.repeats or self.dilation < 0:
            raise ValueError("sessions cannot outnumber a subject's trials, and dilation must be >= 0")

    @property
    def n_stimuli(self) -> int:
        return self.test_stimuli + self.train_stimuli * len(self.subjects)


def rng_for(seed: int, *keys: str) -> np.random.Generator:
    """A generator for one purpose, independent of every other purpose's draws."""
    return np.random.default_rng([seed, *(zlib.crc32(key.encode()) for key in keys)])


def schedule(stimuli: np.ndarray, repeats: int, n_sessions: int, rng: np.random.Generator) -> fmt.Trials:
    """Every stimulus ``repeats`` times in a shuffled order, cut into ``n_sessions`` near-equal sessions."""
    order = np.repeat(stimuli, repeats)[rng.permutation(len(stimuli) * repeats)]
    sizes = [len(part) for part in np.array_split(order, n_sessions)]
    return fmt.Trials(session=np.repeat(np.arange(n_sessions), sizes).astype(np.int16),
                      row=np.concatenate([np.arange(n) for n in sizes]).astype(np.int32),
                      stimulus=order.astype(np.int32), repeat=fmt.repeat_index(order))


def _clear(out: Path, overwrite: bool):
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty (pass overwrite=True / --overwrite to replace a dataset)")
        strangers = sorted(p.name for p in out.iterdir() if p.name not in DATASET_ENTRIES)
        if strangers:
            raise FileExistsError(f"{out} holds files that are no part of a prepared dataset: {strangers}")
        for entry in DATASET_ENTRIES:
            path = out / entry
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def _write_stimuli(writer: fmt.DatasetWriter, config: SyntheticConfig, progress: bool) -> tuple[list, np.ndarray]:
    """Scene graphs, images ``uint8 [n_stimuli, S, S, 3]`` and captions; returns the graphs and images."""
    scene_rng, caption_rng = rng_for(config.seed, "scenes"), rng_for(config.seed, "captions")
    graphs = [scenes.sample_scene(scene_rng) for _ in range(config.n_stimuli)]
    images = np.empty((config.n_stimuli, config.image_size, config.image_size, 3), np.uint8)
    for i, graph in enumerate(tqdm(graphs, desc="stimuli", disable=not progress)):
        images[i] = scenes.draw_scene(graph, config.image_size)
    writer.write_stimuli(images, [scenes.captions(g, caption_rng) for g in graphs], np.arange(config.n_stimuli))
    (writer.root / "stimuli" / "scenes.json").write_text(json.dumps(graphs) + "\n")
    return graphs, images


def _write_subject(writer: fmt.DatasetWriter, config: SyntheticConfig, name: str, stimuli: np.ndarray,
                   features: np.ndarray, presence: np.ndarray, covers: np.ndarray,
                   shared_lattice: np.ndarray) -> np.ndarray:
    """One subject's masks, betas, trials, ground-truth concept maps and true concept voxels; returns its
    head pose ``[4, 4]``.

    stimuli: the ids it sees; features, presence, covers: per stimulus id (encoding.image_features,
    scenes.concept_presence, truth.colour_cover).
    """
    subject = anatomy.build_anatomy(name, config.scale, config.dilation, rng_for(config.seed, "anatomy", name))
    model = encoding.EncodingModel.build(subject.voxel_mni, shared_lattice, rng_for(config.seed, "tuning", name))
    signal, concept_maps = model.signal(features[stimuli], presence[stimuli])
    trials = schedule(stimuli, config.repeats, config.sessions, rng_for(config.seed, "trials", name))
    # signal's rows follow `stimuli` (sorted), so a trial's row is its stimulus's position there.
    betas = encoding.simulate_betas(signal, np.searchsorted(stimuli, trials.stimulus), trials.session,
                                    trials.stimulus >= config.test_stimuli, config.snr,
                                    rng_for(config.seed, "noise", name))
    session_names = [f"session{k + 1:02d}" for k in range(config.sessions)]
    writer.write_subject(name, subject.nsdgeneral, subject.voxel_mask, subject.affine, session_names, "float16",
                         1.0, config.dilation)
    for session, session_betas in zip(session_names, betas):
        writer.write_session(name, session, session_betas)
    writer.write_trials(name, trials)
    maps = np.zeros((*subject.shape, len(scenes.CONCEPTS)), np.float32)
    maps[subject.voxel_mask] = concept_maps
    (writer.root / "ground_truth").mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(maps, subject.affine), writer.root / "ground_truth" / f"{name}_concept_maps.nii.gz")
    carried = np.zeros((*subject.shape, len(scenes.CONCEPTS)), np.uint8)
    carried[subject.voxel_mask] = truth.true_concept_voxels(model, features[stimuli], presence[stimuli],
                                                            covers[:, stimuli])
    nib.save(nib.Nifti1Image(carried, subject.affine),
             writer.root / "ground_truth" / f"{name}_concept_voxels.nii.gz")
    return subject.scanner_to_mni


def generate(out: str | Path, config: SyntheticConfig = SyntheticConfig(), *, overwrite: bool = False,
             progress: bool = True) -> Path:
    """Writes the in-silico NSD of ``config`` to ``out`` and returns ``out``; the dataset is validated."""
    out = Path(out)
    _clear(out, overwrite)
    writer = fmt.DatasetWriter(out, "in-silico", (config.image_size, config.image_size, 3))
    graphs, images = _write_stimuli(writer, config, progress)
    features, presence = encoding.image_features(images), scenes.concept_presence(graphs)
    covers = truth.colour_cover(images)
    shared_lattice = encoding.shared_concept_lattice(len(scenes.CONCEPTS), rng_for(config.seed, "concepts"))
    test_ids, n_train = np.arange(config.test_stimuli), config.train_stimuli
    poses = {}
    for k, name in enumerate(tqdm(config.subjects, desc="subjects", disable=not progress)):
        own = config.test_stimuli + k * n_train + np.arange(n_train)
        poses[name] = _write_subject(writer, config, name, np.concatenate([test_ids, own]), features, presence,
                                     covers, shared_lattice).tolist()
    writer.write_split(np.arange(config.test_stimuli, config.n_stimuli), test_ids, SPLIT_RULE)
    (out / "ground_truth" / "concepts.json").write_text(json.dumps({
        "concepts": list(scenes.CONCEPTS), "size_weights": scenes.SIZE_WEIGHTS,
        "presence": "per stimulus and concept: the sum of size_weights over the objects showing the concept",
        "config": dataclasses.asdict(config), "scanner_to_mni": poses}, indent=1) + "\n")
    writer.finish(config.subjects)
    return out


def summarize(dataset: fmt.PreparedDataset) -> str:
    """A few lines on a prepared dataset: stimuli, and per subject its grid, voxels, trials and the
    median over voxels of the test-retest correlation of single trials (the test stimuli's first two
    presentations), which for NSD's ncsnr c is about c**2 / (1 + c**2)."""
    split = {part: len(ids) for part, ids in dataset.split.items()}
    lines = [f"{dataset.root}: {dataset.n_stimuli} stimuli ({split['train']} train, {split['test']} test), "
             f"images {'x'.join(map(str, dataset.info['image_shape']))}"]
    test = np.zeros(dataset.n_stimuli, bool)
    test[dataset.split["test"]] = True
    for subject in dataset.subjects.values():
        t = subject.trials
        first, second = (_trial_betas(dataset, subject, np.flatnonzero(test[t.stimulus] & (t.repeat == r)))
                         for r in (0, 1))
        lines.append(f"  {subject.name}: grid {'x'.join(map(str, subject.native_shape))} at "
                     f"{np.linalg.norm(subject.affine[:3, 0]):.2f} mm, nsdgeneral {int(subject.nsdgeneral.sum())} "
                     f"voxels, stored {subject.n_voxels}, {len(t.row)} trials in {len(subject.sessions)} sessions, "
                     f"test-retest r {_median_r(first, second):.3f}")
    return "\n".join(lines)


def _trial_betas(dataset: fmt.PreparedDataset, subject: fmt.Subject, trials: np.ndarray) -> np.ndarray:
    """``[len(trials), n_voxels]``: the betas of the given trials, ordered by stimulus id."""
    t = subject.trials
    trials = trials[np.argsort(t.stimulus[trials], kind="stable")]
    betas = np.empty((len(trials), subject.n_voxels), np.float32)
    for session in np.unique(t.session[trials]):
        here = t.session[trials] == session
        betas[here] = dataset.betas(subject.name, session, t.row[trials[here]])
    return betas


def _median_r(a: np.ndarray, b: np.ndarray) -> float:
    """Median over columns of the Pearson correlation between ``a[:, v]`` and ``b[:, v]``."""
    a, b = a - a.mean(0), b - b.mean(0)
    return float(np.median((a * b).sum(0) / np.sqrt((a**2).sum(0) * (b**2).sum(0))))
