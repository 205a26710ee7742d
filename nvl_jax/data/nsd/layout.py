"""Where the Natural Scenes Dataset's files lie (as on s3://natural-scenes-dataset/), and COCO's captions.

Paths are relative to the NSD root, the folder that mirrors the bucket. Subjects are NSD's
numbers 1..8 (``subj01``), sessions 1-based as in NSD's file names (``betas_session01``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

BETAS = "nsddata_betas/ppdata/{subject}/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session{session:02d}{suffix}"
NSDGENERAL = "nsddata/ppdata/{subject}/func1pt8mm/roi/nsdgeneral.nii.gz"
EXPDESIGN = "nsddata/experiments/nsd/nsd_expdesign.mat"
STIM_INFO = "nsddata/experiments/nsd/nsd_stim_info_merged.csv"
STIMULI = "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
BETAS_SUFFIXES = {"nifti": ".nii.gz", "hdf5": ".hdf5"}
COCO_SPLITS = ("train2017", "val2017")
# nsdgeneral's voxel counts on the 1.8 mm grids, subj01..subj08: the summary compares against them.
NSDGENERAL_VOXELS = {1: 15724, 2: 14278, 3: 15226, 4: 13153, 5: 13039, 6: 17907, 7: 12682, 8: 14386}


class NSDError(ValueError):
    """An input that is missing or not as NSD ships it, or an output folder that cannot be resumed.
    The message names the file, what was expected and what was found."""


def subject_name(subject: int) -> str:
    """``subj01`` for subject 1: NSD's folder names, and the prepared dataset's subject names."""
    return f"subj{subject:02d}"


def session_name(session: int) -> str:
    """``session01`` for NSD's session 1: the prepared dataset's betas file names."""
    return f"session{session:02d}"


def require(path: Path, what: str) -> Path:
    """``path`` if it is a file; otherwise an NSDError naming it and what it should hold."""
    if not path.is_file():
        raise NSDError(f"{path}: missing (expected {what})")
    return path


@dataclasses.dataclass(frozen=True)
class NSDLayout:
    """The input files under ``root`` (the local mirror of the NSD bucket)."""

    root: Path

    def betas(self, subject: int, session: int, betas_format: str) -> Path:
        return self.root / BETAS.format(subject=subject_name(subject), session=session,
                                        suffix=BETAS_SUFFIXES[betas_format])

    def nsdgeneral(self, subject: int) -> Path:
        return self.root / NSDGENERAL.format(subject=subject_name(subject))

    @property
    def expdesign(self) -> Path:
        return self.root / EXPDESIGN

    @property
    def stim_info(self) -> Path:
        return self.root / STIM_INFO

    @property
    def stimuli(self) -> Path:
        return self.root / STIMULI


def coco_annotations(coco_dir: Path, kind: str, coco_split: str) -> Path:
    """``<kind>_<split>.json`` (kind: captions, instances) under ``coco_dir/annotations/`` (as the COCO zip
    unpacks) or ``coco_dir/``."""
    candidates = [coco_dir / "annotations" / f"{kind}_{coco_split}.json", coco_dir / f"{kind}_{coco_split}.json"]
    for path in candidates:
        if path.is_file():
            return path
    raise NSDError(f"{candidates[0]}: missing (nor is there {candidates[1]}); expected COCO 2017's {kind} "
                   f"annotations, from annotations_trainval2017.zip")


def coco_captions(coco_dir: Path, coco_split: str) -> Path:
    """COCO's caption annotations of one split (see ``coco_annotations``)."""
    return coco_annotations(coco_dir, "captions", coco_split)
