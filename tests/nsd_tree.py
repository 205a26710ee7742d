"""A miniature Natural Scenes Dataset for tests: NSD's layout and file formats at toy sizes.

Two subjects (1 and 2) on different grids, 3 sessions of 12 trials, 40 images of 16 x 16 pixels,
six shared images. What was written is returned as plain arrays, so tests compare the prepared
output against the inputs rather than against the preparer's own logic.

The design: every subject's image list (``subjectim`` row) starts with the shared images
2, 7, 11, 19 (0-based 73k ids), then its own ten (OWN_IMAGES). Subject 1's column 5 is shared
image 23; subject 2's 23 sits in column 14, which masterordering never shows: 23 is shared, yet
only subject 1 saw it, so it belongs to train. Shared image 24 is never shown to anyone.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import scipy.io

from nvl_jax.data.nsd import layout

GRIDS = {1: (10, 12, 9), 2: (11, 12, 10)}
SESSIONS = 3
TRIALS_PER_SESSION = 12
N_IMAGES = 40
IMAGE_SHAPE = (16, 16, 3)
SHARED = (2, 7, 11, 19, 23, 24)
SEEN_SHARED_BY_ALL = (2, 7, 11, 19)
OWN_IMAGES = {1: (23, 0, 1, 3, 4, 5, 6, 8, 9, 10), 2: (12, 13, 14, 15, 16, 17, 18, 20, 21, 23)}
# Presentations of each subjectim column (1-based) over the 36 trials; column 14 is never shown.
SHOWN = {1: 3, 2: 3, 3: 3, 4: 3, 5: 2, 6: 3, 7: 3, 8: 3, 9: 3, 10: 3, 11: 3, 12: 2, 13: 2}
# One voxel of nsdgeneral whose training trials are constant in every session (std 0 -> 1).
CONSTANT_VALUE = 150


@dataclasses.dataclass
class MiniNSD:
    """root: the NSD mirror; coco: the COCO annotations folder. presented: subject -> ``int64 [36]`` 73k ids;
    betas: subject -> int16 ``[36, X, Y, Z]`` (trial-major); nsdgeneral: subject -> int16 ``[X, Y, Z]``
    (-1, 0, 1); affine: subject -> ``[4, 4]``; images ``uint8 [40, 16, 16, 3]``; captions: 73k id -> the
    expected caption list; constant_voxel: subject -> its (x, y, z)."""

    root: Path
    coco: Path
    presented: dict[int, np.ndarray]
    betas: dict[int, np.ndarray]
    nsdgeneral: dict[int, np.ndarray]
    affine: dict[int, np.ndarray]
    images: np.ndarray
    captions: dict[int, list[str]]
    constant_voxel: dict[int, tuple[int, int, int]]

    def session_path(self, subject: int, session: int, betas_format: str = "nifti") -> Path:
        return layout.NSDLayout(self.root).betas(subject, session, betas_format)

    def test_trials(self, subject: int) -> np.ndarray:
        """bool ``[36]``: trials of images every subject saw among the shared ones."""
        return np.isin(self.presented[subject], SEEN_SHARED_BY_ALL)


def write_session(tree: MiniNSD, subject: int, session: int, betas: np.ndarray, betas_format: str) -> Path:
    """Writes ``betas [trials, X, Y, Z]`` as NSD ships a session: NIfTI ``X x Y x Z x trials`` or HDF5
    dataset ``betas`` ``trials x Z x Y x X``."""
    path = tree.session_path(subject, session, betas_format)
    path.parent.mkdir(parents=True, exist_ok=True)
    if betas_format == "nifti":
        nib.save(nib.Nifti1Image(np.ascontiguousarray(betas.transpose(1, 2, 3, 0)), tree.affine[subject]), path)
    else:
        with h5py.File(path, "w") as f:
            f.create_dataset("betas", data=betas.transpose(0, 3, 2, 1))
    return path


def _affine(grid) -> np.ndarray:
    """1.8 mm voxels centred on the origin, x flipped like NSD's func1pt8mm grids."""
    affine = np.diag([-1.8, 1.8, 1.8, 1.0])
    affine[:3, 3] = [1.8 * (grid[0] - 1) / 2, -1.8 * (grid[1] - 1) / 2, -1.8 * (grid[2] - 1) / 2]
    return affine


def _nsdgeneral(grid, rng) -> np.ndarray:
    """-1 outside an ellipsoidal brain, 0 inside, 1 in a posterior blob (the ROI)."""
    axes = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) / (n / 2) for n in grid], indexing="ij")
    radius = sum(a**2 for a in axes)
    mask = np.where(radius < 0.9, 0, -1).astype(np.int16)
    mask[(radius < 0.6) & (axes[1] < 0.1) & (rng.random(grid) < 0.8)] = 1
    return mask


