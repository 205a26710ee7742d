"""The Stable Diffusion 2.x / Stable unCLIP denoising UNet (diffusers' ``UNet2DConditionModel``) in Flax NNX.

``model(sample, timesteps, encoder_hidden_states, class_labels)`` predicts the noise (or v, or x0:
the scheduler's ``prediction_type`` says which) for latents ``sample [batch, height, width,
in_channels]`` at ``timesteps``, attending to text tokens ``encoder_hidden_states [batch, tokens,
cross_attention_dim]``. Stable unCLIP adds ``class_labels [batch, 1536]``: the noised CLIP image
embedding and the timestep features of its noise level, embedded by their own MLP and added to the
time embedding. Module names follow diffusers' (renames in ``unet.params``). Channels-last throughout.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx, struct

from nvl_jax import sharding
from nvl_jax.models import hf_loader
from nvl_jax.models.layers import Conv2d, GroupNorm, activation
from nvl_jax.models.unet.attention import TransformerSettings
from nvl_jax.models.unet.blocks import DownBlock2D, ResnetSettings, UNetMidBlock2DCrossAttn, UpBlock2D
from nvl_jax.models.unet.embeddings import TimestepEmbedding, timestep_features
from nvl_jax.models.unet.params import KEY_MAP

# Block type -> whether it holds spatial transformers.
DOWN_BLOCK_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
UP_BLOCK_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
MID_BLOCK_TYPE = "UNetMidBlock2DCrossAttn"
CLASS_EMBED_TYPES = (None, "projection")

# diffusers config fields this port supports only at these values (diffusers' defaults; a list
# means any of them). The SD 2.x and Stable unCLIP UNets use none of the features they switch on.
FIXED_FIELDS = {
    "only_cross_attention": [False],
    "dual_cross_attention": [False],
    "num_attention_heads": [None],
    "num_class_embeds": [None],
    "encoder_hid_dim": [None],
    "encoder_hid_dim_type": [None],
    "addition_embed_type": [None],
    "resnet_time_scale_shift": ["default"],
    "time_embedding_type": ["positional"],
    "time_embedding_act_fn": [None],
    "timestep_post_act": [None],
    "time_cond_proj_dim": [None],
    "attention_type": ["default"],
    "class_embeddings_concat": [False],
    "mid_block_only_cross_attention": [None, False],
    "reverse_transformer_layers_per_block": [None],
}


def _per_block(name: str, value, n: int) -> tuple:
    """An int (or str) for every block, or a list with one entry per block -> a tuple of ``n``."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet config: {name} has {len(value)} entries for {n} down blocks")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The fields of a diffusers ``UNet2DConditionModel`` ``config.json`` that shape the model.

    Names and defaults are diffusers'. ``layers_per_block``, ``cross_attention_dim``,
    ``transformer_layers_per_block`` and ``attention_head_dim`` take an int or one value per
    down block; they are stored as per-block tuples.

    ``attention_head_dim`` is, as in diffusers, the NUMBER of attention heads per block (each
    head is ``block_out_channels[i] // attention_head_dim[i]`` wide): diffusers kept the
    misnamed field for the configs already published and reads it as ``num_attention_heads``;
    the up path uses the reversed list. ``num_attention_heads`` itself must stay unset, as
    diffusers' UNet2DConditionModel demands.

    Not read, since they act only on block types this port rejects or only in training:
    ``resnet_skip_time_act``, ``resnet_out_scale_factor``, ``cross_attention_norm``,
    ``addition_time_embed_dim``, ``addition_embed_type_num_heads``, ``dropout``.
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = MID_BLOCK_TYPE
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    class_embed_type: str | None = None
    projection_class_embeddings_input_dim: int | None = None
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    def __post_init__(self):
        n = len(self.block_out_channels)
        for field, supported in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            types = tuple(getattr(self, field))
            unsupported = sorted(set(types) - set(supported))
            if unsupported:
                raise ValueError(f"UNet config: {field} has {unsupported}; supported: {sorted(supported)}")
            if len(types) != n:
                raise ValueError(f"UNet config: {len(types)} {field} for {n} block_out_channels")
            object.__setattr__(self, field, types)
        if self.mid_block_type != MID_BLOCK_TYPE:
            raise ValueError(f"UNet config: mid_block_type {self.mid_block_type!r} is not supported; "
                             f"expected {MID_BLOCK_TYPE!r}")
        if self.class_embed_type not in CLASS_EMBED_TYPES:
            raise ValueError(f"UNet config: class_embed_type {self.class_embed_type!r} is not supported; "
                             f"expected one of {list(CLASS_EMBED_TYPES)}")
        if self.class_embed_type == "projection" and not self.projection_class_embeddings_input_dim:
            raise ValueError("UNet config: class_embed_type 'projection' needs projection_class_embeddings_input_dim")
        for field in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, field) % 2 == 0:
                raise ValueError(f"UNet config: {field} must be odd, got {getattr(self, field)}")
        for field in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
                      "attention_head_dim"):
            value = getattr(self, field)
            if isinstance(value, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in value):
                raise ValueError(f"UNet config: nested {field} (an asymmetric UNet) is not supported")
            object.__setattr__(self, field, _per_block(field, value, n))
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding every resnet reads: ``time_embedding_dim`` or 4x the first block's."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def num_attention_heads(self) -> tuple[int, ...]:
        """Heads per down block; diffusers reads them from ``attention_head_dim`` (see the class docstring)."""
        return self.attention_head_dim

    @classmethod
    def from_hf_config(cls, d: dict) -> UNetConfig:
        """Reads a diffusers ``UNet2DConditionModel`` config dict; raises, naming the field, on what this port lacks.

        An absent field takes diffusers' constructor default, as diffusers itself would.
        """
        class_name = d.get("_class_name", "UNet2DConditionModel")
        if class_name != "UNet2DConditionModel":
            raise ValueError(f"config is for {class_name!r}, not UNet2DConditionModel")
        for field, accepted in FIXED_FIELDS.items():
            value = d.get(field, accepted[0])
            values = value if isinstance(value, list) and field == "only_cross_attention" else [value]
            if any(v not in accepted for v in values):
                raise ValueError(f"UNet config: {field}={value!r} is not supported; expected {accepted[0]!r}")
        if d.get("norm_num_groups", 32) is None:
            raise ValueError("UNet config: norm_num_groups=None (no output GroupNorm) is not supported")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def stable_unclip_small(cls) -> UNetConfig:
        """``stabilityai/stable-diffusion-2-1-unclip-small``, subfolder ``unet``: SD 2.1 conditioned on a
        CLIP ViT-L/14 image embedding (768) and its noise level's features (768) as ``class_labels``.

        Taken from the original ``v2-1-stable-unclip-l-inference.yaml`` (``num_head_channels: 64``,
        ``adm_in_channels: 1536``, ``context_dim: 1024``, ``use_linear_in_transformer``) and SD 2.1's
        diffusers unet config. Not checked against a download (no hub here):
        ``upcast_attention=True`` is SD 2.1's (diffusers' converter sets it for v2.1 checkpoints,
        the original code always computes attention in float32); the unCLIP repository's own
        config.json may say otherwise. It changes nothing in float32. ``sample_size`` (96) only
        documents the training resolution (768 px); any size divisible by 8 runs.
        """
        return cls(
            sample_size=96, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, norm_num_groups=32, norm_eps=1e-5,
            cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
            upcast_attention=True, class_embed_type="projection", projection_class_embeddings_input_dim=1536)


