"""The prepared-dataset format of docs/data_format.md: a validating reader and a resumable writer.

``PreparedDataset.open`` checks the whole folder before any training step, so a broken file
stops a run at start-up with its name and field. ``DatasetWriter`` renames each file into place
only when it is complete and writes ``dataset.json`` last: a folder with ``dataset.json`` is
finished, and a killed preparer resumes by skipping the sessions on disk (``has_session``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import dataclasses
import json
import os
from pathlib import Path
import threading

import nibabel as nib
import numpy as np

from nvl_jax.language.formats import IMAGE_PLACEHOLDER, check_conversation

FORMAT = "nvl_jax-prepared"
VERSION = 1
BETAS_DTYPES = ("int16", "float16", "float32")
DATASET_FIELDS = ("format", "version", "source", "subjects", "n_stimuli", "image_shape")
SUBJECT_FIELDS = ("native_shape", "affine", "n_voxels", "mask_dilation", "betas_dtype", "betas_scale", "sessions",
                  "n_trials")
TRIAL_DTYPES = {"session": np.int16, "row": np.int32, "stimulus": np.int32, "repeat": np.int8}
INSTRUCTION_FIELDS = ("id", "stimulus", "kind", "conversation")
# Betas rows per read in the NaN scan: at NSD scale a session (750 x 16k) is read in a few MB at a time.
_SCAN_ROWS = 256
# NIfTI stores the affine as float32; a float64 affine survives the round trip to about 1e-6 mm.
_AFFINE_ATOL = 1e-4


class DatasetError(ValueError):
    """A prepared dataset that breaks the format; the message names the file and the field."""


@dataclasses.dataclass(frozen=True, eq=False)
class Trials:
    """One subject's trials in presentation order, each ``[n_trials]``: session ``int16`` (index into
    ``Subject.sessions``), row ``int32`` (in that session's betas), stimulus ``int32``, repeat ``int8``."""

    session: np.ndarray
    row: np.ndarray
    stimulus: np.ndarray
    repeat: np.ndarray


def repeat_index(stimulus: np.ndarray) -> np.ndarray:
    """``int8 [n_trials]``: how often each trial's stimulus was shown before it, for trials in
    presentation order (``Trials.repeat``: 0, 1, 2 in NSD)."""
    order = np.argsort(stimulus, kind="stable")
    ranked = stimulus[order]
    repeat = np.empty(len(stimulus), np.int8)
    repeat[order] = np.arange(len(stimulus)) - np.searchsorted(ranked, ranked)
    return repeat


@dataclasses.dataclass(frozen=True, eq=False)
class Subject:
    """One subject: affine ``[4, 4]`` (voxel index -> mm); voxel_mask ``bool [X, Y, Z]``, the stored voxels
    in the order of ``np.flatnonzero(voxel_mask.ravel())``; nsdgeneral ``bool [X, Y, Z]``, the ROI."""

    name: str
    native_shape: tuple[int, int, int]
    affine: np.ndarray
    n_voxels: int
    sessions: tuple[str, ...]
    betas_scale: float
    mask_dilation: int
    voxel_mask: np.ndarray
    nsdgeneral: np.ndarray
    trials: Trials


@dataclasses.dataclass(frozen=True, eq=False)
class Targets:
    """clip_image_embeds ``float32 [n_stimuli, clip_dim]``; vae_latents ``float32 [n_stimuli, h, w, c]``;
    info: targets.json (which CLIP and VAE made them)."""

    clip_image_embeds: np.ndarray
    vae_latents: np.ndarray
    info: dict


def _existing(root: Path, path: Path) -> str:
    """The file's name in messages (relative to the dataset root); fails if it is missing."""
    where = path.relative_to(root).as_posix()
    if not path.is_file():
        raise DatasetError(f"{where}: missing")
    return where


def _read_json(root: Path, path: Path, fields: Sequence[str] = ()):
    where = _existing(root, path)
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{where}: not valid JSON ({e})") from e
    missing = [f for f in fields if not isinstance(content, dict) or f not in content]
    if missing:
        raise DatasetError(f"{where}: missing field {', '.join(map(repr, missing))}")
    return content


def _npy_header(root: Path, path: Path, expected: tuple | None = None, expected_dtype=None,
                source: str = "") -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a .npy header, without reading the data. Fails on a truncated file, or
    on a shape or dtype other than ``expected`` (None: any size) and ``expected_dtype``, from ``source``."""
    where = _existing(root, path)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            shape, fortran_order, dtype = readers[np.lib.format.read_magic(f)](f)
            data_offset = f.tell()
    except (ValueError, KeyError) as e:
        raise DatasetError(f"{where}: not a readable .npy file ({e})") from e
    if fortran_order or dtype.hasobject:
        raise DatasetError(f"{where}: dtype {dtype}: must be a C-order array of plain numbers")
    promised = data_offset + int(np.prod(shape)) * dtype.itemsize
    if path.stat().st_size < promised:
        raise DatasetError(f"{where}: truncated: {path.stat().st_size} bytes, its header {shape} {dtype} "
                           f"promises {promised}")
    expected = shape if expected is None else expected
    expected_dtype = dtype if expected_dtype is None else np.dtype(expected_dtype)
    fits = len(shape) == len(expected) and all(e in (None, n) for e, n in zip(expected, shape))
    if not fits or dtype != expected_dtype:
        pattern = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise DatasetError(f"{where}: {dtype} {shape} differs from {expected_dtype} {pattern} ({source})")
    return tuple(shape), dtype


def _read_mask(root: Path, path: Path, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    where = _existing(root, path)
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError) as e:
        raise DatasetError(f"{where}: not a readable NIfTI file ({e})") from e
    if image.shape != shape:
        raise DatasetError(f"{where}: shape {image.shape} differs from subject.json native_shape {list(shape)}")
    if not np.allclose(image.affine, affine, atol=_AFFINE_ATOL):
        raise DatasetError(f"{where}: affine {image.affine.round(4).tolist()} differs from subject.json affine")
    return data > 0


def _read_trials(root: Path, path: Path, n_trials: int, n_sessions: int, n_stimuli: int) -> Trials:
    where = _existing(root, path)
    try:
        with np.load(path) as npz:
            stored = {name: npz[name] for name in TRIAL_DTYPES if name in npz.files}
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(f"{where}: not a readable .npz file ({e})") from e
    bad = [n for n in TRIAL_DTYPES if n not in stored or stored[n].ndim != 1 or stored[n].dtype.kind not in "iu"]
    if bad:
        raise DatasetError(f"{where}: field {bad[0]!r} is missing or not a 1-D integer array")
    lengths = {name: len(a) for name, a in stored.items()}
    if set(lengths.values()) != {n_trials}:
        raise DatasetError(f"{where}: array lengths {lengths} differ from each other or from subject.json "
                           f"n_trials {n_trials}")
    for name, high in (("session", n_sessions), ("stimulus", n_stimuli), ("row", None), ("repeat", None)):
        values = stored[name]
        bad = np.flatnonzero(values < 0 if high is None else (values < 0) | (values >= high))
        if len(bad):
            bound = "[0, inf)" if high is None else f"[0, {high})"
            raise DatasetError(f"{where}: {name} {values[bad[0]]} at trial {bad[0]} is outside {bound}")
    return Trials(**{name: stored[name].astype(dtype) for name, dtype in TRIAL_DTYPES.items()})


def _check_betas(root: Path, path: Path, n_voxels: int, dtype: str, rows_used: int, check_values: bool):
    shape, stored_dtype = _npy_header(root, path, (None, n_voxels), dtype, "subject.json n_voxels, betas_dtype")
    where = _existing(root, path)
    if shape[0] < rows_used:
        raise DatasetError(f"{where}: {shape[0]} rows, but trials.npz row points at row {rows_used - 1}")
    if check_values and stored_dtype.kind == "f":
        betas = np.load(path, mmap_mode="r")
        for start in range(0, shape[0], _SCAN_ROWS):
            if len(bad := np.flatnonzero(~np.isfinite(betas[start:start + _SCAN_ROWS]).all(axis=1))):
                raise DatasetError(f"{where}: NaN or inf in row {start + bad[0]}")


def _open_subject(root: Path, name: str, n_stimuli: int, check_values: bool) -> Subject:
    folder = root / "subjects" / name
    info = _read_json(root, folder / "subject.json", SUBJECT_FIELDS)
    shape, affine = tuple(int(n) for n in info["native_shape"]), np.asarray(info["affine"], np.float64)
    if len(shape) != 3 or affine.shape != (4, 4) or info["betas_dtype"] not in BETAS_DTYPES:
        raise DatasetError(f"subjects/{name}/subject.json: native_shape must hold 3 sizes, affine be 4 x 4 and "
                           f"betas_dtype one of {BETAS_DTYPES}")
    nsdgeneral = _read_mask(root, folder / "nsdgeneral.nii.gz", shape, affine)
    voxel_mask = _read_mask(root, folder / "voxel_mask.nii.gz", shape, affine)
    if int(voxel_mask.sum()) != info["n_voxels"]:
        raise DatasetError(f"subjects/{name}/voxel_mask.nii.gz: {int(voxel_mask.sum())} voxels > 0, subject.json "
                           f"n_voxels is {info['n_voxels']}")
    sessions = tuple(info["sessions"])
    trials = _read_trials(root, folder / "trials.npz", info["n_trials"], len(sessions), n_stimuli)
    for index, session in enumerate(sessions):
        rows = trials.row[trials.session == index]
        _check_betas(root, folder / "betas" / f"{session}.npy", info["n_voxels"], info["betas_dtype"],
                     int(rows.max()) + 1 if len(rows) else 0, check_values)
    return Subject(name, shape, affine, int(info["n_voxels"]), sessions, float(info["betas_scale"]),
                   int(info["mask_dilation"]), voxel_mask, nsdgeneral, trials)


def _read_split(root: Path, n_stimuli: int) -> dict[str, np.ndarray]:
    info = _read_json(root, root / "split.json", ("train", "test", "rule"))
    split = {part: np.asarray(info[part], np.int32) for part in ("train", "test")}
    for part, ids in split.items():
        if len(bad := np.flatnonzero((ids < 0) | (ids >= n_stimuli))):
            raise DatasetError(f"split.json: {part} holds stimulus {ids[bad[0]]}, outside [0, {n_stimuli})")
    shared = np.intersect1d(split["train"], split["test"])
    if len(shared):
        raise DatasetError(f"split.json: stimulus {shared[0]} is in both train and test")
    return split


def _read_instructions(root: Path, n_stimuli: int) -> list[dict]:
    """instructions/conversations.jsonl, checked line by line against instructions/instructions.json."""
    info = _read_json(root, root / "instructions" / "instructions.json", ("source", "n_conversations"))
    where = _existing(root, root / "instructions" / "conversations.jsonl")
    records = []
    with open(root / where) as f:
        for line_number, line in enumerate(f, start=1):
            at = f"{where} line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{at}: not valid JSON ({e})") from e
            if not isinstance(record, dict) or set(record) != set(INSTRUCTION_FIELDS):
                raise DatasetError(f"{at}: expected exactly the fields {INSTRUCTION_FIELDS}")
            if not isinstance(record["stimulus"], int) or not 0 <= record["stimulus"] < n_stimuli:
                raise DatasetError(f"{at}: stimulus {record['stimulus']!r} is outside [0, {n_stimuli})")
            conversation = record["conversation"]
            try:
                check_conversation(conversation)
            except ValueError as e:
                raise DatasetError(f"{at}: conversation: {e}") from e
            first_user = conversation[int(conversation[0]["role"] == "system")]
            if conversation[-1]["role"] != "assistant" or IMAGE_PLACEHOLDER not in first_user["content"]:
                raise DatasetError(f"{at}: conversation must hold {IMAGE_PLACEHOLDER} in its first user message and "
                                   "end with an assistant message")
            records.append(record)
    if len(records) != info["n_conversations"]:
        raise DatasetError(f"{where}: {len(records)} lines, instructions/instructions.json n_conversations is "
                           f"{info['n_conversations']}")
    return records


class PreparedDataset:
    """A validated prepared dataset: root, info (dataset.json), subjects (name -> Subject, in dataset.json
    order), n_stimuli, split ("train" / "test" -> int32 stimulus ids). Betas, images and targets are
    memory-mapped and read on demand."""

    def __init__(self, root: Path, info: dict, subjects: dict[str, Subject], split: dict[str, np.ndarray],
                 captions: list[list[str]]):
        self.root, self.info, self.subjects, self.split = root, info, subjects, split
        self.n_stimuli = int(info["n_stimuli"])
        self._captions = captions
        self._memmaps: dict[tuple[str, int], np.ndarray] = {}
        self._targets: Targets | None = None
        self._instructions: list[dict] | None = None

    @classmethod
    def open(cls, root: str | Path, *, check_values: bool = True) -> PreparedDataset:
        """Opens and validates the dataset at ``root``; ``check_values=False`` skips the NaN scan of the betas."""
        root = Path(root)
        info = _read_json(root, root / "dataset.json", DATASET_FIELDS)  # missing: the writer did not finish
        if (info["format"], info["version"]) != (FORMAT, VERSION):
            raise DatasetError(f"dataset.json: format {info['format']!r} version {info['version']} is not {FORMAT!r} "
                               f"version {VERSION}")
        n_stimuli = int(info["n_stimuli"])
        _npy_header(root, root / "stimuli" / "images.npy", (n_stimuli, *info["image_shape"]), np.uint8,
                    "dataset.json n_stimuli, image_shape")
        _npy_header(root, root / "stimuli" / "source_ids.npy", (n_stimuli,), np.int64, "dataset.json n_stimuli")
        captions = _read_json(root, root / "stimuli" / "captions.json")
        if not isinstance(captions, list) or len(captions) != n_stimuli:
            raise DatasetError(f"stimuli/captions.json: expected a list of {n_stimuli} caption lists (n_stimuli)")
        split = _read_split(root, n_stimuli)
        subjects = {name: _open_subject(root, name, n_stimuli, check_values) for name in info["subjects"]}
        dataset = cls(root, info, subjects, split, captions)
        if dataset.has_targets():
            dataset.targets()
        if dataset.has_instructions():
            dataset.instructions()
        return dataset

    # Grain reads records on several threads; np.load parses the .npy header with ast.literal_eval,
    # which CPython 3.11 (3.11.7 measured) can fail when threads interleave in it: "SystemError: AST
    # constructor recursion depth mismatch". Memory maps are opened one at a time.
    _open_lock = threading.Lock()

    def betas(self, subject: str, session: int, rows: np.ndarray) -> np.ndarray:
        """``float32 [len(rows), n_voxels]``: those rows of one session's betas, times betas_scale.
        Only the pages of those rows are read; the memory maps are kept, one per session."""
        key = (subject, int(session))
        if (betas := self._memmaps.get(key)) is None:
            path = self.root / "subjects" / subject / "betas" / f"{self.subjects[subject].sessions[key[1]]}.npy"
            with self._open_lock:
                betas = self._memmaps[key] = np.load(path, mmap_mode="r")
        return betas[np.asarray(rows)].astype(np.float32) * np.float32(self.subjects[subject].betas_scale)

    def images(self) -> np.ndarray:
        """``uint8 [n_stimuli, H, W, 3]``, memory-mapped; row i is stimulus id i."""
        return np.load(self.root / "stimuli" / "images.npy", mmap_mode="r")

    def captions(self) -> list[list[str]]:
        """The captions of every stimulus, by stimulus id."""
        return self._captions

    def has_targets(self) -> bool:
        return (self.root / "targets" / "targets.json").is_file()

    def targets(self) -> Targets:
        """The CLIP and VAE targets, memory-mapped (checked once, then cached)."""
        if self._targets is None:
            folder = self.root / "targets"
            if not self.has_targets():
                raise DatasetError("targets/targets.json: missing (python -m nvl_jax.data.targets writes it)")
            info = _read_json(self.root, folder / "targets.json")
            arrays = {}
            for name, ndim in (("clip_image_embeds", 2), ("vae_latents", 4)):
                _npy_header(self.root, folder / f"{name}.npy", (self.n_stimuli,) + (None,) * (ndim - 1),
                            np.float32, "rows: dataset.json n_stimuli")
                arrays[name] = np.load(folder / f"{name}.npy", mmap_mode="r")
            self._targets = Targets(info=info, **arrays)
        return self._targets

    def has_instructions(self) -> bool:
        return (self.root / "instructions" / "instructions.json").is_file()

    def instructions(self) -> list[dict]:
        """The instruction conversations (instructions/conversations.jsonl, checked once, then cached): dicts
        ``{"id": str, "stimulus": int, "kind": str, "conversation": [{"role", "content"}, ...]}``."""
        if self._instructions is None:
            if not self.has_instructions():
                raise DatasetError("instructions/instructions.json: missing (python -m nvl_jax.data.instructions "
                                   "writes it)")
            self._instructions = _read_instructions(self.root, self.n_stimuli)
        return self._instructions

    def __getstate__(self) -> dict:
        # A pickled np.memmap carries its whole array: worker processes map the files again instead.
        return {**self.__dict__, "_memmaps": {}, "_targets": None, "_instructions": None}

    def __repr__(self) -> str:
        return f"PreparedDataset(root={str(self.root)!r}, subjects={list(self.subjects)}, n_stimuli={self.n_stimuli})"


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix), renamed to ``path`` only when the block completes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".partial-{path.name}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _save_npy(path: Path, array: np.ndarray):
    with _atomic(path) as partial, open(partial, "wb") as f:
        np.save(f, array)


def save_json(path: Path, content, indent: int | None = 1):
    """Writes ``content`` as JSON to ``path``, which appears only when complete."""
    with _atomic(path) as partial:
        partial.write_text(json.dumps(content, indent=indent) + "\n")


class DatasetWriter:
    """Writes a prepared dataset piece by piece; ``finish`` writes dataset.json and validates the result.
    A file appears under its final name only when complete: a preparer resumes by skipping ``has_session``."""

    def __init__(self, root: str | Path, source: str, image_shape: Sequence[int]):
        self.root, self.source = Path(root), source
        self.image_shape = tuple(int(n) for n in image_shape)
        # While being (re)written the folder must not pass for a finished dataset.
        (self.root / "dataset.json").unlink(missing_ok=True)

    def write_stimuli(self, images, captions: Sequence[Sequence[str]], source_ids: Sequence[int]):
        """images ``uint8 [n_stimuli, H, W, 3]``: any array that slices (numpy, memmap, h5py), copied in chunks."""
        n = len(images)
        if tuple(images.shape[1:]) != self.image_shape or images.dtype != np.uint8 or n != len(captions):
            raise ValueError(f"images must be uint8 [n, *{self.image_shape}] with n caption lists, got "
                             f"{images.dtype} {tuple(images.shape)} and {len(captions)} caption lists")
        with _atomic(self.root / "stimuli" / "images.npy") as partial:
            stored = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(n, *self.image_shape))
            for start in range(0, n, 1024):
                stored[start:start + 1024] = images[start:start + 1024]
            stored.flush()
        _save_npy(self.root / "stimuli" / "source_ids.npy", np.asarray(source_ids, np.int64))
        save_json(self.root / "stimuli" / "captions.json", [list(c) for c in captions], indent=None)

    def write_subject(self, name: str, nsdgeneral: np.ndarray, voxel_mask: np.ndarray, affine: np.ndarray,
                      sessions: Sequence[str], betas_dtype: str, betas_scale: float, mask_dilation: int):
        """The masks ``[X, Y, Z]`` (> 0 inside; voxel_mask must contain nsdgeneral) and subject.json."""
        nsdgeneral, voxel_mask = np.asarray(nsdgeneral) > 0, np.asarray(voxel_mask) > 0
        affine = np.asarray(affine, np.float64)
        if (nsdgeneral.ndim != 3 or nsdgeneral.shape != voxel_mask.shape or (nsdgeneral & ~voxel_mask).any()
                or betas_dtype not in BETAS_DTYPES or not sessions or len(set(sessions)) != len(sessions)):
            raise ValueError(f"{name}: the masks must share one 3-D grid, voxel_mask contain nsdgeneral, "
                             f"betas_dtype be one of {BETAS_DTYPES} and sessions unique")
        folder = self.root / "subjects" / name
        for file, mask in (("nsdgeneral.nii.gz", nsdgeneral), ("voxel_mask.nii.gz", voxel_mask)):
            with _atomic(folder / file) as partial:
                nib.save(nib.Nifti1Image(mask.astype(np.int16), affine), partial)
        # n_trials is added by write_trials, so a subject without trials fails validation by name.
        save_json(folder / "subject.json", {
            "native_shape": list(nsdgeneral.shape), "affine": affine.tolist(), "n_voxels": int(voxel_mask.sum()),
            "mask_dilation": int(mask_dilation), "betas_dtype": betas_dtype, "betas_scale": float(betas_scale),
            "sessions": list(sessions)})

    def _subject_info(self, subject: str) -> dict:
        return json.loads((self.root / "subjects" / subject / "subject.json").read_text())

    def has_session(self, subject: str, session: str) -> bool:
        """Whether the session's betas file is complete on disk (files appear only when whole)."""
        return (self.root / "subjects" / subject / "betas" / f"{session}.npy").is_file()

    def write_session(self, subject: str, session: str, betas: np.ndarray):
        """betas ``[n_trials_in_session, n_voxels]`` in subject.json's betas_dtype."""
        info, betas = self._subject_info(subject), np.asarray(betas)
        if (session not in info["sessions"] or betas.ndim != 2 or betas.shape[1] != info["n_voxels"]
                or betas.dtype != np.dtype(info["betas_dtype"])):
            raise ValueError(f"{subject}/{session}: betas must be {info['betas_dtype']} [n, {info['n_voxels']}] of "
                             f"a session in {info['sessions']}, got {betas.dtype} {betas.shape}")
        _save_npy(self.root / "subjects" / subject / "betas" / f"{session}.npy", betas)

    def write_trials(self, subject: str, trials: Trials):
        """trials.npz, and n_trials in subject.json."""
        arrays = {name: np.asarray(getattr(trials, name), dtype) for name, dtype in TRIAL_DTYPES.items()}
        folder = self.root / "subjects" / subject
        with _atomic(folder / "trials.npz") as partial, open(partial, "wb") as f:
            np.savez(f, **arrays)
        save_json(folder / "subject.json", {**self._subject_info(subject), "n_trials": len(arrays["session"])})

    def write_split(self, train: Sequence[int], test: Sequence[int], rule: str):
        """split.json: train and test stimulus ids and the rule that chose them."""
        save_json(self.root / "split.json", {"train": sorted(map(int, train)), "test": sorted(map(int, test)),
                                              "rule": rule}, indent=None)

    def finish(self, subjects: Sequence[str]) -> PreparedDataset:
        """Writes dataset.json and opens (so validates) the result; a dataset that fails loses dataset.json."""
        shape, _ = _npy_header(self.root, self.root / "stimuli" / "images.npy")
        save_json(self.root / "dataset.json", {
            "format": FORMAT, "version": VERSION, "source": self.source, "subjects": list(subjects),
            "n_stimuli": shape[0], "image_shape": list(self.image_shape)})
        try:
            return PreparedDataset.open(self.root)
        except DatasetError:
            (self.root / "dataset.json").unlink()
            raise


def write_targets(root: str | Path, clip_image_embeds: np.ndarray, vae_latents: np.ndarray, info: dict):
    """targets/: clip_image_embeds ``[n_stimuli, clip_dim]``, vae_latents ``[n_stimuli, h, w, c]`` (float32),
    and targets.json last, so ``has_targets`` is true only for a complete set (``open`` checks the rows)."""
    folder = Path(root) / "targets"
    (folder / "targets.json").unlink(missing_ok=True)
    _save_npy(folder / "clip_image_embeds.npy", np.asarray(clip_image_embeds, np.float32))
    _save_npy(folder / "vae_latents.npy", np.asarray(vae_latents, np.float32))
    save_json(folder / "targets.json", info)


def write_instructions(root: str | Path, records: Sequence[dict], info: dict):
    """instructions/: conversations.jsonl (one record per line, see ``PreparedDataset.instructions``) and
    instructions.json (``info`` plus n_conversations) last, so ``has_instructions`` means complete."""
    folder = Path(root) / "instructions"
    (folder / "instructions.json").unlink(missing_ok=True)
    with _atomic(folder / "conversations.jsonl") as partial, open(partial, "w") as f:
        for record in records:
            f.write(json.dumps({name: record[name] for name in INSTRUCTION_FIELDS}) + "\n")
    save_json(folder / "instructions.json", {**info, "n_conversations": len(records)})
