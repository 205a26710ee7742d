"""Maps on the subject's native grid: NIfTI files that open over the subject's anatomy, PNG slices and
nilearn glass brains."""

from __future__ import annotations

from pathlib import Path
import re

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from nvl_jax.data import format as data_format  # noqa: E402

SLICES = 8  # axial slices per PNG row, spread over the voxel mask's extent


def to_volume(native_map: np.ndarray, subject: data_format.Subject) -> np.ndarray:
    """``float32 [X, Y, Z]``: values ``[n_voxels]`` (``voxel_mask`` C order) on the native grid, 0 outside."""
    native_map = np.asarray(native_map, np.float32)
    if native_map.shape != (subject.n_voxels,):
        raise ValueError(f"{subject.name}: a map needs one value per stored voxel ({subject.n_voxels}), "
                         f"got {native_map.shape}")
    volume = np.zeros(subject.native_shape, np.float32)
    volume[subject.voxel_mask] = native_map
    return volume


def write_nifti(native_map: np.ndarray, subject: data_format.Subject, path: str | Path) -> Path:
    """The map as NIfTI on the subject's native grid with its affine (sform and qform); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(to_volume(native_map, subject), subject.affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)
    return path


def _axial_slices(mask: np.ndarray) -> np.ndarray:
    z = np.flatnonzero(mask.any(axis=(0, 1)))
    return np.unique(np.linspace(z.min(), z.max(), SLICES).round().astype(int))


def slices_png(volumes: dict[str, np.ndarray], subject: data_format.Subject, path: str | Path) -> Path:
    """One row of axial slices per titled volume ``[X, Y, Z]`` (0..1), drawn over the voxel mask in grey."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    zs = _axial_slices(subject.voxel_mask)
    fig, axes = plt.subplots(len(volumes), len(zs), figsize=(1.6 * len(zs), 1.9 * len(volumes)), squeeze=False)
    for row, (title, volume) in zip(axes, volumes.items()):
        for ax, z in zip(row, zs):
            # Rows of the image are y (anterior up), columns x: the radiological view of an axial slice.
            ax.imshow(subject.voxel_mask[:, :, z].T, cmap="gray", vmin=0, vmax=3, origin="lower")
            shown = np.ma.masked_where(~subject.voxel_mask[:, :, z], volume[:, :, z])
            ax.imshow(shown.T, cmap="hot", vmin=0, vmax=1, origin="lower")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"z={z}", fontsize=7)
        row[0].set_ylabel(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def glass_brain_png(nifti_path: str | Path, path: str | Path, title: str) -> Path:
    """nilearn's glass brain of a map. The axes are the subject's scanner millimetres, not MNI: the
    outline is a template's, drawn for orientation."""
    from nilearn import plotting

    path = Path(path)
    display = plotting.plot_glass_brain(str(nifti_path), title=title, cmap="hot", vmin=0, vmax=1, colorbar=True,
                                        plot_abs=False, threshold=0.5)
    display.savefig(str(path), dpi=110)
    display.close()
    return path


def write_outputs(result, out: str | Path) -> list[Path]:
    """The NIfTI files and PNGs of a ``ConceptMap``; returns their paths."""
    out = Path(out)
    stem = f"{result.subject.name}_{re.sub(r'[^A-Za-z0-9]+', '_', result.concept).strip('_')}"
    paths = [write_nifti(result.ensemble, result.subject, out / f"{stem}.nii.gz")]
    paths += [write_nifti(m, result.subject, out / f"{stem}_{name}.nii.gz") for name, m in result.runs.items()]
    volumes = {"ensemble": result.volume()} if len(result.runs) > 1 else {}
    volumes.update({name: to_volume(m, result.subject) for name, m in result.runs.items()})
    paths.append(slices_png(volumes, result.subject, out / f"{stem}_slices.png"))
    paths.append(glass_brain_png(paths[0], out / f"{stem}_glass_brain.png",
                                         f'"{result.concept}" in {result.subject.name}'))
    return paths
