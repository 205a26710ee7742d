"""The UNet's conditioning vectors: the sinusoidal timestep features and the MLP that embeds them
(and, with ``class_embed_type="projection"``, the class labels)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from nvl_jax.models.layers import Dense, activation


def timestep_features(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                      max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features of ``timesteps [batch]`` (int or float): ``[batch, dim]`` float32.

    diffusers' ``get_timestep_embedding``: ``half = dim // 2`` frequencies
    ``exp(-log(max_period) * i / (half - freq_shift))``, sines then cosines
    (cosines first when ``flip_sin_to_cos``), a zero column appended for odd ``dim``.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    features = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        features = jnp.pad(features, ((0, 0), (0, 1)))
    return features


class TimestepEmbedding(nnx.Module):
    """``linear_2(act(linear_1(x)))``: ``[batch, in_features]`` -> ``[batch, embed_dim]``.

    Embeds the timestep features, and with ``class_embed_type="projection"`` the
    class labels themselves (diffusers reuses the same module for both).
    """

    def __init__(self, in_features: int, embed_dim: int, act_fn: str = "silu", *, dtype, rngs: nnx.Rngs):
        self.act = activation(act_fn)
        self.linear_1 = Dense(in_features, embed_dim, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.linear_2 = Dense(embed_dim, embed_dim, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))
