"""The projector from brain tokens into the LLM's embedding space: LLaVA's ``mlp2x_gelu``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nvl_jax.models.layers import Dense


class Projector(nnx.Module):
    """``Linear(width -> hidden), GELU (erf), Linear(hidden -> hidden)``."""

    def __init__(self, in_features: int, hidden_size: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.linear_1 = Dense(in_features, hidden_size, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.linear_2 = Dense(hidden_size, hidden_size, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, brain_tokens: jax.Array) -> jax.Array:
        """``[batch, N, width]`` -> ``[batch, N, hidden]``."""
        return self.linear_2(jax.nn.gelu(self.linear_1(brain_tokens), approximate=False))
