"""CLIP's vision and text towers with their projections, as in Hugging Face's
``CLIPVisionModelWithProjection`` and ``CLIPTextModelWithProjection``; the text tower
also without its projection, as ``CLIPTextModel`` (Stable Diffusion 2.x's text encoder).

Both towers are pre-LayerNorm transformers. The vision tower embeds
non-overlapping patches of a channels-last image, prepends a class token and
pools it; the text tower runs causal attention over BPE tokens and pools the
end-of-text token. The key tables for the checkpoints are in ``clip.params``.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from nvl_jax import sharding
from nvl_jax.models import hf_loader
from nvl_jax.models.clip.params import TEXT_KEY_MAP, VISION_KEY_MAP
from nvl_jax.models.layers import Dense, Embed, LayerNorm, activation, param

# The end-of-text id of the configs published before transformers PR #24773;
# those checkpoints pool at the largest token id instead of the first EOS.
LEGACY_EOS_TOKEN_ID = 2


def _tower_settings(d: dict, tower: str, model_type: str) -> dict:
    """One tower's settings from its own config.json or from a full ``CLIPModel`` one."""
    if d.get("model_type") == "clip" or tower in d:
        settings = dict(d.get(tower) or {})
        # Old full configs also carry ``*_config_dict``, which transformers lets override.
        settings.update(d.get(f"{tower}_dict") or {})
        # A full CLIPModel projects both towers to its top-level projection_dim.
        settings["projection_dim"] = d.get("projection_dim", 512)
        return settings
    if d.get("model_type", model_type) != model_type:
        raise ValueError(f"expected a {model_type!r} or 'clip' config, got model_type {d['model_type']!r}")
    return d


def _known_fields(cls, settings: dict) -> dict:
    return {f.name: settings[f.name] for f in dataclasses.fields(cls) if f.name in settings}


def _check_heads(config) -> None:
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"hidden_size {config.hidden_size} does not split into "
                         f"{config.num_attention_heads} attention heads")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The vision tower; field names and defaults (ViT-B/32) as in transformers' ``CLIPVisionConfig``."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    projection_dim: int = 512
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        _check_heads(self)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def vit_b_32(cls) -> CLIPVisionConfig:
        """openai/clip-vit-base-patch32."""
        return cls()

    @classmethod
    def vit_l_14(cls) -> CLIPVisionConfig:
        """openai/clip-vit-large-patch14."""
        return cls(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   patch_size=14, projection_dim=768)

    @classmethod
    def from_hf_config(cls, d: dict) -> CLIPVisionConfig:
        """From a ``clip_vision_model`` config.json or a full ``clip`` one."""
        return cls(**_known_fields(cls, _tower_settings(d, "vision_config", "clip_vision_model")))


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The text tower; field names and defaults (ViT-B/32) as in transformers' ``CLIPTextConfig``."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    projection_dim: int = 512
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self):
        _check_heads(self)
        if not isinstance(self.eos_token_id, int):
            raise ValueError(f"eos_token_id must be one integer, got {self.eos_token_id!r}")

    @classmethod
    def vit_b_32(cls) -> CLIPTextConfig:
        """openai/clip-vit-base-patch32."""
        return cls()

    @classmethod
    def vit_l_14(cls) -> CLIPTextConfig:
        """openai/clip-vit-large-patch14."""
        return cls(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768)

    @classmethod
    def from_hf_config(cls, d: dict) -> CLIPTextConfig:
        """From a ``clip_text_model`` config.json or a full ``clip`` one."""
        return cls(**_known_fields(cls, _tower_settings(d, "text_config", "clip_text_model")))


@struct.dataclass
class CLIPVisionOutput:
    """``image_embeds [batch, projection_dim]``: the projected, pooled class token.
    ``last_hidden_state [batch, 1 + patches, width]``: the last layer's output.
    ``pooled_output [batch, width]``: the class token after ``post_layernorm``.
    ``hidden_states``: ``num_hidden_layers + 1`` arrays ``[batch, 1 + patches, width]``,
    the embeddings after ``pre_layrnorm`` then each layer's output; None unless asked for.
    """

    image_embeds: jax.Array
    last_hidden_state: jax.Array
    pooled_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


