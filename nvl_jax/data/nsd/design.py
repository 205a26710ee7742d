"""Who saw which image when: NSD's experimental design -> each subject's trials, and the train / test split.

``nsd_expdesign.mat`` (1-based, as MATLAB writes it): ``masterordering [1, 30000]``, trial t shows
the subject's image ``masterordering[t]`` (a column of its ``subjectim`` row); ``subjectim [8, 10000]``,
each subject's images as 73k ids; ``sharedix [1, 1000]``, the 73k ids of the shared images.
``nsd_stim_info_merged.csv``: per 73k id (``nsdId``, 0-based) its COCO image (``cocoId``,
``cocoSplit``), the ``shared1000`` flag, which must agree with ``sharedix``, and the ``cropBox``
(fractions of the COCO image cut from its top, bottom, left and right; read when the column exists).
"""

from __future__ import annotations

from collections.abc import Sequence
import csv
import dataclasses
from pathlib import Path

import numpy as np
import scipy.io

from nvl_jax.data.nsd.layout import COCO_SPLITS, NSDError, require

STIM_INFO_COLUMNS = ("nsdId", "cocoId", "cocoSplit", "shared1000")
_FLAGS = {"true": True, "1": True, "false": False, "0": False}


@dataclasses.dataclass(frozen=True)
class Design:
    """nsd_expdesign.mat made 0-based: masterordering ``int64 [n_trials]`` (column of subjectim),
    subjectim ``int64 [8, n_images]`` (73k ids), shared ``int64 [n_shared]`` (sorted 73k ids, from sharedix)."""

    path: Path
    masterordering: np.ndarray
    subjectim: np.ndarray
    shared: np.ndarray


def load_design(path: Path) -> Design:
    require(path, "NSD's experimental design, nsd_expdesign.mat")
    try:
        mat = scipy.io.loadmat(path, variable_names=("masterordering", "subjectim", "sharedix"))
    # NotImplementedError: loadmat's answer to a MATLAB v7.3 (HDF5-based) file; NSD ships v5.
    except (ValueError, OSError, NotImplementedError, scipy.io.matlab.MatReadError) as e:
        raise NSDError(f"{path}: not a readable MATLAB file ({type(e).__name__}: {e})") from e
    missing = [name for name in ("masterordering", "subjectim", "sharedix") if name not in mat]
    if missing:
        raise NSDError(f"{path}: missing variable {', '.join(missing)} (expected masterordering, subjectim, sharedix)")
    masterordering = np.asarray(mat["masterordering"]).astype(np.int64).ravel()
    subjectim = np.asarray(mat["subjectim"]).astype(np.int64)
    sharedix = np.asarray(mat["sharedix"]).astype(np.int64).ravel()
    if subjectim.ndim != 2 or subjectim.min(initial=1) < 1 or sharedix.min(initial=1) < 1:
        raise NSDError(f"{path}: subjectim must be [subjects, images] and it and sharedix hold 1-based 73k ids; "
                       f"found subjectim {subjectim.shape}, smallest ids {subjectim.min(initial=1)}, "
                       f"{sharedix.min(initial=1)}")
    if masterordering.min(initial=1) < 1 or masterordering.max(initial=1) > subjectim.shape[1]:
        raise NSDError(f"{path}: masterordering must hold 1-based columns of subjectim, 1..{subjectim.shape[1]}; "
                       f"found {masterordering.min()}..{masterordering.max()}")
    return Design(path, masterordering - 1, subjectim - 1, np.unique(sharedix - 1))


def presented(design: Design, subject: int, n_trials: int) -> np.ndarray:
    """``int64 [n_trials]``: the 73k id shown at each of the subject's first ``n_trials`` trials."""
    if n_trials > len(design.masterordering):
        raise NSDError(f"{design.path}: masterordering holds {len(design.masterordering)} trials, the sessions "
                       f"asked for need {n_trials}")
    if subject > len(design.subjectim):
        raise NSDError(f"{design.path}: subjectim has {len(design.subjectim)} subjects, no subject {subject}")
    return design.subjectim[subject - 1, design.masterordering[:n_trials]]


