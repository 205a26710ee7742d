"""Natural Scenes Dataset -> a prepared dataset (docs/data_format.md, docs/nsd.md).

Order: the arguments are recorded (prepare.json); the split is made from the design alone;
the stimuli the subjects saw are copied with their captions; each subject's sessions are
z-scored and written, in parallel over sessions; then trials, split, summary.json,
checksums.json and, last, dataset.json. Every file appears only when complete and a session
on disk is skipped, so a killed run rerun with the same command ends with the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from nvl_jax.data.format import DatasetWriter, Trials, repeat_index, save_json
from nvl_jax.data.nsd import design as design_lib
from nvl_jax.data.nsd import objects as objects_lib
from nvl_jax.data.nsd import output
from nvl_jax.data.nsd import sessions as sessions_lib
from nvl_jax.data.nsd import stimuli as stimuli_lib
from nvl_jax.data.nsd.layout import (BETAS_SUFFIXES, NSDGENERAL_VOXELS, NSDLayout, require, session_name,
                                     subject_name)

SOURCE = "nsd"
COMMAND = "python -m nvl_jax.data.prepare_nsd"


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """What to prepare: NSD's ``subjects`` (1..8), their first ``sessions`` sessions of
    ``trials_per_session`` trials from the ``betas_format`` files ("nifti" / "hdf5"), the voxels of
    nsdgeneral dilated by ``dilation``; COCO's caption files under ``coco_annotations``, and with
    ``coco_instances`` its instance files there too (stimuli/objects.json)."""

    nsd_root: Path
    coco_annotations: Path
    subjects: tuple[int, ...] = (1, 2, 5, 7)
    sessions: int = 37
    betas_format: str = "nifti"
    trials_per_session: int = 750
    dilation: int = 0
    coco_instances: bool = False

    def __post_init__(self):
        if not self.subjects or len(set(self.subjects)) != len(self.subjects) or not set(self.subjects) <= set(
                NSDGENERAL_VOXELS):
            raise ValueError(f"subjects must be distinct NSD subjects 1..8, got {self.subjects}")
        if self.betas_format not in BETAS_SUFFIXES:
            raise ValueError(f"betas_format must be one of {tuple(BETAS_SUFFIXES)}, got {self.betas_format!r}")
        if min(self.sessions, self.trials_per_session) < 1 or self.dilation < 0:
            raise ValueError("sessions and trials_per_session must be >= 1 and dilation >= 0")

    def record(self) -> dict:
        """prepare.json's content."""
        return {"command": COMMAND, "subjects": list(self.subjects), "sessions": self.sessions,
                "format": self.betas_format, "trials_per_session": self.trials_per_session,
                "dilation": self.dilation, "coco_instances": self.coco_instances,
                "nsd_root": str(Path(self.nsd_root).resolve()),
                "coco_annotations": str(Path(self.coco_annotations).resolve())}


@contextlib.contextmanager
def _session_runner(workers: int) -> Iterator[Callable]:
    """A function that prepares a list of SessionJobs and yields once per finished job, in order:
    inline for one worker, else in a pool of ``workers`` processes."""
    if workers == 1:
        yield lambda jobs: map(sessions_lib.prepare_session, jobs)
        return
    # spawn, not fork: forking a process that runs threads (JAX, tqdm) can deadlock the child.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            yield lambda jobs: pool.map(sessions_lib.prepare_session, jobs)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _check_inputs_exist(layout: NSDLayout, options: PrepareOptions) -> None:
    """Every NSD file the run reads exists: a missing one stops it before anything is written."""
    require(layout.expdesign, "NSD's experimental design, nsd_expdesign.mat")
    require(layout.stim_info, "NSD's stimulus information, nsd_stim_info_merged.csv")
    require(layout.stimuli, "NSD's stimuli, nsd_stimuli.hdf5")
    for subject in options.subjects:
        require(layout.nsdgeneral(subject), f"{subject_name(subject)}'s nsdgeneral ROI")
        for session in range(1, options.sessions + 1):
            require(layout.betas(subject, session, options.betas_format),
                    f"{subject_name(subject)}'s betas of session {session} of --sessions {options.sessions}")


