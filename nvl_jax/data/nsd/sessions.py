"""One subject's mask and one session's betas: load, check, keep the mask's voxels, z-score, write.

NSD's betas are int16 percent signal change x 300: ``X x Y x Z x trials`` as nibabel reads the
``.nii.gz``, ``trials x Z x Y x X`` as h5py reads the ``.hdf5`` (transposed here). Stored betas
hold the voxels where the voxel mask is > 0, in C order of the ``X, Y, Z`` mask
(docs/data_format.md), z-scored per voxel with the mean and std of the session's training trials.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
import zlib

import h5py
import nibabel as nib
import numpy as np
import scipy.ndimage

from nvl_jax.data.format import DatasetWriter
from nvl_jax.data.nsd.layout import NSDError, require

NSD_BETAS_SCALE = 300  # int16 betas = percent signal change x 300
# HDF5 trials per read: a few hundred MB at most at NSD's grids instead of the whole ~1 GB session.
_HDF5_TRIALS_PER_READ = 64
# What nibabel raises on a truncated or garbled .nii.gz, at load or when the data is read.
_NIFTI_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError,
                 nib.spatialimages.HeaderDataError)


def load_mask(path: Path, dilation: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(nsdgeneral bool [X, Y, Z], voxel_mask bool [X, Y, Z], affine [4, 4])``.

    nsdgeneral is strictly > 0 (NSD marks outside-brain voxels -1); the voxel mask is nsdgeneral
    dilated ``dilation`` times with the 6-neighbour cross (scipy.ndimage.binary_dilation).
    """
    require(path, "the subject's nsdgeneral ROI, nsdgeneral.nii.gz")
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj)
    except _NIFTI_ERRORS as e:
        raise NSDError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    if data.ndim != 3 or not (data > 0).any():
        raise NSDError(f"{path}: expected a 3-D ROI with voxels > 0, found shape {data.shape} with "
                       f"{int((data > 0).sum())} voxels > 0")
    nsdgeneral = data > 0
    voxel_mask = scipy.ndimage.binary_dilation(nsdgeneral, iterations=dilation) if dilation else nsdgeneral.copy()
    return nsdgeneral, voxel_mask, np.asarray(image.affine, np.float64)


def _check_session(path: Path, grid: tuple[int, ...], n_trials: int, dtype: np.dtype, mask: np.ndarray,
                   trials_per_session: int, mask_path: Path, layout: str) -> None:
    if grid != mask.shape:
        raise NSDError(f"{path}: grid {grid} ({layout}) differs from the nsdgeneral grid {mask.shape} of {mask_path}")
    if n_trials != trials_per_session:
        raise NSDError(f"{path}: {n_trials} trials, expected {trials_per_session} (--trials_per_session)")
    if dtype != np.int16:
        raise NSDError(f"{path}: dtype {dtype}, expected int16 (NSD's percent signal change x 300)")


def _read_nifti(path: Path, mask: np.ndarray, trials_per_session: int, mask_path: Path) -> np.ndarray:
    try:
        image = nib.load(path)
    except _NIFTI_ERRORS as e:
        raise NSDError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    if len(image.shape) != 4:
        raise NSDError(f"{path}: shape {image.shape}, expected 4-D X x Y x Z x trials")
    _check_session(path, image.shape[:3], image.shape[3], image.get_data_dtype(), mask, trials_per_session,
                   mask_path, "X x Y x Z")
    if (image.dataobj.slope, image.dataobj.inter) != (1.0, 0.0):
        raise NSDError(f"{path}: the header scales the int16 values (scl_slope {image.dataobj.slope}, scl_inter "
                       f"{image.dataobj.inter}); expected plain int16 as NSD ships them")
    try:
        # The whole session (~1 GB at subj01's grid): gzip cannot seek, so reading it in parts costs more.
        data = np.asarray(image.dataobj)
    except _NIFTI_ERRORS as e:
        raise NSDError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    return np.ascontiguousarray(data[mask].T)  # [trials, n_voxels], rows contiguous as the betas file stores them


