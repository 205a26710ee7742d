"""On-device preprocessing (nvl_jax.data.volumes) against PyTorch's interpolation and the scipy host reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nvl_jax import sharding
from nvl_jax.bench import preprocess
from nvl_jax.data import volumes

TINY_NATIVE = ((20, 26, 21), (19, 24, 19), (22, 25, 20))
TINY_GRID = (21, 26, 20)
MODERATE_NATIVE = ((40, 50, 41), (38, 47, 39), (43, 52, 40))
MODERATE_GRID = (41, 50, 40)


def ellipsoid_mask(shape, rng, radius=(0.25, 0.4)) -> np.ndarray:
    """bool ``shape``: a random off-centre ellipsoid, its semi-axes a random ``radius`` fraction of the grid."""
    centre = [n * rng.uniform(0.4, 0.6) for n in shape]
    radius = [n * rng.uniform(*radius) for n in shape]
    axes = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radius)) <= 1.0


def mixed_batch(masks, subject, rng, padding_value=0.0) -> np.ndarray:
    """float32 ``[batch, V_max]``: random betas of each row's subject, then ``padding_value``."""
    counts = [int(m.sum()) for m in masks]
    betas = np.full((len(subject), max(counts)), padding_value, np.float32)
    for row, s in enumerate(subject):
        betas[row, :counts[s]] = rng.standard_normal(counts[s])
    return betas


class Dataset:
    """Subjects with random ellipsoid masks, their geometry and active patches."""

    def __init__(self, native_shapes, common_grid, patch_size, seed=0):
        rng = np.random.default_rng(seed)
        self.masks = [ellipsoid_mask(shape, rng) for shape in native_shapes]
        self.common_grid, self.patch_size = common_grid, patch_size
        self.geometry = volumes.build_geometry(self.masks, common_grid)
        self.active = volumes.active_patches(volumes.resample_masks_union(self.masks, common_grid), patch_size)
        self.subject = np.array([0, 1, 2, 2, 0, 1, 1, 0], np.int32)
        self.betas = mixed_batch(self.masks, self.subject, rng)

    def reference(self, betas=None):
        return preprocess.reference_betas_to_patches(
            self.betas if betas is None else betas, self.subject, self.masks, self.common_grid, self.active,
            self.patch_size)


@pytest.fixture(scope="module")
def tiny():
    return Dataset(TINY_NATIVE, TINY_GRID, patch_size=7)


to_patches = jax.jit(volumes.betas_to_patches, static_argnums=4)


@pytest.mark.parametrize("n_in, n_out", [(5, 9), (78, 83), (97, 104), (9, 5), (106, 104), (84, 81), (7, 7)])
def test_trilinear_matrix_matches_torch_linear(n_in, n_out):
    identity = torch.eye(n_in, dtype=torch.float64)[:, None, :]
    expected = F.interpolate(identity, size=n_out, mode="linear", align_corners=False)[:, 0, :].T.numpy()
    np.testing.assert_allclose(volumes.trilinear_matrix(n_in, n_out), expected, rtol=0, atol=1e-12)


def test_to_common_grid_matches_torch_trilinear():
    rng = np.random.default_rng(1)
    # One full grid (every voxel a beta) and two masked ones; axes grow, shrink and stay.
    masks = [np.ones(TINY_NATIVE[0], bool)] + [ellipsoid_mask(shape, rng) for shape in TINY_NATIVE[1:]]
    volumes_native = [rng.standard_normal(shape) * m for shape, m in zip(TINY_NATIVE, masks)]
    subject = np.array([0, 1, 2, 1], np.int32)
    betas = np.zeros((len(subject), max(int(m.sum()) for m in masks)), np.float32)
    for row, s in enumerate(subject):
        betas[row, :masks[s].sum()] = volumes_native[s][masks[s]]
    geometry = volumes.build_geometry(masks, TINY_GRID)

    ours = np.asarray(jax.jit(volumes.to_common_grid)(betas, subject, geometry))

    # torch in float64: in float32 it rounds the source coordinates themselves, an error that
    # grows with the grid (~5e-6 here); ours come from float64 weights.
    expected = np.stack([
        F.interpolate(torch.from_numpy(volumes_native[s])[None, None], size=TINY_GRID, mode="trilinear",
                      align_corners=False)[0, 0].numpy()
        for s in subject
    ])
    assert ours.shape == (len(subject), *TINY_GRID)
    assert np.abs(ours - expected).max() < 1e-5


def test_patchify_matches_torch_unfold():
    volume = np.random.default_rng(2).standard_normal((2, *TINY_GRID)).astype(np.float32)
    p = 7
    grid = volumes.patch_grid(TINY_GRID, p)
    padded = F.pad(torch.from_numpy(volume), (0, grid[2] * p - TINY_GRID[2], 0, grid[1] * p - TINY_GRID[1],
                                              0, grid[0] * p - TINY_GRID[0]))
    expected = padded.unfold(1, p, p).unfold(2, p, p).unfold(3, p, p).reshape(2, -1, p**3).numpy()
    np.testing.assert_array_equal(np.asarray(volumes.patchify(jnp.asarray(volume), p)), expected)