def _stimuli_on_disk(out: Path, source_ids: np.ndarray, image_shape: tuple[int, ...]) -> bool:
    """Whether a previous run already wrote these stimuli (captions.json is written last of the three)."""
    folder = out / "stimuli"
    if not all((folder / name).is_file() for name in ("images.npy", "source_ids.npy", "captions.json")):
        return False
    try:
        images = np.load(folder / "images.npy", mmap_mode="r")
        stored_ids = np.load(folder / "source_ids.npy")
    except (ValueError, OSError):
        return False
    return (images.dtype == np.uint8 and images.shape == (len(source_ids), *image_shape)
            and np.array_equal(stored_ids, source_ids))


def _prepare_subject(writer: DatasetWriter, layout: NSDLayout, options: PrepareOptions, subject: int,
                     stimulus: np.ndarray, is_test: np.ndarray, run: Callable, progress: bool) -> dict:
    """One subject's masks, sessions and trials; ``stimulus``: ``[n_trials]`` prepared stimulus ids,
    ``is_test``: bool ``[n_stimuli]``. Returns its summary entry (bytes added later)."""
    name, mask_path = subject_name(subject), layout.nsdgeneral(subject)
    nsdgeneral, voxel_mask, affine = sessions_lib.load_mask(mask_path, options.dilation)
    names = [session_name(k) for k in range(1, options.sessions + 1)]
    writer.write_subject(name, nsdgeneral, voxel_mask, affine, names, "float16", 1.0, options.dilation)
    test_trial = is_test[stimulus]
    train_rows = ~test_trial.reshape(options.sessions, options.trials_per_session)
    jobs = [sessions_lib.SessionJob(writer, name, names[k], layout.betas(subject, k + 1, options.betas_format),
                                    options.betas_format, voxel_mask, mask_path, train_rows[k],
                                    options.trials_per_session)
            for k in range(options.sessions) if not writer.has_session(name, names[k])]
    for _ in tqdm(run(jobs), desc=name, total=options.sessions, initial=options.sessions - len(jobs),
                  unit="session", disable=not progress):
        pass
    trial = np.arange(len(stimulus))
    writer.write_trials(name, Trials(session=trial // options.trials_per_session,
                                     row=trial % options.trials_per_session, stimulus=stimulus,
                                     repeat=repeat_index(stimulus)))
    return {"sessions": options.sessions, "trials": len(stimulus), "train_trials": int((~test_trial).sum()),
            "test_trials": int(test_trial.sum()), "stimuli": len(np.unique(stimulus)),
            "test_stimuli": len(np.unique(stimulus[test_trial])), "nsdgeneral_voxels": int(nsdgeneral.sum()),
            "nsdgeneral_voxels_in_nsd": NSDGENERAL_VOXELS[subject], "stored_voxels": int(voxel_mask.sum())}


