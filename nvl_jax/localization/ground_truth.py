"""The true concept voxels of an in-silico dataset, on a subject's stored voxels.

``python -m nvl_jax.data.synthetic`` writes ``ground_truth/<subject>_concept_voxels.nii.gz``
(``uint8 [X, Y, Z, n_concepts]`` on the subject's native grid, concept order in
``ground_truth/concepts.json``); docs/synthetic.md defines which voxels carry a concept.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from nvl_jax.data import format as data_format


def true_concept_voxels(dataset: data_format.PreparedDataset, subject: str) -> dict[str, np.ndarray]:
    """concept -> ``bool [n_voxels]``: whether each of the subject's stored voxels (``voxel_mask`` C order)
    carries the concept."""
    folder = dataset.root / "ground_truth"
    path = folder / f"{subject}_concept_voxels.nii.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing. The true concept voxels come with in-silico datasets written by "
                                f"this version of the generator: python -m nvl_jax.data.synthetic --out {dataset.root} "
                                "--overwrite (same seed, same files, plus the ground truth)")
    concepts = json.loads((folder / "concepts.json").read_text())["concepts"]
    info = dataset.subjects[subject]
    image = nib.load(path)
    expected = (*info.native_shape, len(concepts))
    if image.shape != expected or not np.allclose(image.affine, info.affine, atol=1e-4):
        raise ValueError(f"{path}: shape {image.shape} and affine must be the subject's native grid {expected} "
                         "with its affine (subjects/<subject>/subject.json)")
    carried = np.asarray(image.dataobj)[info.voxel_mask] > 0
    return {concept: carried[:, c] for c, concept in enumerate(concepts)}
