"""Concept maps of one to three stage-1 runs (the paper's ensemble: patch 14, 12 and 10) on a subject's
native voxels, and ``localize_concept``, the one call the commands and the chat answer use.

Each run's map is GradCAM relevance averaged over the chosen stimuli, taken back to the subject's
voxels through the exact transpose of its resampling, and normalized to 0..1; the ensemble is the
mean of the runs' maps on the native voxels, normalized again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nvl_jax.data import format as data_format
from nvl_jax.localization import adjoint, concepts as concepts_lib, gradcam

REPEATS = ("mean", "each")
BATCH = 32  # samples per jitted call; the last batch is padded, so one program serves every call


class Extractor:
    """One restored stage-1 run: ``name`` ("p14"), ``dataset``, ``task``, ``model``."""

    def __init__(self, workdir: str | Path, method: str = "token"):
        from nvl_jax.training import loop

        self.workdir = Path(workdir)
        self.task, self.model, self.step = loop.restore_model(self.workdir)
        self.dataset: data_format.PreparedDataset = self.task.dataset
        self.patch_size = self.task.prep.patch_size
        self.name = f"p{self.patch_size}"
        self._relevance = gradcam.relevance_fn(self.model, method)
        graphdef, state = nnx.split(self.model)
        embed = jax.jit(lambda state, patches, coords: nnx.merge(graphdef, state)(patches, coords).clip_embedding)
        self._embed = lambda patches: embed(state, patches, self.task.prep.active)

    def subject_index(self, subject: str) -> int:
        if subject not in self.dataset.subjects:
            raise ValueError(f"subject {subject!r} is not in {self.dataset.root} (subjects: {list(self.dataset.subjects)})")
        return list(self.dataset.subjects).index(subject)

    def _batches(self, subject: str, betas: np.ndarray):
        """Yields ``(rows, patches [BATCH, n_active, P**3])`` for betas ``[n, n_voxels]`` of one subject."""
        width = max(s.n_voxels for s in self.dataset.subjects.values())
        index = self.subject_index(subject)
        for start in range(0, len(betas), BATCH):
            chunk = betas[start:start + BATCH]
            padded = np.zeros((BATCH, width), np.float32)
            padded[:len(chunk), :chunk.shape[1]] = chunk
            batch = {"betas": jnp.asarray(padded), "subject": jnp.full((BATCH,), index, jnp.int32)}
            yield len(chunk), self.task.prep.patches(batch)

    def relevance(self, subject: str, betas: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """GradCAM of betas ``[n, n_voxels]`` for each target ``[n_targets, clip_dim]``:
        ``(relevance [n, n_targets, n_active], score [n, n_targets])``."""
        maps, scores = [], []
        for rows, patches in self._batches(subject, betas):
            relevance, score = self._relevance(patches, self.task.prep.active, jnp.asarray(targets, jnp.float32))
            maps.append(np.asarray(relevance[:rows])), scores.append(np.asarray(score[:rows]))
        return np.concatenate(maps), np.concatenate(scores)

    def clip_embeddings(self, subject: str, betas: np.ndarray) -> np.ndarray:
        """``[n, clip_dim]``: the CLIP head's output for betas ``[n, n_voxels]``."""
        return np.concatenate([np.asarray(self._embed(patches)[:rows], np.float32)
                               for rows, patches in self._batches(subject, betas)])

    def to_voxels(self, subject: str, patch_relevance: np.ndarray) -> np.ndarray:
        """``[n_voxels]`` 0..1: one relevance per active patch ``[n_active]`` on the subject's native voxels."""
        prep = self.task.prep
        native = adjoint.patch_relevance_to_voxels(patch_relevance, self.subject_index(subject), prep.geometry,
                                                   prep.active, self.patch_size)
        return adjoint.normalize(native)


def load_extractors(workdirs: str | Path | list, method: str = "token") -> list[Extractor]:
    """The runs of ``workdirs`` (a list, or one string of comma-separated folders): 1 to 3 runs on one dataset,
    with distinct patch sizes; ``method``: ``gradcam.METHODS``."""
    if isinstance(workdirs, (str, Path)):
        workdirs = [w for w in str(workdirs).split(",") if w]
    if not 1 <= len(workdirs) <= 3:
        raise ValueError(f"an ensemble takes 1 to 3 runs, got {len(workdirs)}: {workdirs}")
    extractors = [Extractor(w, method) for w in workdirs]
    roots = {str(e.dataset.root.resolve()) for e in extractors}
    if len(roots) > 1:
        raise ValueError(f"the runs {workdirs} were trained on different datasets {sorted(roots)}; an ensemble "
                         "averages maps on one subject's voxels")
    names = [e.name for e in extractors]
    if len(set(names)) != len(names):
        raise ValueError(f"the runs {workdirs} share a patch size ({names}); the ensemble's members differ in it")
    return extractors


