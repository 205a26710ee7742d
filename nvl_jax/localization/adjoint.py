"""From active patches back to a subject's native voxels: the exact transpose of the extractor's input map.

``volumes.betas_to_patches`` is linear in the betas: each stencil entry ``u`` of subject s adds
``weight[u] * betas[voxel[u]]`` into the common-grid cell ``cell[u]``, written straight into its
place among the active patches of the zero-padded grid (cells in inactive patches are dropped, the
padding is never reached). Its transpose therefore reads, for every entry, the value that the
patch map holds at that entry's cell and adds ``weight[u]`` times it to voxel ``voxel[u]``:

    native[v] = sum over entries u with voxel[u] = v of weight[u] * patch_map[cell[u]]

A relevance per patch spreads over every cell of its cube (the patch grid -> voxels of each cube on
the padded grid), the padding is dropped (the stencil never points there), and the trilinear
weights carry the rest to the native voxels: no second interpolation is involved.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nvl_jax.data import volumes


def patches_to_betas(patch_values: jax.Array, subject: jax.Array, geometry: volumes.Geometry, active: jax.Array,
                     patch_size: int) -> jax.Array:
    """``[batch, V_max]``: the transpose of ``volumes.betas_to_patches`` applied to ``patch_values``.

    ``patch_values [batch, n_active, P**3]`` (each patch's cells in C order of (x, y, z), as
    ``betas_to_patches`` writes them); ``subject [batch]``: rows of ``geometry``. Entries past a
    subject's own voxel count stay 0. For every x, y: ``<betas_to_patches(x), y> = <x, patches_to_betas(y)>``.
    """
    active = jnp.asarray(active)
    n_active = active.shape[0]
    if patch_values.ndim != 3 or patch_values.shape[1:] != (n_active, patch_size**3):
        raise ValueError(f"patch values must be [batch, {n_active}, {patch_size ** 3}] (the active patches), "
                         f"got {list(patch_values.shape)}")
    target = volumes._active_patch_index(geometry.cell, geometry.common_grid, patch_size, active)
    flat = patch_values.reshape(patch_values.shape[0], -1)
    # Entries whose cell lies outside the active patches point past the end: they read 0.
    values = jnp.take_along_axis(flat, target[subject], axis=1, mode="fill", fill_value=0)
    values = values * geometry.weight[subject]
    size = max(geometry.n_voxels)
    return jax.vmap(lambda v, i: jnp.zeros(size, v.dtype).at[i].add(v))(values, geometry.voxel[subject])


def patch_relevance_to_voxels(relevance: np.ndarray, subject_index: int, geometry: volumes.Geometry,
                              active: np.ndarray, patch_size: int) -> np.ndarray:
    """``float32 [n_voxels]``: one relevance per patch ``[n_active]`` on the subject's own voxels
    (``voxel_mask`` C order), each patch's value on every cell of its cube, then the transpose."""
    cubes = jnp.broadcast_to(jnp.asarray(relevance, jnp.float32)[None, :, None],
                             (1, len(relevance), patch_size**3))
    native = patches_to_betas(cubes, jnp.asarray([subject_index], jnp.int32), geometry, active, patch_size)
    return np.asarray(native[0, :geometry.n_voxels[subject_index]])


def normalize(native_map: np.ndarray) -> np.ndarray:
    """``native_map`` scaled to 0..1 by its range over the voxels (all zeros stay zeros)."""
    native_map = np.asarray(native_map, np.float32)
    low, high = native_map.min(), native_map.max()
    return (native_map - low) / (high - low) if high > low else np.zeros_like(native_map)