def prepare(options: PrepareOptions, out: str | Path, *, workers: int = 1, progress: bool = True) -> dict:
    """Prepares NSD at ``out`` (resuming a killed run; nothing to do when finished); returns summary.json."""
    out = Path(out)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if output.claim(out, options.record()):
        print(f"{out}: already prepared with these arguments; nothing to do")
        return json.loads((out / output.SUMMARY).read_text())
    layout = NSDLayout(Path(options.nsd_root))
    _check_inputs_exist(layout, options)
    design = design_lib.load_design(layout.expdesign)
    info = design_lib.load_stim_info(layout.stim_info)
    design_lib.check_shared(design, info)
    n_trials = options.sessions * options.trials_per_session
    seen = {subject: design_lib.presented(design, subject, n_trials) for subject in options.subjects}
    train_ids, test_ids = design_lib.split(list(seen.values()), design.shared)
    source_ids = np.union1d(train_ids, test_ids)  # prepared stimulus id i = the i-th smallest 73k id
    is_test = np.isin(source_ids, test_ids)

    file, brick = stimuli_lib.open_stimuli(layout.stimuli, source_ids)
    with file:
        image_shape = tuple(brick.shape[1:])
        writer = DatasetWriter(out, SOURCE, image_shape)
        if not _stimuli_on_disk(out, source_ids, image_shape):
            coco_ids, coco_splits = info.coco_images(source_ids)
            captions = stimuli_lib.load_captions(Path(options.coco_annotations), coco_ids, coco_splits)
            with tqdm(total=len(source_ids), desc="stimuli", unit="image", disable=not progress) as bar:
                writer.write_stimuli(stimuli_lib.SelectedImages(brick, source_ids, bar), captions, source_ids)
    if options.coco_instances and not (out / output.OBJECTS).is_file():
        coco_ids, coco_splits = info.coco_images(source_ids)
        save_json(out / output.OBJECTS, objects_lib.load_objects(Path(options.coco_annotations), coco_ids,
                                                                 coco_splits, info.crop_box[source_ids]), indent=None)

    subjects = {}
    with _session_runner(workers) as run:
        for subject in options.subjects:
            subjects[subject_name(subject)] = _prepare_subject(
                writer, layout, options, subject, np.searchsorted(source_ids, seen[subject]), is_test, run,
                progress)
    rule = (f"test: the shared1000 images (nsd_expdesign.mat sharedix) that every subject ({', '.join(subjects)}) "
            f"saw in sessions 1-{options.sessions}; train: every other image they saw")
    writer.write_split(np.flatnonzero(~is_test), np.flatnonzero(is_test), rule)

    files = output.dataset_files({name: [session_name(k) for k in range(1, options.sessions + 1)]
                                  for name in subjects}, options.coco_instances)
    summary = _summary(out, options, subjects, files, image_shape, is_test, rule)
    save_json(out / output.SUMMARY, summary)
    output.write_checksums(out, [*files, output.SUMMARY], progress)
    writer.finish(list(subjects))
    return summary


def _summary(out: Path, options: PrepareOptions, subjects: dict[str, dict], files: list[str],
             image_shape: tuple[int, ...], is_test: np.ndarray, rule: str) -> dict:
    """summary.json: the arguments, the split's counts, per subject its counts and bytes, and the total."""
    size = {file: (out / file).stat().st_size for file in files}
    for name, entry in subjects.items():
        entry["bytes"] = sum(n for file, n in size.items() if file.startswith(f"subjects/{name}/"))
    return {"source": SOURCE, **{k: v for k, v in options.record().items() if k in output.OUTPUT_ARGUMENTS},
            "n_stimuli": len(is_test), "image_shape": list(image_shape),
            "split": {"train": int((~is_test).sum()), "test": int(is_test.sum()), "rule": rule},
            "per_subject": subjects, "stimuli_bytes": sum(n for f, n in size.items() if f.startswith("stimuli/")),
            "total_bytes": sum(size.values())}


def _size(n_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def format_summary(summary: dict, out: Path) -> str:
    """summary.json as a few lines for the terminal."""
    split = summary["split"]
    lines = [f"{out}: {len(summary['per_subject'])} subjects, {summary['sessions']} sessions each, "
             f"{summary['n_stimuli']} stimuli ({split['train']} train, {split['test']} test), images "
             f"{'x'.join(map(str, summary['image_shape']))}, {_size(summary['stimuli_bytes'])}"]
    for name, s in summary["per_subject"].items():
        lines.append(f"  {name}: {s['trials']} trials ({s['train_trials']} train, {s['test_trials']} test) of "
                     f"{s['stimuli']} stimuli ({s['test_stimuli']} test); nsdgeneral {s['nsdgeneral_voxels']} "
                     f"voxels (NSD: {s['nsdgeneral_voxels_in_nsd']}), stored {s['stored_voxels']}; {_size(s['bytes'])}")
    lines.append(f"  total {_size(summary['total_bytes'])}; split rule: {split['rule']}")
    return "\n".join(lines)
