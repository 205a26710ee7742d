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
# On CPU, self-attention over a large latent (64x64 = 4096 pixels) is held back by writing and
# re-reading the [batch, heads, queries, keys] logits (256 MiB at 4096 pixels, batch 2, 2 heads),
# not by its FLOPs: taking the queries in blocks of this many keeps each block's logits
# in cache and measured 3-4x faster than one jax.nn.dot_product_attention call, on par with
# PyTorch's fused CPU kernel. Attention whose logits per head are smaller than
# CPU_BLOCKED_MIN_LOGITS (every cross-attention) runs in one call.
CPU_QUERY_BLOCK = 256
CPU_BLOCKED_MIN_LOGITS = 2**20


def _blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention one block of ``CPU_QUERY_BLOCK`` queries at a time.

    ``q [batch, queries, heads, head_dim]``, ``k``, ``v`` ``[batch, keys, heads, head_dim]``
    -> ``[batch, queries, heads, head_dim]``. Logits and softmax in float32.
    """
    batch, length, heads, head_dim = q.shape
    blocks = -(-length // CPU_QUERY_BLOCK)
    # Heads next to batch, so each block's matmuls have their batch dimensions leading.
    q = jnp.pad(q * head_dim**-0.5, ((0, 0), (0, blocks * CPU_QUERY_BLOCK - length), (0, 0), (0, 0)))
    q = q.reshape(batch, blocks, CPU_QUERY_BLOCK, heads, head_dim).transpose(1, 0, 3, 2, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def block(q_block):
        logits = jnp.einsum("bnqh,bnkh->bnqk", q_block, k, preferred_element_type=jnp.float32)
        weights = jnp.exp(logits - logits.max(-1, keepdims=True))
        out = jnp.einsum("bnqk,bnkh->bnqh", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return (out / weights.sum(-1, keepdims=True)).astype(v.dtype)

    out = jax.lax.map(block, q)  # [blocks, batch, heads, CPU_QUERY_BLOCK, head_dim]
    out = out.transpose(1, 0, 3, 2, 4).reshape(batch, blocks * CPU_QUERY_BLOCK, heads, head_dim)
    return out[:, :length]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``softmax(q k^T / sqrt(head_dim)) v`` per head; ``q [batch, queries, heads, head_dim]``,
    ``k``, ``v`` ``[batch, keys, heads, head_dim]`` -> ``[batch, queries, heads, head_dim]``.

    ``jax.nn.dot_product_attention``, except for large attention on CPU (``_blocked_attention``).
    """
    if jax.default_backend() == "cpu" and q.shape[1] * k.shape[1] >= CPU_BLOCKED_MIN_LOGITS:
        return _blocked_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v)


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
    upcast_attention: queries, keys and values cast to float32, so the attention matmuls run in
        float32 whatever the compute dtype (logits and softmax are float32 always).
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
        y = dot_product_attention(q, k, v).astype(x.dtype)
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
