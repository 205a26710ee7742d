"""The sinusoidal timestep embedding of DDPM, diffusers' ``get_timestep_embedding``, shared by the UNet and unCLIP."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def frequencies(half_dim: int, downscale_freq_shift: float, max_period: int) -> np.ndarray:
    """The ``[half_dim]`` float32 angular frequencies, computed on the host.

    On the host because XLA rewrites a division by a constant as a multiplication
    by its reciprocal, which moves the frequencies by an ulp; at timestep ~1000 an
    ulp of frequency is ~6e-5 of angle. float32 operations as torch's, with the exp
    correctly rounded.
    """
    exponent = np.float32(-math.log(max_period)) * np.arange(half_dim, dtype=np.float32)
    exponent = exponent / np.float32(half_dim - downscale_freq_shift)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1, scale: float = 1,
                           max_period: int = 10000) -> jax.Array:
    """Sinusoidal embeddings ``[batch, embedding_dim]`` float32 of ``timesteps`` ``[batch]`` (may be fractional).

    Frequencies ``exp(-log(max_period) * i / (half - downscale_freq_shift))``,
    ``i < half = embedding_dim // 2``; the output is ``[sin, cos]``, or ``[cos, sin]``
    with ``flip_sin_to_cos``, zero-padded by one column when ``embedding_dim`` is odd.
    """
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim != 1:
        raise ValueError(f"get_timestep_embedding: timesteps must be 1-D [batch], got shape {timesteps.shape}")
    half_dim = embedding_dim // 2
    angles = scale * (timesteps[:, None].astype(jnp.float32) * frequencies(half_dim, downscale_freq_shift, max_period))
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    embedding = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if embedding_dim % 2 == 1:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding
