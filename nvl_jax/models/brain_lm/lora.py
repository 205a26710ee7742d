"""Low-rank adaptation of an LLM's linear layers (Hu et al., 2021; peft's conventions).

``apply_lora`` wraps the chosen projections of every decoder layer: ``y = x W + (alpha / r) x A B``
with ``A [in, r]`` (Kaiming-uniform, as peft) and ``B [r, out]`` (zeros, so training starts from
the base model). The adapters are ``LoRAParam`` variables, a subclass of ``nnx.Param``, so a
filter can train them alone while the base weights stay frozen. ``merge_lora`` folds them back
into plain ``Dense`` kernels, for export and for fast generation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from nvl_jax.models.layers import Dense

# The projections of a Llama decoder layer that LoRA may adapt.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAParam(nnx.Param):
    """A low-rank adapter matrix: trainable while the base ``nnx.Param`` it adapts is frozen."""


class LoRADense(nnx.Module):
    """``base(x) + scale * (x @ lora_a) @ lora_b``; ``base`` is the wrapped ``Dense``."""

    def __init__(self, base: Dense, rank: int, alpha: float, *, rngs: nnx.Rngs):
        in_features, out_features = base.kernel.shape
        axes = base.kernel.get_metadata().get("out_sharding") or (None, None)
        dtype = base.kernel[...].dtype
        self.base = base
        self.scale = alpha / rank
        bound = 1 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)) on a [r, in] torch weight
        self.lora_a = LoRAParam(jax.random.uniform(rngs.params(), (in_features, rank), dtype, -bound, bound),
                                out_sharding=(axes[0], None), eager_sharding=False)
        self.lora_b = LoRAParam(jnp.zeros((rank, out_features), dtype), out_sharding=(None, axes[1]),
                                eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        update = (x @ self.lora_a[...].astype(x.dtype)) @ self.lora_b[...].astype(x.dtype)
        return self.base(x) + jnp.asarray(self.scale, x.dtype) * update

    def merged_kernel(self) -> jax.Array:
        """``W + scale * A B`` ``[in, out]``, in the base kernel's dtype."""
        kernel = self.base.kernel[...]
        delta = self.scale * (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32))
        return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def _projections(llm):
    """``(module, attribute name)`` of every adaptable projection of a ``LlamaForCausalLM``."""
    for layer in llm.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LLAMA_TARGETS:
                if hasattr(parent, name):
                    yield parent, name


def apply_lora(llm, rank: int, alpha: float, targets: tuple[str, ...], *, rngs: nnx.Rngs) -> None:
    """Wraps ``targets`` (names from ``LLAMA_TARGETS``) of every decoder layer of ``llm``, in place."""
    unknown = sorted(set(targets) - set(LLAMA_TARGETS))
    if unknown or not targets or rank < 1:
        raise ValueError(f"LoRA: target modules must be a non-empty subset of {LLAMA_TARGETS} and rank >= 1; "
                         f"got targets {tuple(targets)} (unknown: {unknown}), rank {rank}")
    for parent, name in _projections(llm):
        if name in targets:
            setattr(parent, name, LoRADense(getattr(parent, name), rank, alpha, rngs=rngs))


def merge_lora(llm) -> None:
    """Folds every adapter of ``llm`` into its base kernel and unwraps it, in place."""
    for parent, name in _projections(llm):
        module = getattr(parent, name)
        if isinstance(module, LoRADense):
            module.base.kernel[...] = module.merged_kernel()
            setattr(parent, name, module.base)
