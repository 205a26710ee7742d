"""Classifier-free guidance over a batch laid out ``[unconditional, conditional]``, as diffusers' pipelines do."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def classifier_free_guidance(model_output: jax.Array, guidance_scale: float | jax.Array) -> jax.Array:
    """``uncond + g * (cond - uncond)`` from a model output ``[2 * batch, ...]``; returns ``[batch, ...]``.

    The first half of the batch is the unconditional branch, the second the
    conditional one (diffusers' ``noise_pred.chunk(2)``).
    """
    if model_output.shape[0] % 2:
        raise ValueError(f"classifier_free_guidance: the batch of {model_output.shape[0]} is not "
                         "[unconditional, conditional] halves")
    uncond, cond = jnp.split(model_output, 2, axis=0)
    return uncond + guidance_scale * (cond - uncond)