@struct.dataclass
class UNet2DConditionOutput:
    """sample: the prediction, ``[batch, height, width, out_channels]``."""

    sample: jax.Array


class UNet2DConditionModel(nnx.Module):
    """The conditional denoising UNet of Stable Diffusion 2.x and Stable unCLIP (diffusers' class of this name).

    conv_in; down blocks (resnets with optional cross-attention transformers, stride-2
    downsamplers), the mid block, up blocks reading the down path's skips, then
    GroupNorm, act and conv_out. Every resnet adds the time embedding (plus the class
    embedding with ``class_embed_type="projection"``).
    """

    def __init__(self, config: UNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        """Random parameters (seed 0 unless ``rngs`` is given), stored and computed in ``dtype``."""
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config, self.dtype = config, dtype
        c = config.block_out_channels
        n, temb = len(c), config.time_embed_dim
        self.conv_in = Conv2d(config.in_channels, c[0], config.conv_in_kernel,
                              padding=(config.conv_in_kernel - 1) // 2, dtype=dtype, rngs=rngs)
        self.time_embedding = TimestepEmbedding(c[0], temb, config.act_fn, dtype=dtype, rngs=rngs)
        # diffusers builds the projection's MLP with its default SiLU, whatever act_fn says.
        self.class_embedding = (
            TimestepEmbedding(config.projection_class_embeddings_input_dim, temb, dtype=dtype, rngs=rngs)
            if config.class_embed_type == "projection" else None)
        resnet = ResnetSettings(temb_channels=temb, groups=config.norm_num_groups, eps=config.norm_eps,
                                act_fn=config.act_fn)

        def transformer(i: int) -> TransformerSettings:
            return TransformerSettings(
                num_heads=config.num_attention_heads[i], cross_attention_dim=config.cross_attention_dim[i],
                num_layers=config.transformer_layers_per_block[i], norm_num_groups=config.norm_num_groups,
                use_linear_projection=config.use_linear_projection, upcast_attention=config.upcast_attention)

        self.down_blocks = nnx.List([
            DownBlock2D(c[max(i - 1, 0)], c[i], config.layers_per_block[i], resnet,
                        transformer(i) if DOWN_BLOCK_TYPES[kind] else None, i < n - 1, config.downsample_padding,
                        dtype=dtype, rngs=rngs)
            for i, kind in enumerate(config.down_block_types)])
        self.mid_block = UNetMidBlock2DCrossAttn(c[-1], resnet, transformer(n - 1), config.mid_block_scale_factor,
                                                 dtype=dtype, rngs=rngs)
        # Up block i mirrors down block n-1-i; diffusers indexes the reversed per-block lists with i.
        up = [n - 1 - i for i in range(n)]
        self.up_blocks = nnx.List([
            UpBlock2D(c[max(up[i] - 1, 0)], c[up[max(i - 1, 0)]], c[up[i]], config.layers_per_block[up[i]] + 1,
                      resnet, transformer(up[i]) if UP_BLOCK_TYPES[kind] else None, i < n - 1,
                      dtype=dtype, rngs=rngs)
            for i, kind in enumerate(config.up_block_types)])
        self.conv_norm_out = GroupNorm(c[0], config.norm_num_groups, eps=config.norm_eps, dtype=dtype, rngs=rngs)
        self.conv_act = activation(config.act_fn)
        self.conv_out = Conv2d(c[0], config.out_channels, config.conv_out_kernel,
                               padding=(config.conv_out_kernel - 1) // 2, dtype=dtype, rngs=rngs)

    def embed_conditions(self, timesteps: jax.Array, batch: int, class_labels: jax.Array | None) -> jax.Array:
        """The embedding every resnet adds: ``[batch, time_embed_dim]``.

        ``timesteps``: ``[batch]`` or a scalar (broadcast), int or float; ``class_labels``:
        ``[batch, projection_class_embeddings_input_dim]`` when the config has a class embedding.
        """
        cfg = self.config
        timesteps = jnp.asarray(timesteps)
        if timesteps.ndim == 0:
            timesteps = jnp.broadcast_to(timesteps, (batch,))
        if timesteps.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or [batch={batch}], got shape {list(timesteps.shape)}")
        features = timestep_features(timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                     freq_shift=cfg.freq_shift)
        emb = self.time_embedding(features.astype(self.dtype))
        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError("class_labels given, but this UNet's config has class_embed_type=None")
            return emb
        expected = (batch, cfg.projection_class_embeddings_input_dim)
        if class_labels is None or class_labels.shape != expected:
            got = None if class_labels is None else list(class_labels.shape)
            raise ValueError(f"class_embed_type 'projection' needs class_labels of shape {list(expected)}, got {got}")
        return emb + self.class_embedding(class_labels.astype(self.dtype))

    def __call__(self, sample: jax.Array, timesteps: jax.Array | int | float, encoder_hidden_states: jax.Array,
                 class_labels: jax.Array | None = None) -> UNet2DConditionOutput:
        """``sample [batch, height, width, in_channels]``, ``timesteps [batch]`` or scalar,
        ``encoder_hidden_states [batch, tokens, cross_attention_dim]``, ``class_labels [batch,
        projection_class_embeddings_input_dim]`` or None -> ``.sample [batch, height, width, out_channels]``.

        Any height and width run; where they are not multiples of ``2 ** (len(block_out_channels) - 1)``
        the upsamplers resize to the skip connections' sizes, as diffusers does.
        """
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample must be [batch, height, width, {cfg.in_channels}], got {list(sample.shape)}")
        context_dims = {d for d, kind in zip(cfg.cross_attention_dim, cfg.down_block_types) if DOWN_BLOCK_TYPES[kind]}
        context_dims.add(cfg.cross_attention_dim[-1])
        if encoder_hidden_states.ndim != 3 or {encoder_hidden_states.shape[-1]} != context_dims:
            raise ValueError(f"encoder_hidden_states must be [batch, tokens, {sorted(context_dims)[0]}], "
                             f"got {list(encoder_hidden_states.shape)}")
        batch = sample.shape[0]
        emb = self.embed_conditions(timesteps, batch, class_labels)
        context = encoder_hidden_states.astype(self.dtype)
        x = sample.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context)
            skips.extend(block_skips)
        x = self.mid_block(x, emb, context)
        for block in self.up_blocks:
            count = len(block.resnets)
            block_skips, skips = skips[-count:], skips[:-count]
            x = block(x, block_skips, emb, context, skips[-1].shape[1:3] if skips else None)
        return UNet2DConditionOutput(sample=self.conv_out(self.conv_act(self.conv_norm_out(x))))

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, *, subfolder: str | None = None, dtype=jnp.float32,
                        mesh: jax.sharding.Mesh | None = None,
                        rules: sharding.Rules = sharding.DEFAULT_RULES) -> UNet2DConditionModel:
        """Loads a diffusers ``UNet2DConditionModel`` checkpoint: a local folder or a hub name.

        ``subfolder="unet"`` reads the UNet of a full pipeline repository. Parameters and
        compute use ``dtype``; with a ``mesh``, every parameter is placed on the sharding its
        logical axes map to under ``rules``. Loading is strict: a missing, unused or
        wrong-shape tensor fails, naming it.
        """
        folder = hf_loader.resolve(path_or_name, subfolder)
        config = UNetConfig.from_hf_config(hf_loader.read_config(folder))
        return hf_loader.from_pretrained(lambda: cls(config, dtype=dtype), folder, KEY_MAP, mesh=mesh, rules=rules)
