"""ViT3D, the paper's fMRI feature extractor, and its dual-stream alignment heads (stage 1).

The extractor is a pre-LayerNorm vision transformer over the active 3-D patches
of a volume: each flattened ``P**3`` patch is embedded by one dense layer, a
learned position table over the whole padded patch grid is indexed by the
patches' grid coordinates, and a CLS token is prepended. Two 2-layer MLP heads
read the last layer's CLS token: ``f_c`` predicts the CLIP image embedding and
``f_v`` the Stable Diffusion VAE latent of the stimulus.

Parameters are float32; ``ViT3DConfig.compute_dtype`` sets the activations' dtype.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from nvl_jax.models.layers import (
    Dense, Embed, LayerNorm, activation, check_remat, param, remat, use_custom_backward)

COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ViT3DConfig:
    """Extractor and heads. ``patch_grid``: patches per axis of the padded common grid.

    Dropout follows Hugging Face's ViT and CLIP and is active only in training (when the
    model is called with ``rngs``): ``dropout`` on the embeddings (patch tokens with their
    positions, and CLS) and on each block's attention and MLP outputs before the residual
    sum; ``attention_dropout`` on the attention probabilities. ``hidden_act`` names the
    MLPs' activation (``layers.ACTIVATIONS``), ``layer_norm_eps`` every LayerNorm's epsilon.
    ``remat``: what each encoder block keeps for the backward pass (``layers.REMAT_POLICIES``).
    """

    patch_size: int = 14
    patch_grid: tuple[int, int, int] = (6, 8, 6)
    width: int = 768
    depth: int = 16
    num_heads: int = 12
    mlp_ratio: int = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    attention_dropout: float = 0.0
    clip_dim: int = 768
    vae_latent_shape: tuple[int, int, int] = (64, 64, 4)
    head_hidden: int = 1024
    compute_dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} does not split into {self.num_heads} heads")
        if len(self.patch_grid) != 3 or len(self.vae_latent_shape) != 3:
            raise ValueError(f"patch_grid {self.patch_grid} and vae_latent_shape {self.vae_latent_shape} "
                             "must have three entries each")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype {self.compute_dtype!r} is not one of {COMPUTE_DTYPES}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} {getattr(self, name)} is not in [0, 1)")
        if self.layer_norm_eps <= 0.0:
            raise ValueError(f"layer_norm_eps {self.layer_norm_eps} is not positive")
        activation(self.hidden_act)
        check_remat(self.remat)

    @property
    def patch_dim(self) -> int:
        return self.patch_size**3

    @property
    def num_positions(self) -> int:
        return math.prod(self.patch_grid)

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.compute_dtype)

    @classmethod
    def paper(cls, patch_size: int = 14, grid: tuple[int, int, int] = (81, 104, 83)) -> ViT3DConfig:
        """16 layers, width 768, 12 heads, on ``grid`` zero-padded up to a multiple of ``patch_size``."""
        return cls(patch_size=patch_size, patch_grid=tuple(-(-n // patch_size) for n in grid))

    @classmethod
    def tiny(cls) -> ViT3DConfig:
        """A few thousand parameters, for tests."""
        return cls(patch_size=4, patch_grid=(2, 3, 2), width=32, depth=2, num_heads=4, clip_dim=16,
                   vae_latent_shape=(4, 4, 4), head_hidden=32)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ViT3DConfig:
        """Inverse of ``to_dict``, also after a JSON round trip (lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@struct.dataclass
class ViT3DOutput:
    """``cls [batch, width]``: the CLS token after the final LayerNorm.
    ``tokens [batch, 1 + n_active, width]``: every token after the final LayerNorm, CLS first.
    ``hidden_states``: ``depth`` arrays ``[batch, 1 + n_active, width]``, each layer's output
    (before the final LayerNorm); None unless asked for.
    """

    cls: jax.Array
    tokens: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


@struct.dataclass
class Stage1Output:
    """``clip_embedding [batch, clip_dim]``, ``vae_latent [batch, h, w, c]``: the heads' predictions.
    ``cls`` and ``hidden_states``: as in ``ViT3DOutput``.
    """

    clip_embedding: jax.Array
    vae_latent: jax.Array
    cls: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


def attention(qkv: jax.Array, keep: jax.Array | None = None) -> jax.Array:
    """Softmax attention without mask: ``qkv [3, batch, heads, T, head_dim]`` (q pre-scaled)
    -> ``[batch, heads, T, head_dim]``.

    ``keep [batch, heads, T, T]``, if given, multiplies the attention probabilities
    (attention dropout: 0 where dropped, ``1 / (1 - rate)`` elsewhere). Differentiated
    by the hand-written ``_custom_attention`` when ``layers.use_custom_backward()``.
    """
    if use_custom_backward():
        return _custom_attention(qkv, keep)
    q, k, v = qkv
    logits = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if keep is not None:
        probs = probs * keep
    return jnp.einsum("bnts,bnsh->bnth", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)


# The forward keeps the unnormalized weights exp(s - max) and divides the
# [T, head_dim] output by the row sums instead of normalizing the [T, T] weights;
# the backward uses rowsum(P * dP) = rowsum(dO * O), a pass over [T, head_dim]
# instead of [T, T] (it holds with a dropout mask too, as O is then (P * keep) V).
# q, k and v arrive stacked so that their gradient is one array, not three
# zero-padded ones summed.
@jax.custom_vjp
def _custom_attention(qkv: jax.Array, keep: jax.Array | None) -> jax.Array:
    return _attention_fwd(qkv, keep)[0]


def _attention_fwd(qkv, keep):
    q, k, v = qkv
    logits = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32)
    weights = jnp.exp(logits - logits.max(-1, keepdims=True)).astype(v.dtype)
    inv_sum = 1.0 / weights.sum(-1, keepdims=True, dtype=jnp.float32)
    kept = weights if keep is None else weights * keep
    out = jnp.einsum("bnts,bnsh->bnth", kept, v, preferred_element_type=jnp.float32) * inv_sum
    out = out.astype(v.dtype)
    return out, (qkv, weights, inv_sum, out, keep)