def _read_hdf5(path: Path, mask: np.ndarray, trials_per_session: int, mask_path: Path) -> np.ndarray:
    try:
        with h5py.File(path, "r") as file:
            betas = file.get("betas")
            if not isinstance(betas, h5py.Dataset) or betas.ndim != 4:
                found = f"shape {betas.shape}" if isinstance(betas, h5py.Dataset) else f"entries {list(file)}"
                raise NSDError(f"{path}: expected dataset betas, 4-D trials x Z x Y x X; found {found}")
            _check_session(path, betas.shape[:0:-1], betas.shape[0], betas.dtype, mask, trials_per_session,
                           mask_path, "X x Y x Z from the HDF5's trials x Z x Y x X")
            selected = np.empty((betas.shape[0], int(mask.sum())), np.int16)
            for start in range(0, betas.shape[0], _HDF5_TRIALS_PER_READ):
                block = betas[start:start + _HDF5_TRIALS_PER_READ]  # [k, Z, Y, X]
                selected[start:start + len(block)] = block.transpose(0, 3, 2, 1)[:, mask]
            return selected
    except (OSError, KeyError) as e:
        raise NSDError(f"{path}: not a readable HDF5 file ({type(e).__name__}: {e})") from e


def read_betas(path: Path, betas_format: str, mask: np.ndarray, trials_per_session: int,
               mask_path: Path) -> np.ndarray:
    """``int16 [trials, n_voxels]``: one session's betas at the voxels of ``mask`` (bool ``[X, Y, Z]``, read
    from ``mask_path``), checked: the file exists and reads, its grid is the mask's, it holds
    ``trials_per_session`` trials of int16."""
    require(path, f"NSD betas ({betas_format}) of this session")
    reader = _read_nifti if betas_format == "nifti" else _read_hdf5
    return reader(path, mask, trials_per_session, mask_path)


def zscore(betas: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
    """``float16 [trials, n_voxels]``: ``betas`` (int16, x 300) in percent signal change, minus the mean and
    over the std of the rows ``train_rows`` (bool ``[trials]``) per voxel; a voxel with std 0 gets std 1.
    Test trials stay out of the statistics, so nothing about them leaks into training."""
    values = betas.astype(np.float32) / np.float32(NSD_BETAS_SCALE)
    train = values[train_rows]
    mean, std = train.mean(axis=0, dtype=np.float64), train.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    with np.errstate(over="ignore"):  # an overflow to inf is reported by the caller, with the file
        return ((values - mean) / std).astype(np.float16)


@dataclasses.dataclass(frozen=True)
class SessionJob:
    """One session to prepare: read ``path``, write ``session`` of ``subject`` through ``writer``.

    voxel_mask: bool ``[X, Y, Z]`` (from ``mask_path``); train_rows: bool ``[trials_per_session]``,
    the rows that are training trials.
    """

    writer: DatasetWriter
    subject: str
    session: str
    path: Path
    betas_format: str
    voxel_mask: np.ndarray
    mask_path: Path
    train_rows: np.ndarray
    trials_per_session: int


def prepare_session(job: SessionJob) -> None:
    """Reads, checks and z-scores one session and writes its betas (float16, betas_scale 1)."""
    betas = read_betas(job.path, job.betas_format, job.voxel_mask, job.trials_per_session, job.mask_path)
    if not job.train_rows.any():
        raise NSDError(f"{job.path}: none of its {len(job.train_rows)} trials is a training trial, so there are no "
                       "statistics to z-score it with")
    zscored = zscore(betas, job.train_rows)
    if len(bad := np.argwhere(~np.isfinite(zscored))):
        row, voxel = bad[0]
        # Only a voxel whose training trials hardly vary can push a test trial past float16's 65504.
        raise NSDError(f"{job.path}: z-scored beta of row {row}, voxel {voxel} is not finite in float16 "
                       f"(raw {betas[row, voxel]}); expected finite values")
    job.writer.write_session(job.subject, job.session, zscored)