def _captions(coco: Path, coco_id: np.ndarray, coco_split: list[str], rng) -> dict[int, list[str]]:
    """COCO caption files holding 1-3 captions per image (plus images NSD does not use), annotation ids
    shuffled against file order; returns the expected lists (annotation-id order, stripped) by 73k id."""
    expected, files = {}, {split: [] for split in layout.COCO_SPLITS}
    next_id = iter(rng.permutation(1000) + 5000)
    for nsd_id in range(N_IMAGES):
        entries = [(int(next(next_id)), f"  image {nsd_id} caption {k}.\n") for k in range(1 + nsd_id % 3)]
        expected[nsd_id] = [text.strip() for _, text in sorted(entries)]
        files[coco_split[nsd_id]] += [{"image_id": int(coco_id[nsd_id]), "id": i, "caption": t} for i, t in entries]
    for split, entries in files.items():
        entries.append({"image_id": 999999, "id": int(next(next_id)), "caption": "not an NSD image"})
        order = rng.permutation(len(entries))
        (coco / "annotations").mkdir(parents=True, exist_ok=True)
        (coco / "annotations" / f"captions_{split}.json").write_text(json.dumps(
            {"info": {}, "images": [], "annotations": [entries[i] for i in order]}))
    return expected


def build(base: Path) -> MiniNSD:
    """Writes the miniature NSD under ``base`` (``base/nsd``, ``base/coco``), each session both as
    ``.nii.gz`` and ``.hdf5``."""
    rng = np.random.default_rng(0)
    root, coco = base / "nsd", base / "coco"
    paths = layout.NSDLayout(root)

    masterordering = rng.permutation(np.repeat(list(SHOWN), list(SHOWN.values())))
    subjectim = np.array([[*SEEN_SHARED_BY_ALL, *OWN_IMAGES.get(subject, OWN_IMAGES[1])] for subject in range(1, 9)])
    paths.expdesign.parent.mkdir(parents=True)
    scipy.io.savemat(paths.expdesign, {"masterordering": masterordering[None].astype(np.float64),
                                       "subjectim": (subjectim + 1).astype(np.float64),
                                       "sharedix": (rng.permutation(SHARED) + 1)[None].astype(np.float64)})

    coco_id = 100000 + 7 * np.arange(N_IMAGES)
    coco_split = ["val2017" if i % 3 == 0 else "train2017" for i in range(N_IMAGES)]
    with open(paths.stim_info, "w") as f:
        f.write(",cocoId,cocoSplit,cropBox,nsdId,shared1000,subject1\n")
        for i in rng.permutation(N_IMAGES):
            f.write(f"{i},{coco_id[i]},{coco_split[i]},\"(0, 0, 0.1, 0.1)\",{i},{i in SHARED},0\n")
    captions = _captions(coco, coco_id, coco_split, rng)

    images = rng.integers(0, 256, (N_IMAGES, *IMAGE_SHAPE), dtype=np.uint8)
    paths.stimuli.parent.mkdir(parents=True)
    with h5py.File(paths.stimuli, "w") as f:
        f.create_dataset("imgBrick", data=images, chunks=(1, *IMAGE_SHAPE))

    tree = MiniNSD(root, coco, {}, {}, {}, {}, images, captions, {})
    for subject, grid in GRIDS.items():
        tree.presented[subject] = subjectim[subject - 1, masterordering - 1]
        tree.affine[subject] = _affine(grid)
        mask = tree.nsdgeneral[subject] = _nsdgeneral(grid, rng)
        paths.nsdgeneral(subject).parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(mask, tree.affine[subject]), paths.nsdgeneral(subject))
        # Per-session offsets and gains per voxel, so z-scoring has something to remove; test trials
        # carry a large extra offset, so statistics that included them would be visibly off.
        n = SESSIONS * TRIALS_PER_SESSION
        offset = np.repeat(rng.normal(0, 600, (SESSIONS, *grid)), TRIALS_PER_SESSION, axis=0)
        gain = np.repeat(rng.uniform(100, 600, (SESSIONS, *grid)), TRIALS_PER_SESSION, axis=0)
        values = offset + gain * rng.normal(0, 1, (n, *grid))
        values[tree.test_trials(subject)] += 3000
        betas = np.clip(np.round(values), -32768, 32767).astype(np.int16)
        voxel = tuple(int(c) for c in np.argwhere(mask > 0)[0])
        betas[~tree.test_trials(subject), voxel[0], voxel[1], voxel[2]] = CONSTANT_VALUE
        tree.betas[subject], tree.constant_voxel[subject] = betas, voxel
        for session in range(1, SESSIONS + 1):
            rows = slice((session - 1) * TRIALS_PER_SESSION, session * TRIALS_PER_SESSION)
            for betas_format in layout.BETAS_SUFFIXES:
                write_session(tree, subject, session, betas[rows], betas_format)
    return tree