def _attention_bwd(residuals, g):
    (q, k, v), weights, inv_sum, out, keep = residuals
    dtype = v.dtype
    delta = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    dprobs = jnp.einsum("bnth,bnsh->bnts", g, v, preferred_element_type=jnp.float32)
    probs = weights * inv_sum
    dkeep = None if keep is None else (probs * dprobs).astype(keep.dtype)
    dlogits = (probs * ((dprobs if keep is None else dprobs * keep) - delta)).astype(dtype)
    kept = weights if keep is None else weights * keep
    dq = jnp.einsum("bnts,bnsh->bnth", dlogits, k)
    dk = jnp.einsum("bnts,bnth->bnsh", dlogits, q)
    dv = jnp.einsum("bnts,bnth->bnsh", kept, (g * inv_sum).astype(dtype))
    return jnp.stack([dq, dk, dv]).astype(dtype), dkeep


_custom_attention.defvjp(_attention_fwd, _attention_bwd)


class SelfAttention(nnx.Module):
    """Multi-head self-attention; q, k and v come from one ``[width, 3 * width]`` projection;
    ``dropout_rate`` on the attention probabilities."""

    def __init__(self, width: int, num_heads: int, *, dropout_rate: float = 0.0, rngs: nnx.Rngs):
        self.num_heads, self.dropout_rate = num_heads, dropout_rate
        self.qkv = Dense(width, 3 * width, axes=("embed", "heads"), rngs=rngs)
        self.out = Dense(width, width, axes=("heads", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """``x [batch, T, width]`` -> ``[batch, T, width]``; attention dropout only with ``rngs``."""
        batch, length, width = x.shape
        head_dim = width // self.num_heads
        # Scaling q (not the [T, T] logits) folds into the transpose to head-major order.
        scale = jnp.asarray([head_dim**-0.5, 1.0, 1.0], x.dtype)[:, None, None, None, None]
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        keep = None
        if rngs is not None and self.dropout_rate > 0.0:
            shape = (batch, self.num_heads, length, length)
            kept = jax.random.bernoulli(rngs.dropout(), 1.0 - self.dropout_rate, shape)
            keep = kept.astype(x.dtype) / jnp.asarray(1.0 - self.dropout_rate, x.dtype)
        y = attention(qkv * scale, keep)
        return self.out(y.transpose(0, 2, 1, 3).reshape(batch, length, width))


def _gelu(x: jax.Array) -> jax.Array:
    """Exact GELU through erf; XLA CPU evaluates it in half the time of jax.nn.gelu's erfc form."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(2**-0.5, x.dtype)))


class MLP(nnx.Module):
    """``fc2(act(fc1(x)))``; ``out_axis`` names the output's logical axis."""

    def __init__(self, features: int, hidden: int, out_features: int, act: str, *,
                 out_axis: str | None = "embed", rngs: nnx.Rngs):
        # Recomputed in the backward pass: saves writing the activation's derivative terms.
        self.act = jax.checkpoint(_gelu if act == "gelu" else activation(act))
        self.fc1 = Dense(features, hidden, axes=("embed", "mlp"), rngs=rngs)
        self.fc2 = Dense(hidden, out_features, axes=("mlp", out_axis), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nnx.Module):
    """Pre-LayerNorm transformer block; dropout on each residual branch and on the attention probabilities."""

    def __init__(self, config: ViT3DConfig, *, rngs: nnx.Rngs):
        width, eps = config.width, config.layer_norm_eps
        self.norm1 = LayerNorm(width, eps=eps, rngs=rngs)
        self.attn = SelfAttention(width, config.num_heads, dropout_rate=config.attention_dropout, rngs=rngs)
        self.norm2 = LayerNorm(width, eps=eps, rngs=rngs)
        self.mlp = MLP(width, config.mlp_ratio * width, width, config.hidden_act, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = x + self.dropout(self.attn(self.norm1(x), rngs), deterministic=rngs is None, rngs=rngs)
        return x + self.dropout(self.mlp(self.norm2(x)), deterministic=rngs is None, rngs=rngs)


class ViT3D(nnx.Module):
    """The transformer over active patches; ``__call__`` returns a ``ViT3DOutput``."""

    def __init__(self, config: ViT3DConfig, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        width = config.width
        self.patch_embed = Dense(config.patch_dim, width, axes=("patch", "embed"), rngs=rngs)
        self.position_embedding = Embed(config.num_positions, width, axes=("position", "embed"), rngs=rngs)
        self.cls_token = param(rngs, nnx.initializers.normal(0.02), (width,), jnp.float32, ("embed",))
        self.dropout = nnx.Dropout(config.dropout)
        self.blocks = nnx.List([EncoderBlock(config, rngs=rngs) for _ in range(config.depth)])
        self.norm = LayerNorm(width, eps=config.layer_norm_eps, rngs=rngs)

    def __call__(self, patches: jax.Array, coords: jax.Array, *, output_hidden_states: bool = False,
                 rngs: nnx.Rngs | None = None) -> ViT3DOutput:
        """``patches [batch, n_active, P**3]``; ``coords`` int ``[n_active, 3]``, each patch's
        (x, y, z) on the patch grid, shared by the whole batch. Dropout runs only when
        ``rngs`` is given.
        """
        cfg = self.config
        batch, n_active, patch_dim = patches.shape
        if patch_dim != cfg.patch_dim or coords.shape != (n_active, 3):
            raise ValueError(f"ViT3D takes patches [batch, n_active, {cfg.patch_dim}] and coords [n_active, 3], "
                             f"got {list(patches.shape)} and {list(coords.shape)}")
        dtype = cfg.dtype
        _, ny, nz = cfg.patch_grid
        positions = (coords[:, 0] * ny + coords[:, 1]) * nz + coords[:, 2]
        x = self.patch_embed(patches.astype(dtype)) + self.position_embedding(positions).astype(dtype)
        cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (batch, 1, cfg.width))
        x = self.dropout(jnp.concatenate([cls, x], axis=1), deterministic=rngs is None, rngs=rngs)
        hidden_states = []
        run_block = remat(lambda block, x, rngs: block(x, rngs), cfg.remat)
        for block in self.blocks:
            x = run_block(block, x, rngs)
            hidden_states.append(x)
        tokens = self.norm(x)
        return ViT3DOutput(cls=tokens[:, 0], tokens=tokens,
                           hidden_states=tuple(hidden_states) if output_hidden_states else None)


class AlignmentHeads(nnx.Module):
    """``f_c``: CLS -> CLIP image embedding; ``f_v``: CLS -> VAE latent (predicted flat)."""

    def __init__(self, config: ViT3DConfig, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.latent_shape = config.vae_latent_shape
        self.clip = MLP(config.width, config.head_hidden, config.clip_dim, config.hidden_act, out_axis=None,
                        rngs=rngs)
        self.vae = MLP(config.width, config.head_hidden, math.prod(config.vae_latent_shape), config.hidden_act,
                       out_axis=None, rngs=rngs)

    def __call__(self, cls: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``cls [batch, width]`` -> ``([batch, clip_dim], [batch, h, w, c])``."""
        return self.clip(cls), self.vae(cls).reshape(cls.shape[0], *self.latent_shape)


class BrainEncoder(nnx.Module):
    """ViT3D plus the alignment heads: the model trained in stage 1."""

    def __init__(self, config: ViT3DConfig, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.vit = ViT3D(config, rngs=rngs)
        self.heads = AlignmentHeads(config, rngs=rngs)

    def __call__(self, patches: jax.Array, coords: jax.Array, *, output_hidden_states: bool = False,
                 rngs: nnx.Rngs | None = None) -> Stage1Output:
        """``patches [batch, n_active, P**3]``, ``coords [n_active, 3]`` as in ``ViT3D``."""
        features = self.vit(patches, coords, output_hidden_states=output_hidden_states, rngs=rngs)
        clip_embedding, vae_latent = self.heads(features.cls)
        return Stage1Output(clip_embedding=clip_embedding, vae_latent=vae_latent, cls=features.cls,
                            hidden_states=features.hidden_states)


LOSS_REDUCTIONS = ("squared_norm", "mean")


def dual_stream_loss(output: Stage1Output, clip_target: jax.Array, vae_target: jax.Array,
                     alpha: float = 1 / 64, reduction: str = "mean") -> tuple[jax.Array, dict[str, jax.Array]]:
    """The dual-stream alignment loss of a batch, computed in float32.

    ``clip_target [batch, clip_dim]``, ``vae_target [batch, h, w, c]``. ``reduction``:

    - ``"squared_norm"``: the paper's ``||f_c - E_clip||^2 + alpha ||f_v - E_vae||^2`` per sample,
      averaged over the batch and divided by ``clip_dim``. The constant divisor changes neither the
      optimum nor the relative weight of the two streams; it keeps gradients at a mean's scale.
    - ``"mean"``: ``MSE_clip + alpha * MSE_vae``, each a mean over its own elements. The VAE term
      then weighs ``vae_size / clip_dim`` less than in the paper (21x at NSD's 64 x 64 x 4 latents).

    Returns ``(loss, {"loss", "mse_clip", "mse_vae"})``; the two MSEs are element means either way.
    """
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    mse_clip = jnp.mean(jnp.square(output.clip_embedding.astype(jnp.float32) - clip_target.astype(jnp.float32)))
    mse_vae = jnp.mean(jnp.square(output.vae_latent.astype(jnp.float32) - vae_target.astype(jnp.float32)))
    vae_weight = alpha
    if reduction == "squared_norm":
        vae_weight = alpha * math.prod(vae_target.shape[1:]) / clip_target.shape[-1]
    loss = mse_clip + vae_weight * mse_vae
    return loss, {"loss": loss, "mse_clip": mse_clip, "mse_vae": mse_vae}
