"""The preparer's own files in the output folder, and ``--verify``.

- ``prepare.json``: the command's arguments, written first; a folder prepared with other
  output-deciding arguments is refused rather than resumed into.
- ``checksums.json``: the sha256 of every file the preparer wrote (written just before
  ``dataset.json``, so a finished dataset always has them).
"""

from __future__ import annotations

from collections.abc import Sequence
import hashlib
import json
from pathlib import Path

from tqdm.auto import tqdm

from nvl_jax.data.format import DatasetError, PreparedDataset, save_json
from nvl_jax.data.nsd.layout import NSDError

RECORD = "prepare.json"
SUMMARY = "summary.json"
CHECKSUMS = "checksums.json"
OBJECTS = "stimuli/objects.json"
# prepare.json fields that decide the output; the input paths are kept for provenance only, so a
# moved NSD mirror can still finish a run.
OUTPUT_ARGUMENTS = ("subjects", "sessions", "format", "trials_per_session", "dilation", "coco_instances")
# What an output argument was before prepare.json recorded it.
_UNRECORDED = {"coco_instances": False}


def claim(out: Path, record: dict) -> bool:
    """Makes ``out`` this command's folder (new, empty, or prepared with the same output arguments) and
    records ``record`` there; returns whether the dataset there is already finished."""
    path = out / RECORD
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise NSDError(f"{path}: not valid JSON ({e}); delete {out} to start over") from e
        previous = {**_UNRECORDED, **previous}
        differ = [k for k in OUTPUT_ARGUMENTS if previous.get(k) != record[k]]
        if differ:
            then = ", ".join(f"--{k} {previous.get(k)}" for k in differ)
            now = ", ".join(f"--{k} {record[k]}" for k in differ)
            raise NSDError(f"{path}: this folder was prepared with {then}, not {now}; rerun with the same arguments "
                           "to resume, or choose another --out")
        return (out / "dataset.json").is_file()
    if out.exists() and any(out.iterdir()):
        raise NSDError(f"{out}: not empty and holds no {RECORD}, so it is no folder this command started; choose a "
                       "new or empty --out")
    out.mkdir(parents=True, exist_ok=True)
    save_json(path, record)
    return False


def dataset_files(subjects: dict[str, Sequence[str]], with_objects: bool = False) -> list[str]:
    """The files the preparer writes before summary.json, relative to the output folder; ``subjects``:
    name -> session names; ``with_objects``: stimuli/objects.json too."""
    files = [RECORD, "split.json", "stimuli/images.npy", "stimuli/source_ids.npy", "stimuli/captions.json"]
    files += [OBJECTS] * with_objects
    for name, sessions in subjects.items():
        files += [f"subjects/{name}/{file}" for file in ("subject.json", "nsdgeneral.nii.gz", "voxel_mask.nii.gz",
                                                         "trials.npz")]
        files += [f"subjects/{name}/betas/{session}.npy" for session in sessions]
    return files


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(out: Path, files: Sequence[str], progress: bool = True) -> None:
    """checksums.json: ``{"algorithm": "sha256", "files": {relative path: hex digest}}``."""
    digests = {file: sha256(out / file) for file in tqdm(files, desc="checksums", unit="file", disable=not progress)}
    save_json(out / CHECKSUMS, {"algorithm": "sha256", "files": digests})


def verify(out: Path, progress: bool = True) -> tuple[bool, str]:
    """Re-reads a prepared dataset: ``PreparedDataset.open`` with the NaN / inf scan, then every file's
    sha256 against checksums.json. Returns ``(ok, report)``."""
    lines, problems = [f"verify {out}:"], 0
    try:
        dataset = PreparedDataset.open(out, check_values=True)
        lines.append(f"  format: valid ({len(dataset.subjects)} subjects, {dataset.n_stimuli} stimuli, "
                     f"{len(dataset.split['test'])} test; betas scanned for NaN / inf)")
    except DatasetError as e:
        problems += 1
        lines.append(f"  format: {e}")
    try:
        recorded = json.loads((out / CHECKSUMS).read_text())["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        problems += 1
        lines.append(f"  {CHECKSUMS}: unreadable or missing ({type(e).__name__}: {e}); the preparation did not "
                     "finish: rerun its command")
        recorded = {}
    mismatched = 0
    for file, digest in tqdm(recorded.items(), desc="verify", unit="file", disable=not progress):
        if not (out / file).is_file():
            mismatched += 1
            lines.append(f"  {file}: missing (listed in {CHECKSUMS})")
        elif (found := sha256(out / file)) != digest:
            mismatched += 1
            lines.append(f"  {file}: sha256 {found} differs from {CHECKSUMS}'s {digest}")
    if recorded:
        lines.append(f"  {CHECKSUMS}: {len(recorded) - mismatched} of {len(recorded)} files match")
    problems += mismatched
    lines.append("  OK" if not problems else f"  FAILED: {problems} problem{'s' * (problems != 1)}")
    return not problems, "\n".join(lines)