def split(seen: Sequence[np.ndarray], shared: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` sorted 73k ids, from each subject's presented ids ``seen``: test holds the shared
    images every subject saw, train every other image any subject saw."""
    test = shared
    for ids in seen:
        test = np.intersect1d(test, ids)
    return np.setdiff1d(np.concatenate(seen), test), test


@dataclasses.dataclass(frozen=True)
class StimInfo:
    """nsd_stim_info_merged.csv by 73k id: coco_id ``int64 [n]`` (-1: no row), coco_split ``str [n]``,
    shared1000 ``bool [n]``, crop_box ``float64 [n, 4]`` (top, bottom, left, right; NaN without the column)."""

    path: Path
    coco_id: np.ndarray
    coco_split: np.ndarray
    shared1000: np.ndarray
    crop_box: np.ndarray

    def coco_images(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(coco_id int64 [n], coco_split str [n])`` of the 73k ``ids``."""
        listed = ids < len(self.coco_id)
        known = np.zeros(len(ids), bool)
        known[listed] = self.coco_id[ids[listed]] >= 0
        if not known.all():
            raise NSDError(f"{self.path}: no row with nsdId {ids[~known][0]} (expected a row per 73k id)")
        return self.coco_id[ids], self.coco_split[ids]


def load_stim_info(path: Path) -> StimInfo:
    require(path, "NSD's stimulus information, nsd_stim_info_merged.csv")
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in STIM_INFO_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise NSDError(f"{path}: missing column {', '.join(missing)} (expected {', '.join(STIM_INFO_COLUMNS)}; "
                           f"found {reader.fieldnames})")
        has_crop = "cropBox" in (reader.fieldnames or ())
        for row in reader:
            try:
                crop = [float(v) for v in row["cropBox"].strip("()[] ").split(",")] if has_crop else [np.nan] * 4
                if len(crop) != 4:
                    raise ValueError(f"cropBox holds {len(crop)} numbers")
                rows.append((int(row["nsdId"]), int(row["cocoId"]), row["cocoSplit"],
                             _FLAGS[row["shared1000"].strip().lower()], crop))
            except (ValueError, KeyError) as e:
                raise NSDError(f"{path}, line {reader.line_num}: expected integer nsdId and cocoId, a True/False "
                               f"shared1000 and a cropBox of 4 numbers, found {row}") from e
    bad = [row[2] for row in rows if row[2] not in COCO_SPLITS]
    if bad or not rows:
        raise NSDError(f"{path}: cocoSplit must be one of {COCO_SPLITS} in every row; found "
                       f"{bad[0] if bad else 'no rows'}")
    nsd_id = np.array([r[0] for r in rows])
    size = int(nsd_id.max()) + 1
    coco_id, coco_split, shared1000 = np.full(size, -1, np.int64), np.full(size, "", object), np.zeros(size, bool)
    coco_id[nsd_id] = [r[1] for r in rows]
    coco_split[nsd_id] = [r[2] for r in rows]
    shared1000[nsd_id] = [r[3] for r in rows]
    crop_box = np.full((size, 4), np.nan)
    crop_box[nsd_id] = [r[4] for r in rows]
    return StimInfo(path, coco_id, coco_split, shared1000, crop_box)


def check_shared(design: Design, info: StimInfo) -> None:
    """The CSV's shared1000 flags must mark exactly the images of sharedix."""
    flagged = np.flatnonzero(info.shared1000)
    if not np.array_equal(flagged, design.shared):
        differ = np.setxor1d(flagged, design.shared)
        raise NSDError(f"{info.path}: shared1000 flags {len(flagged)} images, {design.path} sharedix lists "
                       f"{len(design.shared)}; they differ, e.g. at 73k id {differ[0]}")
