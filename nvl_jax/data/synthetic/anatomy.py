"""In-silico anatomy: NSD's native grids, a head position per subject, nsdgeneral-like masks.

Each subject's grid is NSD's 1.8 mm functional grid (scaled by ``scale``) with a
plain scanner affine centred on the grid. The brain sits in it at a seeded pose:
a small rotation and translation, and a size that follows the grid (NSD crops each
grid to its head). The mask is cut from the MNI152 2009 grey-matter template that
nilearn ships: grey matter inside a box union covering the occipital lobe and the
ventral temporal cortex, sampled through each subject's pose, so masks, like real
ones, differ in shape and place between subjects.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

# NSD's func1pt8mm grids (X, Y, Z).
NSD_GRIDS = {
    "subj01": (81, 104, 83), "subj02": (82, 106, 84), "subj03": (81, 106, 82), "subj04": (85, 99, 80),
    "subj05": (79, 97, 78), "subj06": (85, 113, 83), "subj07": (78, 95, 81), "subj08": (80, 103, 78),
}
NSD_VOXEL_MM = 1.8
GREY_MATTER_TEMPLATE = (Path(nilearn.__file__).parent / "datasets" / "data"
                        / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
# The MNI point placed at the grid centre: the middle of the brain's bounding box.
BRAIN_CENTRE_MNI = np.array([0.0, -18.0, 15.0])
# nsdgeneral-like region, as boxes in MNI mm ((x_low, x_high), (y_low, y_high), (z_low, z_high)), |x| for x:
# the occipital lobe with the posterior parietal and lateral occipital cortex, and ventral temporal cortex.
# Sized so that a 1.8 mm grid holds 13k-16k voxels, as NSD's nsdgeneral does.
VISUAL_BOXES = (((0.0, 50.0), (-112.0, -72.0), (-16.0, 36.0)),
                ((24.0, 46.0), (-72.0, -40.0), (-28.0, -8.0)))
GREY_MATTER_THRESHOLD = 0.55
HEAD_ROTATION_DEG = 3.0  # std per axis
HEAD_TRANSLATION_MM = 3.0  # std per axis


@dataclasses.dataclass(frozen=True, eq=False)
class Anatomy:
    """One subject's grid. nsdgeneral, voxel_mask ``bool [X, Y, Z]``; affine ``[4, 4]`` voxel -> scanner mm;
    voxel_mni ``float64 [n_voxels, 3]``: the MNI position of each stored voxel (C order of voxel_mask)."""

    name: str
    affine: np.ndarray
    nsdgeneral: np.ndarray
    voxel_mask: np.ndarray
    voxel_mni: np.ndarray
    scanner_to_mni: np.ndarray  # [4, 4]: the head pose

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.nsdgeneral.shape


def grid_shape(name: str, scale: float) -> tuple[int, int, int]:
    """NSD's native grid of subject ``name``, scaled (at least 8 voxels per axis)."""
    return tuple(max(8, round(n * scale)) for n in NSD_GRIDS[name])


def grid_affine(shape: tuple[int, int, int], voxel_mm: float) -> np.ndarray:
    """A scanner affine ``[4, 4]`` with isotropic voxels and the origin at the grid centre."""
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = -voxel_mm * (np.asarray(shape) - 1) / 2
    return affine


@functools.lru_cache(maxsize=4)
def grey_matter(voxel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The MNI grey-matter probability ``float32 [197, 233, 189]`` smoothed to the grid's voxel size
    (FWHM = one voxel, a partial-volume model), and its inverse affine (MNI mm -> template index)."""
    image = nib.load(GREY_MATTER_TEMPLATE)
    probability = np.asarray(image.dataobj, np.float32) / 255.0
    sigma_mm = voxel_mm / np.sqrt(8 * np.log(2))
    smoothed = ndimage.gaussian_filter(probability, sigma_mm / np.abs(np.diag(image.affine)[:3]))
    return smoothed, np.linalg.inv(image.affine)


def head_pose(shape: tuple[int, int, int], voxel_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Scanner mm -> MNI mm ``[4, 4]``: a seeded rotation and translation, scaled by the grid's size."""
    volume_ratio = np.prod(np.asarray(shape) * voxel_mm) / np.prod(np.asarray(NSD_GRIDS["subj01"]) * NSD_VOXEL_MM)
    rotation = Rotation.from_euler("xyz", rng.normal(0, HEAD_ROTATION_DEG, 3), degrees=True).as_matrix()
    translation = rng.normal(0, HEAD_TRANSLATION_MM, 3)
    pose = np.eye(4)
    pose[:3, :3] = rotation / volume_ratio ** (1 / 3)  # a larger head: fewer MNI mm per scanner mm
    pose[:3, 3] = BRAIN_CENTRE_MNI - pose[:3, :3] @ translation
    return pose


def in_visual_boxes(mni: np.ndarray) -> np.ndarray:
    """``bool [...]`` for MNI points ``[..., 3]`` inside the nsdgeneral-like region."""
    x, y, z = np.abs(mni[..., 0]), mni[..., 1], mni[..., 2]
    inside = np.zeros(mni.shape[:-1], bool)
    for (x0, x1), (y0, y1), (z0, z1) in VISUAL_BOXES:
        inside |= (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1) & (z >= z0) & (z <= z1)
    return inside


def build_anatomy(name: str, scale: float, dilation: int, rng: np.random.Generator) -> Anatomy:
    """Subject ``name``'s grid at ``scale``, its pose, nsdgeneral and the voxel mask (nsdgeneral dilated)."""
    shape, voxel_mm = grid_shape(name, scale), NSD_VOXEL_MM / scale
    affine = grid_affine(shape, voxel_mm)
    pose = head_pose(shape, voxel_mm, rng)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    mni = index @ (pose @ affine)[:3, :3].T + (pose @ affine)[:3, 3]
    probability, mni_to_template = grey_matter(voxel_mm)
    template_index = mni @ mni_to_template[:3, :3].T + mni_to_template[:3, 3]
    grey = ndimage.map_coordinates(probability, template_index.T, order=1, cval=0.0)
    nsdgeneral = ((grey >= GREY_MATTER_THRESHOLD) & in_visual_boxes(mni)).reshape(shape)
    voxel_mask = ndimage.binary_dilation(nsdgeneral, iterations=dilation) if dilation else nsdgeneral
    return Anatomy(name=name, affine=affine, nsdgeneral=nsdgeneral, voxel_mask=voxel_mask,
                   voxel_mni=mni[np.flatnonzero(voxel_mask.ravel())], scanner_to_mni=pose)