def subject_stimuli(dataset: data_format.PreparedDataset, subject: str, stimuli: str, concept: str) -> np.ndarray:
    """Sorted stimulus ids the subject saw, chosen by ``stimuli``: "test", "all", "showing" (the test stimuli
    whose scene graph shows ``concept``) or comma-separated ids."""
    seen = np.unique(dataset.subjects[subject].trials.stimulus)
    test = np.intersect1d(seen, dataset.split["test"])
    if stimuli == "test":
        chosen = test
    elif stimuli == "all":
        chosen = seen
    elif stimuli == "showing":
        chosen = test[concepts_lib.showing(dataset, concept)[test]]
    else:
        try:
            chosen = np.unique([int(s) for s in stimuli.split(",") if s])
        except ValueError:
            raise ValueError(f"stimuli {stimuli!r}: expected test, all, showing or comma-separated stimulus ids") from None
        unseen = np.setdiff1d(chosen, seen)
        if len(unseen):
            raise ValueError(f"stimuli {unseen[:5].tolist()}: {subject} never saw them")
    if not len(chosen):
        raise ValueError(f"stimuli {stimuli!r}: no stimulus of {subject} chosen (concept {concept!r})")
    return chosen


def read_betas(dataset: data_format.PreparedDataset, subject: str, stimuli: np.ndarray,
               repeats: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """``(betas float32 [rows, n_voxels], stimulus [rows])``: per stimulus the mean over its repeats
    (``repeats="mean"``), or every trial (``"each"``)."""
    if repeats not in REPEATS:
        raise ValueError(f"repeats must be one of {REPEATS}, got {repeats!r}")
    trials = dataset.subjects[subject].trials
    rows, ids = [], []
    for stimulus in stimuli:
        chosen = np.flatnonzero(trials.stimulus == stimulus)
        betas = np.concatenate([dataset.betas(subject, int(trials.session[i]), trials.row[i:i + 1]) for i in chosen])
        rows.extend([betas.mean(0)] if repeats == "mean" else list(betas))
        ids.extend([stimulus] if repeats == "mean" else [stimulus] * len(chosen))
    return np.stack(rows).astype(np.float32), np.asarray(ids, np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class ConceptMap:
    """Where a concept lives in one subject's brain.

    ``ensemble [n_voxels]`` 0..1 (``voxel_mask`` C order); ``runs``: run name ("p14") -> its own map
    ``[n_voxels]``; ``stimuli``: the ids the maps average over; ``score``: run name -> mean cosine of the
    CLIP head's output with the concept target over those stimuli; ``subject``: the dataset's Subject
    (``native_shape``, ``affine``, ``voxel_mask``).
    """

    concept: str
    subject: data_format.Subject
    ensemble: np.ndarray
    runs: dict[str, np.ndarray]
    stimuli: np.ndarray
    score: dict[str, float]

    def volume(self) -> np.ndarray:
        """``float32 [X, Y, Z]``: the ensemble map on the subject's native grid, 0 outside the voxel mask."""
        volume = np.zeros(self.subject.native_shape, np.float32)
        volume[self.subject.voxel_mask] = self.ensemble
        return volume


def concept_maps(extractors: list[Extractor], subject: str, concept: str, stimuli: str = "test",
                 repeats: str = "mean") -> ConceptMap:
    """The concept's map in ``subject`` from each run and their ensemble (see ``localize_concept``)."""
    dataset = extractors[0].dataset
    chosen = subject_stimuli(dataset, subject, stimuli, concept)
    betas, _ = read_betas(dataset, subject, chosen, repeats)
    target = concepts_lib.concept_targets(dataset, [concept])
    runs, score = {}, {}
    for extractor in extractors:
        relevance, scores = extractor.relevance(subject, betas, target)
        runs[extractor.name] = extractor.to_voxels(subject, relevance[:, 0].mean(0))
        score[extractor.name] = float(scores.mean())
    ensemble = adjoint.normalize(np.mean(list(runs.values()), axis=0))
    return ConceptMap(concept, dataset.subjects[subject], ensemble, runs, chosen, score)


def localize_concept(workdirs: str | Path | list, subject: str, concept: str, stimuli: str = "test",
                     repeats: str = "mean", method: str = "token") -> ConceptMap:
    """Where ``concept`` lives in ``subject``'s brain, on its native voxels, from 1 to 3 stage-1 runs.

    Args:
      workdirs: run folders (a list, or comma-separated), e.g. the patch-14, -12 and -10 extractors.
      subject: a subject of the runs' dataset, e.g. "subj01".
      concept: the keyword, e.g. "circle". With a real CLIP's targets any text (its prompt is
        ``concepts.PROMPT_TEMPLATE``); with random stand-in targets one of the scene graphs' concepts.
      stimuli: "test" (the subject's test stimuli), "all" (every stimulus it saw), "showing" (test
        stimuli showing the concept; in-silico only) or comma-separated stimulus ids.
      repeats: "mean" (a stimulus's betas averaged over its repeats, one map each) or "each" (one
        map per trial); the maps are averaged.
      method: "token" (each patch weighted by its own gradient, the default) or "gradcam" (the paper's
        mean gradient over patches); docs/localization.md says why the default differs.
    """
    return concept_maps(load_extractors(workdirs, method), subject, concept, stimuli, repeats)
