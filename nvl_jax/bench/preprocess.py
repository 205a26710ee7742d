"""On-device fMRI preprocessing (``nvl_jax.data.volumes``) against a scipy host reference.

The reference is written independently of ``volumes``, one sample at a time in
float64: scatter the betas into the native grid with numpy indexing, sample it
with ``scipy.ndimage.map_coordinates(order=1, mode="nearest")`` at the
``align_corners=False`` source coordinates, ``np.pad``, cut the patches with a
reshape and keep the active ones. The tests check ``volumes`` against it; the
benchmark times both on NSD-sized subjects (the four native grids of NSD's
subjects 1, 2, 5, 7, random blob masks of about 15k voxels, common grid
(81, 104, 83)): the jitted ``betas_to_patches`` after warm-up versus the
reference in this process. Prints one JSON object.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import functools
import json
import statistics
import time

import jax
import numpy as np
import scipy.ndimage

from nvl_jax.data import volumes

NSD_NATIVE_SHAPES = {
    "subj01": (81, 104, 83),
    "subj02": (82, 106, 84),
    "subj05": (79, 97, 78),
    "subj07": (78, 95, 81),
}
NSD_COMMON_GRID = (81, 104, 83)


def source_coordinates(n_in: int, n_out: int) -> np.ndarray:
    """float64 ``[n_out]``: where each output cell samples the input, ``align_corners=False``."""
    return np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, None)


@functools.lru_cache(maxsize=32)
def _sample_points(native_shape: tuple[int, ...], common_grid: tuple[int, ...]) -> np.ndarray:
    axes = [source_coordinates(n, g) for n, g in zip(native_shape, common_grid)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"))
    points.flags.writeable = False
    return points


def reference_resample(volume: np.ndarray, common_grid: Sequence[int]) -> np.ndarray:
    """float64 ``[Gx, Gy, Gz]``: ``volume [X, Y, Z]`` trilinearly stretched onto the common grid."""
    points = _sample_points(tuple(volume.shape), tuple(common_grid))
    # "nearest" repeats the edge voxel, which is the clamp of the source coordinate at n - 1.
    return scipy.ndimage.map_coordinates(np.asarray(volume, np.float64), points, order=1, mode="nearest")


def reference_active_patches(masks: Sequence[np.ndarray], common_grid: Sequence[int], patch_size: int) -> np.ndarray:
    """int32 ``[n_active, 3]``: patches of the padded common grid holding a resampled mask value > 0."""
    union = np.zeros(tuple(common_grid), bool)
    for mask in masks:
        union |= reference_resample(np.asarray(mask > 0, np.float64), common_grid) > 0
    grid = [-(-n // patch_size) for n in common_grid]
    padded = np.pad(union, [(0, g * patch_size - n) for g, n in zip(grid, common_grid)])
    touched = [
        (i, j, k)
        for i in range(grid[0]) for j in range(grid[1]) for k in range(grid[2])
        if padded[i * patch_size:(i + 1) * patch_size, j * patch_size:(j + 1) * patch_size,
                  k * patch_size:(k + 1) * patch_size].any()
    ]
    return np.array(touched, np.int32).reshape(-1, 3)


def reference_patches(
    betas: np.ndarray, voxel_mask: np.ndarray, common_grid: Sequence[int], active: np.ndarray, patch_size: int
) -> np.ndarray:
    """float64 ``[n_active, P**3]`` of one sample; ``betas`` may carry padding after the mask's voxels."""
    p = patch_size
    volume = np.zeros(voxel_mask.shape)
    volume[voxel_mask > 0] = betas[:np.count_nonzero(voxel_mask)]
    resampled = reference_resample(volume, common_grid)
    grid = [-(-n // p) for n in common_grid]
    padded = np.pad(resampled, [(0, g * p - n) for g, n in zip(grid, common_grid)])
    blocks = padded.reshape(grid[0], p, grid[1], p, grid[2], p).transpose(0, 2, 4, 1, 3, 5)
    return blocks[active[:, 0], active[:, 1], active[:, 2]].reshape(len(active), p**3)


def reference_betas_to_patches(
    betas: np.ndarray, subject: np.ndarray, voxel_masks: Sequence[np.ndarray], common_grid: Sequence[int],
    active: np.ndarray, patch_size: int,
) -> np.ndarray:
    """float64 ``[batch, n_active, P**3]``, one sample after another."""
    return np.stack([
        reference_patches(row, voxel_masks[s], common_grid, active, patch_size)
        for row, s in zip(np.asarray(betas), np.asarray(subject))
    ])


def nsd_like_masks(n_voxels: int = 15_000, seed: int = 0) -> list[np.ndarray]:
    """bool masks on the NSD native grids: the ``n_voxels`` highest cells of a smooth random field.

    The field is kept to the back half of an ellipsoidal brain, so the voxels form
    scattered blobs over a region about the size of NSD's visual cortex ROI.
    """
    rng = np.random.default_rng(seed)
    masks = []
    for shape in NSD_NATIVE_SHAPES.values():
        centred = np.meshgrid(*[(np.arange(n) + 0.5) / n - 0.5 for n in shape], indexing="ij")
        brain = sum((c / 0.45) ** 2 for c in centred) <= 1.0
        field = scipy.ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2.0)
        field[~(brain & (centred[1] < 0.05))] = -np.inf
        mask = np.zeros(shape, bool)
        mask.ravel()[np.argsort(field.ravel())[-n_voxels:]] = True
        masks.append(mask)
    return masks


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(batch: int = 32, patch_size: int = 14, repeats: int = 5, n_voxels: int = 15_000, seed: int = 0) -> dict:
    """Samples per second of the jitted ``betas_to_patches`` and of the host reference on NSD-sized subjects.

    The batch mixes the four subjects in turn. After one untimed run of each
    (compilation; the reference's sample points, computed once per subject as
    ``build_geometry`` computes its stencils once), the two sides alternate
    ``repeats`` times over the whole batch, so a busy machine slows both alike;
    the medians are reported.
    """
    masks = nsd_like_masks(n_voxels, seed)
    geometry = volumes.build_geometry(masks, NSD_COMMON_GRID)
    active = volumes.active_patches(volumes.resample_masks_union(masks, NSD_COMMON_GRID), patch_size)
    rng = np.random.default_rng(seed)
    subject = np.arange(batch, dtype=np.int32) % len(masks)
    betas = np.zeros((batch, max(geometry.n_voxels)), np.float32)
    for row, s in enumerate(subject):
        betas[row, :geometry.n_voxels[s]] = rng.standard_normal(geometry.n_voxels[s])

    preprocess = jax.jit(volumes.betas_to_patches, static_argnums=4)
    device_args = (jax.device_put(betas), jax.device_put(subject), geometry, jax.device_put(active), patch_size)
    patches = np.asarray(preprocess(*device_args))
    reference = reference_betas_to_patches(betas, subject, masks, NSD_COMMON_GRID, active, patch_size)
    device_s, host_s = [], []
    for _ in range(repeats):
        device_s.append(_seconds(lambda: preprocess(*device_args).block_until_ready()))
        host_s.append(_seconds(
            lambda: reference_betas_to_patches(betas, subject, masks, NSD_COMMON_GRID, active, patch_size)))
    device_s, host_s = statistics.median(device_s), statistics.median(host_s)
    return {
        "preprocess_samples_per_s": batch / device_s,
        "host_reference_samples_per_s": batch / host_s,
        "preprocess_speedup_vs_host": host_s / device_s,
        "max_abs_error_vs_host": float(np.abs(patches - reference).max()),
        "batch": batch,
        "patch_size": patch_size,
        "n_active": int(len(active)),
        "n_voxels": list(geometry.n_voxels),
        "device": jax.devices()[0].device_kind,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m nvl_jax.bench.preprocess", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="samples per batch")
    p.add_argument("--patch_size", type=int, default=14, help="P: patches are P x P x P")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each side (the medians are reported)")
    p.add_argument("--n_voxels", type=int, default=15_000, help="voxels per subject mask")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks and betas")
    args = p.parse_args(argv)
    print(json.dumps(measure(args.batch, args.patch_size, args.repeats, args.n_voxels, args.seed), indent=2))


if __name__ == "__main__":
    main()