def test_betas_to_patches_matches_scipy_reference(tiny):
    ours = np.asarray(to_patches(tiny.betas, tiny.subject, tiny.geometry, tiny.active, tiny.patch_size))
    assert ours.shape == (len(tiny.subject), len(tiny.active), tiny.patch_size**3)
    assert np.abs(ours - tiny.reference()).max() < 1e-5


@pytest.mark.parametrize("patch_size", [10, 12, 14])
def test_betas_to_patches_matches_scipy_reference_per_patch_size(patch_size):
    data = Dataset(MODERATE_NATIVE, MODERATE_GRID, patch_size, seed=3)
    assert 0 < len(data.active) < np.prod(volumes.patch_grid(MODERATE_GRID, patch_size))
    ours = np.asarray(to_patches(data.betas, data.subject, data.geometry, data.active, patch_size))
    assert np.abs(ours - data.reference()).max() < 1e-5


def test_padding_does_not_leak(tiny):
    rng = np.random.default_rng(4)
    betas = mixed_batch(tiny.masks, tiny.subject, rng, padding_value=np.nan)
    ours = np.asarray(to_patches(betas, tiny.subject, tiny.geometry, tiny.active, tiny.patch_size))
    assert np.isfinite(ours).all()
    assert np.abs(ours - tiny.reference(np.nan_to_num(betas))).max() < 1e-5
    # Cells of the zero padding past the common grid stay exactly zero.
    p = tiny.patch_size
    cells = ours.reshape(len(tiny.subject), len(tiny.active), p, p, p)
    checked = 0
    for n, corner in enumerate(tiny.active * p):
        beyond = [np.arange(p) + c >= g for c, g in zip(corner, TINY_GRID)]
        pad = beyond[0][:, None, None] | beyond[1][None, :, None] | beyond[2][None, None, :]
        assert not cells[:, n][:, pad].any()
        checked += pad.sum()
    assert checked > 0


def test_active_patches_match_reference(tiny):
    for data in (tiny, Dataset(MODERATE_NATIVE, MODERATE_GRID, 10, seed=3)):
        expected = preprocess.reference_active_patches(data.masks, data.common_grid, data.patch_size)
        np.testing.assert_array_equal(data.active, expected)
        assert data.active.dtype == np.int32


def test_sharded_batch_matches_unsharded(tiny):
    mesh = sharding.make_mesh((2, 2, 2))
    betas = jax.device_put(tiny.betas, sharding.batch_sharding(mesh, 2))
    subject = jax.device_put(tiny.subject, sharding.batch_sharding(mesh, 1))
    geometry = jax.device_put(tiny.geometry, NamedSharding(mesh, PartitionSpec()))
    compiled = to_patches.lower(betas, subject, geometry, tiny.active, tiny.patch_size).compile()
    sharded = compiled(betas, subject, geometry, tiny.active)
    unsharded = to_patches(tiny.betas, tiny.subject, tiny.geometry, tiny.active, tiny.patch_size)
    assert sharded.sharding.spec[0] == ("data", "fsdp")
    # Each device resamples its own samples: nothing is gathered across devices.
    assert "all-gather" not in compiled.as_text()
    assert np.abs(np.asarray(sharded) - np.asarray(unsharded)).max() < 1e-5


def test_nsd_sizes():
    rng = np.random.default_rng(5)
    # NSD's nsdgeneral holds ~15k voxels: ellipsoids of about that size.
    masks = [ellipsoid_mask(shape, rng, radius=(0.17, 0.22)) for shape in preprocess.NSD_NATIVE_SHAPES.values()]
    grid = preprocess.NSD_COMMON_GRID
    geometry = volumes.build_geometry(masks, grid)
    active = volumes.active_patches(volumes.resample_masks_union(masks, grid), 14)
    subject = np.arange(4, dtype=np.int32)
    betas = mixed_batch(masks, subject, rng)
    patches = to_patches(betas, subject, geometry, active, 14)
    assert patches.shape == (4, len(active), 2744)
    assert 0 < len(active) <= 288
    reference = preprocess.reference_betas_to_patches(betas, subject, masks, grid, active, 14)
    assert np.abs(np.asarray(patches) - reference).max() < 1e-5


def test_rejects_empty_masks_and_short_betas(tiny):
    with pytest.raises(ValueError, match="voxel mask 1"):
        volumes.build_geometry([tiny.masks[0], np.zeros((4, 4, 4), bool)], TINY_GRID)
    with pytest.raises(ValueError, match="betas must be"):
        volumes.betas_to_patches(tiny.betas[:, :-1], tiny.subject, tiny.geometry, tiny.active, tiny.patch_size)


def test_measure_reports_throughput():
    result = preprocess.measure(batch=4, repeats=1)
    assert result["preprocess_samples_per_s"] > 0 and result["host_reference_samples_per_s"] > 0
    assert result["preprocess_speedup_vs_host"] == pytest.approx(
        result["preprocess_samples_per_s"] / result["host_reference_samples_per_s"])
    assert result["max_abs_error_vs_host"] < 1e-5