@struct.dataclass
class CLIPTextOutput:
    """``text_embeds [batch, projection_dim]``: the projected, pooled end-of-text token (None
    for a tower without projection).
    ``last_hidden_state [batch, length, width]``: after ``final_layer_norm``.
    ``pooled_output [batch, width]``: ``last_hidden_state`` at the end-of-text token.
    ``hidden_states``: ``num_hidden_layers + 1`` arrays ``[batch, length, width]``, the
    embeddings then each layer's output (before ``final_layer_norm``); None unless asked for.
    """

    text_embeds: jax.Array | None
    last_hidden_state: jax.Array
    pooled_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with biased q/k/v/out projections."""

    def __init__(self, width: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.q_proj = Dense(width, width, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.k_proj = Dense(width, width, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.v_proj = Dense(width, width, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.out_proj = Dense(width, width, axes=("heads", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """``x [batch, length, width]``, ``mask`` bool ``[batch, 1, length, length]`` or None."""
        batch, length, width = x.shape
        shape = (batch, length, self.num_heads, width // self.num_heads)
        q, k, v = (proj(x).reshape(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = jax.nn.dot_product_attention(q, k, v, mask=mask)
        return self.out_proj(y.reshape(batch, length, width))


class CLIPMLP(nnx.Module):
    def __init__(self, width: int, hidden: int, act: str, *, dtype, rngs: nnx.Rngs):
        self.act = activation(act)
        self.fc1 = Dense(width, hidden, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = Dense(hidden, width, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LayerNorm transformer block shared by both towers."""

    def __init__(self, config: CLIPVisionConfig | CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        width, eps = config.hidden_size, config.layer_norm_eps
        self.layer_norm1 = LayerNorm(width, eps=eps, dtype=dtype, rngs=rngs)
        self.self_attn = CLIPAttention(width, config.num_attention_heads, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(width, eps=eps, dtype=dtype, rngs=rngs)
        self.mlp = CLIPMLP(width, config.intermediate_size, config.hidden_act, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


def _encoder_layers(config, dtype, rngs: nnx.Rngs) -> nnx.List:
    return nnx.List([CLIPEncoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)])


def _encode(layers: nnx.List, x: jax.Array, mask: jax.Array | None, output_hidden_states: bool):
    """Runs the layers; returns the last output and, if asked, the input plus every layer's output."""
    hidden_states = [x]
    for layer in layers:
        x = layer(x, mask)
        hidden_states.append(x)
    return x, (tuple(hidden_states) if output_hidden_states else None)


class CLIPVisionModel(nnx.Module):
    """CLIP's image tower with its projection (``CLIPVisionModelWithProjection``)."""

    def __init__(self, config: CLIPVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        """Random parameters (seed 0 unless ``rngs`` is given), stored and computed in ``dtype``."""
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config, self.dtype = config, dtype
        width, patch, eps = config.hidden_size, config.patch_size, config.layer_norm_eps
        # A stride-``patch`` conv without bias on non-overlapping patches is one Dense per patch.
        self.patch_embedding = Dense(patch * patch * config.num_channels, width, axes=("patch", "embed"),
                                     use_bias=False, dtype=dtype, rngs=rngs)
        self.class_embedding = param(rngs, nnx.initializers.normal(width**-0.5), (width,), dtype, ("embed",))
        self.position_embedding = Embed(config.grid_size**2 + 1, width, axes=("position", "embed"),
                                        dtype=dtype, rngs=rngs)
        self.pre_layrnorm = LayerNorm(width, eps=eps, dtype=dtype, rngs=rngs)
        self.layers = _encoder_layers(config, dtype, rngs)
        self.post_layernorm = LayerNorm(width, eps=eps, dtype=dtype, rngs=rngs)
        self.visual_projection = Dense(width, config.projection_dim, axes=("embed", None), use_bias=False,
                                       dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, *, output_hidden_states: bool = False) -> CLIPVisionOutput:
        """``pixel_values [batch, image_size, image_size, 3]``, normalized as by ``clip.image_processor``."""
        cfg = self.config
        batch, height, width, channels = pixel_values.shape
        if (height, width, channels) != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(f"CLIPVisionModel takes [batch, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}] "
                             f"images, got {list(pixel_values.shape)}")
        grid, patch = cfg.grid_size, cfg.patch_size
        patches = (pixel_values.astype(self.dtype)
                   .reshape(batch, grid, patch, grid, patch, channels)
                   .transpose(0, 1, 3, 2, 4, 5)
                   .reshape(batch, grid * grid, patch * patch * channels))
        class_token = jnp.broadcast_to(self.class_embedding[...], (batch, 1, cfg.hidden_size))
        x = jnp.concatenate([class_token, self.patch_embedding(patches)], axis=1)
        x = self.pre_layrnorm(x + self.position_embedding.embedding[...])
        x, hidden_states = _encode(self.layers, x, None, output_hidden_states)
        pooled = self.post_layernorm(x[:, 0])
        return CLIPVisionOutput(image_embeds=self.visual_projection(pooled), last_hidden_state=x,
                                pooled_output=pooled, hidden_states=hidden_states)

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, *, subfolder: str | None = None, dtype=jnp.float32,
                        mesh: jax.sharding.Mesh | None = None,
                        rules: sharding.Rules = sharding.DEFAULT_RULES) -> CLIPVisionModel:
        """Loads a ``CLIPVisionModelWithProjection`` or a full ``CLIPModel`` checkpoint."""
        folder = hf_loader.resolve(path_or_name, subfolder)
        config = CLIPVisionConfig.from_hf_config(hf_loader.read_config(folder))
        return hf_loader.from_pretrained(lambda: cls(config, dtype=dtype), folder, VISION_KEY_MAP,
                                         mesh=mesh, rules=rules)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Where ``CLIPTextModel`` pools each sequence of ``input_ids [batch, length]``: ``[batch]``.

    The first end-of-text token; configs with the legacy id 2 take the largest
    id instead, as transformers does (CLIP's end-of-text is its largest id).
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextModel(nnx.Module):
    """CLIP's text tower with its projection (``CLIPTextModelWithProjection``), or without it
    (``with_projection=False``: transformers' ``CLIPTextModel``)."""

    def __init__(self, config: CLIPTextConfig, *, with_projection: bool = True, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        """Random parameters (seed 0 unless ``rngs`` is given), stored and computed in ``dtype``."""
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config, self.dtype = config, dtype
        width = config.hidden_size
        self.token_embedding = Embed(config.vocab_size, width, dtype=dtype, rngs=rngs)
        self.position_embedding = Embed(config.max_position_embeddings, width, axes=("position", "embed"),
                                        dtype=dtype, rngs=rngs)
        self.layers = _encoder_layers(config, dtype, rngs)
        self.final_layer_norm = LayerNorm(width, eps=config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.text_projection = (Dense(width, config.projection_dim, axes=("embed", None), use_bias=False,
                                      dtype=dtype, rngs=rngs) if with_projection else None)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 output_hidden_states: bool = False) -> CLIPTextOutput:
        """``input_ids [batch, length]``; ``attention_mask [batch, length]``, 1 on tokens and 0 on padding.

        Each sequence must hold an end-of-text token, as ``tokenize`` makes them.
        """
        batch, length = input_ids.shape
        if length > self.config.max_position_embeddings:
            raise ValueError(f"{length} tokens exceed max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        x = self.token_embedding(input_ids) + self.position_embedding.embedding[:length]
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        x, hidden_states = _encode(self.layers, x, mask, output_hidden_states)
        x = self.final_layer_norm(x)
        pooled = x[jnp.arange(batch), eos_positions(input_ids, self.config.eos_token_id)]
        text_embeds = self.text_projection(pooled) if self.text_projection is not None else None
        return CLIPTextOutput(text_embeds=text_embeds, last_hidden_state=x,
                              pooled_output=pooled, hidden_states=hidden_states)

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, *, subfolder: str | None = None, dtype=jnp.float32,
                        mesh: jax.sharding.Mesh | None = None,
                        rules: sharding.Rules = sharding.DEFAULT_RULES) -> CLIPTextModel:
        """Loads a ``CLIPTextModelWithProjection``, a full ``CLIPModel`` or (without projection, as its
        config's ``architectures`` says) a ``CLIPTextModel`` checkpoint."""
        folder = hf_loader.resolve(path_or_name, subfolder)
        raw = hf_loader.read_config(folder)
        config = CLIPTextConfig.from_hf_config(raw)
        with_projection = raw.get("architectures") != ["CLIPTextModel"]
        return hf_loader.from_pretrained(lambda: cls(config, with_projection=with_projection, dtype=dtype), folder,
                                         TEXT_KEY_MAP, mesh=mesh, rules=rules)


def load_tokenizer(path_or_name: str | os.PathLike, subfolder: str | None = None):
    """The transformers ``CLIPTokenizer`` saved in a checkpoint folder (or its ``subfolder``)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(hf_loader.resolve(path_or_name, subfolder)))


def tokenize(tokenizer, texts: str | list[str], max_length: int = 77) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)``, int32 ``[batch, max_length]``: start and end tokens added,
    long texts truncated (keeping the end token), short ones padded."""
    encoded = tokenizer([texts] if isinstance(texts, str) else list(texts), padding="max_length",
                        max_length=max_length, truncation=True, return_tensors="np")
    return encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int32)
