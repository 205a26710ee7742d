"""The UNet's spatial transformer (diffusers' ``Transformer2DModel`` on continuous inputs) and its
``BasicTransformerBlock``: self-attention, cross-attention to the text tokens, GEGLU feed-forward."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nvl_jax.models.layers import Dense, GroupNorm, LayerNorm

# diffusers builds Transformer2DModel's GroupNorm with this epsilon, and its LayerNorms with
# the default 1e-5, whatever the UNet's norm_eps.
GROUP_NORM_EPS = 1e-6
LAYER_NORM_EPS = 1e-5
# BasicTransformerBlock's feed-forward width is 4x the model width.
FF_MULT = 4


@dataclasses.dataclass(frozen=True)
class TransformerSettings:
    """How one UNet block builds its ``Transformer2DModel`` s.

    num_heads: attention heads; each is ``channels // num_heads`` wide (in SD 2.x configs
        this is what diffusers' ``attention_head_dim`` holds).
    cross_attention_dim: width of the ``encoder_hidden_states`` tokens.
    num_layers: ``BasicTransformerBlock`` s per transformer.
    norm_num_groups: groups of the transformer's input GroupNorm.
    use_linear_projection: diffusers names ``proj_in`` / ``proj_out`` Linear layers (SD 2.x)
        or 1x1 convs (SD 1.x); both are the same per-pixel matmul here.
    upcast_attention: attention logits and softmax in float32 whatever the compute dtype.
    """

    num_heads: int
    cross_attention_dim: int
    num_layers: int
    norm_num_groups: int
    use_linear_projection: bool
    upcast_attention: bool


class Attention(nnx.Module):
    """Multi-head attention of ``x [batch, length, dim]`` to ``context [batch, context_length,
    context_dim]`` (``x`` itself when None): q/k/v without bias, the output projection with one."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None, upcast: bool, *, dtype, rngs: nnx.Rngs):
        self.num_heads, self.upcast = num_heads, upcast
        context_dim = context_dim or dim
        self.to_q = Dense(dim, dim, axes=("embed", "heads"), use_bias=False, dtype=dtype, rngs=rngs)
        self.to_k = Dense(context_dim, dim, axes=("embed", "heads"), use_bias=False, dtype=dtype, rngs=rngs)
        self.to_v = Dense(context_dim, dim, axes=("embed", "heads"), use_bias=False, dtype=dtype, rngs=rngs)
        self.to_out = Dense(dim, dim, axes=("heads", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        batch, length, dim = x.shape
        head_dim = dim // self.num_heads
        q = self.to_q(x).reshape(batch, length, self.num_heads, head_dim)
        k = self.to_k(context).reshape(batch, context.shape[1], self.num_heads, head_dim)
        v = self.to_v(context).reshape(batch, context.shape[1], self.num_heads, head_dim)
        if self.upcast:
            q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
        y = jax.nn.dot_product_attention(q, k, v).astype(x.dtype)
        return self.to_out(y.reshape(batch, length, dim))


class FeedForward(nnx.Module):
    """GEGLU: ``proj_out(a * gelu(gate))`` with ``[a, gate] = geglu_proj(x)`` split in halves."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        hidden = FF_MULT * dim
        self.geglu_proj = Dense(dim, 2 * hidden, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.proj_out = Dense(hidden, dim, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        a, gate = jnp.split(self.geglu_proj(x), 2, axis=-1)
        return self.proj_out(a * jax.nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nnx.Module):
    """Pre-LayerNorm residual block: self-attention, cross-attention to the context, feed-forward."""

    def __init__(self, dim: int, settings: TransformerSettings, *, dtype, rngs: nnx.Rngs):
        heads, upcast = settings.num_heads, settings.upcast_attention
        self.norm1 = LayerNorm(dim, eps=LAYER_NORM_EPS, dtype=dtype, rngs=rngs)
        self.attn1 = Attention(dim, heads, None, upcast, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(dim, eps=LAYER_NORM_EPS, dtype=dtype, rngs=rngs)
        self.attn2 = Attention(dim, heads, settings.cross_attention_dim, upcast, dtype=dtype, rngs=rngs)
        self.norm3 = LayerNorm(dim, eps=LAYER_NORM_EPS, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """``x [batch, pixels, dim]``, ``context [batch, tokens, cross_attention_dim]``."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm, a per-pixel projection in, transformer blocks over the ``height * width``
    pixels, a projection out, plus the input: ``[batch, height, width, channels]`` -> same shape."""

    def __init__(self, channels: int, settings: TransformerSettings, *, dtype, rngs: nnx.Rngs):
        if channels % settings.num_heads:
            raise ValueError(f"Transformer2DModel: {channels} channels do not split into "
                             f"{settings.num_heads} attention heads (attention_head_dim in the UNet config)")
        self.norm = GroupNorm(channels, settings.norm_num_groups, eps=GROUP_NORM_EPS, dtype=dtype, rngs=rngs)
        self.proj_in = Dense(channels, channels, axes=("conv_in", "embed"), dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List([BasicTransformerBlock(channels, settings, dtype=dtype, rngs=rngs)
                                            for _ in range(settings.num_layers)])
        self.proj_out = Dense(channels, channels, axes=("embed", "conv_out"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = self.proj_in(self.norm(x).reshape(batch, height * width, channels))
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h).reshape(x.shape)
