"""Llama-family causal language models (Llama-2, Vicuna, Llama-3) in Flax NNX.

The layout follows Hugging Face's ``LlamaForCausalLM`` so checkpoints load key
for key: pre-norm decoder layers (RMSNorm, grouped-query attention with rotary
position embeddings, SwiGLU MLP), a final RMSNorm and an LM head that may be
tied to the token embedding. Incremental decoding writes into a preallocated
:class:`~nvl_jax.models.generation.KVCache`; ``generate`` lives in
``llama/generation.py``.

Its projections train with autodiff's backward pass, not ``layers``' hand-written one: on CPU
that made SmolLM2-135M's train step a third faster (``python -m nvl_jax.bench.stage2``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nvl_jax import sharding as sharding_lib
from nvl_jax.models import gguf_io, hf_loader
from nvl_jax.models import layers
from nvl_jax.models.layers import Dense, Embed, RMSNorm, activation
from nvl_jax.models.llama import generation
from nvl_jax.models.llama.params import gguf_key_map, key_map

ROPE_TYPES = ("default", "linear", "llama3")

# Logical names of the activations, pinned by sharding_lib.constrain when a mesh is set.
HIDDEN_AXES = ("activation_batch", "activation_length", "activation_embed")
QUERY_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
KV_AXES = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
MLP_AXES = ("activation_batch", "activation_length", "activation_mlp")
LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")

@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding frequencies: plain, linearly scaled, or Llama-3.1's smooth scaling."""

    type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf_config(cls, d: dict) -> RopeConfig:
        """Reads ``rope_parameters`` (transformers 5) or top-level ``rope_theta`` + ``rope_scaling`` (older)."""
        params = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {rope_type!r} is not supported; supported types: {', '.join(ROPE_TYPES)}")
        theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
        if rope_type == "default":
            return cls(theta=theta)
        if rope_type == "linear":
            return cls(type="linear", theta=theta, factor=float(params["factor"]))
        return cls(
            type="llama3", theta=theta, factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]), high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params.get(
                "original_max_position_embeddings", d.get("max_position_embeddings", 2048))),
        )

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies ``[head_dim // 2]``, in float32 step for step as transformers computes them."""
        inv_freq = 1.0 / (self.theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
        if self.type == "linear":
            return inv_freq / np.float32(self.factor)
        if self.type == "default":
            return inv_freq
        old_context = self.original_max_position_embeddings
        low_freq_wavelen = old_context / self.low_freq_factor
        high_freq_wavelen = old_context / self.high_freq_factor
        wavelen = np.float32(2 * math.pi) / inv_freq
        # Long wavelengths are stretched by ``factor``, short ones kept, the band between interpolated.
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(self.factor), inv_freq)
        smooth = (old_context / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / np.float32(self.factor) + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A Llama architecture; the defaults are Llama-2-7B's.

    num_kv_heads < num_heads is grouped-query attention; eos_token_ids holds
    every id that ends generation (Llama-3-Instruct has two), sorted.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None

    @classmethod
    def from_hf_config(cls, d: dict) -> LlamaConfig:
        """From a ``config.json`` dict; absent keys take transformers' ``LlamaConfig`` defaults."""
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id", 2)
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"], num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope=RopeConfig.from_hf_config(d),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", False), mlp_bias=d.get("mlp_bias", False),
            hidden_act=d.get("hidden_act", "silu"), bos_token_id=d.get("bos_token_id", 1),
            eos_token_ids=_token_ids(eos), pad_token_id=d.get("pad_token_id"),
        )

    @classmethod
    def from_pretrained(cls, path_or_name, *, gguf_file: str | None = None,
                        subfolder: str | None = None) -> LlamaConfig:
        """The config of what ``LlamaForCausalLM.from_pretrained`` loads from the same arguments, read
        without the weights. The end-of-sequence ids of ``generation_config.json`` join those of
        ``config.json``: Meta-Llama-3-8B-Instruct's config.json names only <|eot_id|>, its
        generation config adds <|end_of_text|>."""
        gguf_path = gguf_io.locate(path_or_name, gguf_file, subfolder)
        if gguf_path is not None:
            return cls.from_gguf(gguf_io.GGUFFile(gguf_path))
        folder = hf_loader.resolve(path_or_name, subfolder)
        config = cls.from_hf_config(hf_loader.read_config(folder))
        if (folder / "generation_config.json").exists():
            extra = hf_loader.read_config(folder, "generation_config.json").get("eos_token_id")
            config = dataclasses.replace(config, eos_token_ids=_token_ids([*config.eos_token_ids, *_token_ids(extra)]))
        return config

    @classmethod
    def from_gguf(cls, file: gguf_io.GGUFFile) -> LlamaConfig:
        """From a llama.cpp GGUF's metadata (``llama.*`` and ``tokenizer.ggml.*``) and tensor names.

        Absent optional keys take llama.cpp's defaults. The model is tied when the
        file has no ``output.weight``; its EOS ids are every end-of-generation id the
        file names (eos, and eot / eom where Llama-3 files add them).
        """
        arch = file.value("general.architecture")
        if arch != "llama":
            raise ValueError(f"{file.path}: general.architecture is {arch!r}; LlamaForCausalLM loads 'llama' GGUFs")
        hidden, heads = file.value("llama.embedding_length"), file.value("llama.attention.head_count")
        head_dim = file.value("llama.attention.key_length", hidden // heads)
        rope_dims = file.value("llama.rope.dimension_count", head_dim)
        if rope_dims != head_dim:
            raise ValueError(f"{file.path}: llama.rope.dimension_count is {rope_dims} but heads are {head_dim} wide; "
                             "partial rotary embeddings are not supported")
        if "rope_freqs.weight" in file.tensors:
            # Llama-3.1's scaled frequencies, which llama.cpp stores as a tensor of per-frequency divisors.
            raise ValueError(f"{file.path}: holds rope_freqs.weight (scaled rotary frequencies), which is not "
                             "supported; load the model's safetensors checkpoint instead")
        theta = float(file.value("llama.rope.freq_base", 10000.0))
        scaling = file.value("llama.rope.scaling.type", "none")
        if scaling == "none":
            rope = RopeConfig(theta=theta)
        elif scaling == "linear":
            rope = RopeConfig(type="linear", theta=theta, factor=float(file.value("llama.rope.scaling.factor")))
        else:
            raise ValueError(f"{file.path}: llama.rope.scaling.type {scaling!r} is not supported; "
                             "supported: none, linear")
        vocab = file.value("llama.vocab_size", None)
        if vocab is None:
            vocab = len(file.value("tokenizer.ggml.tokens"))
        eos = [file.value(f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
        return cls(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=file.value("llama.feed_forward_length"),
            num_layers=file.value("llama.block_count"), num_heads=heads,
            num_kv_heads=file.value("llama.attention.head_count_kv", heads), head_dim=head_dim,
            rms_norm_eps=file.value("llama.attention.layer_norm_rms_epsilon"), rope=rope,
            max_position_embeddings=file.value("llama.context_length"),
            tie_word_embeddings="output.weight" not in file.tensors,
            attention_bias="blk.0.attn_q.bias" in file.tensors, mlp_bias="blk.0.ffn_up.bias" in file.tensors,
            bos_token_id=file.value("tokenizer.ggml.bos_token_id", None),
            eos_token_ids=_token_ids([i for i in eos if i is not None]),
            pad_token_id=file.value("tokenizer.ggml.padding_token_id", None),
        )

    @classmethod
    def llama3_8b(cls, instruct: bool = True) -> LlamaConfig:
        """meta-llama/Meta-Llama-3-8B-Instruct, or Meta-Llama-3-8B with ``instruct=False``.

        The values are those of the two repositories' config.json on the Hugging Face hub (identical
        but for eos_token_id); the Instruct model's generation_config.json ends generation at
        <|end_of_text|> (128001) and <|eot_id|> (128009), the base model's at 128001 alone.
        """
        return cls(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
            num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope=RopeConfig(theta=500000.0),
            max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=128000,
            eos_token_ids=(128001, 128009) if instruct else (128001,),
        )

    @classmethod
    def vicuna_13b(cls) -> LlamaConfig:
        """lmsys/vicuna-13b-v1.5 (a Llama-2-13B fine-tune)."""
        return cls(
            vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
            num_kv_heads=40, head_dim=128, rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0),
            max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
        )

    @classmethod
    def published(cls, name: str) -> LlamaConfig:
        """The architecture of a published checkpoint by its hub name (``PUBLISHED``), without the hub."""
        if name not in PUBLISHED:
            raise ValueError(f"{name!r}: no published architecture of that name is known here "
                             f"(known: {', '.join(sorted(PUBLISHED))}); give a local folder or .gguf file")
        return PUBLISHED[name]()


# Architectures of published checkpoints by hub name, so a run can be planned before its weights are at
# hand (python -m nvl_jax.plan --from_config).
PUBLISHED = {
    "meta-llama/Meta-Llama-3-8B": lambda: LlamaConfig.llama3_8b(instruct=False),
    "meta-llama/Meta-Llama-3-8B-Instruct": LlamaConfig.llama3_8b,
    "lmsys/vicuna-13b-v1.5": LlamaConfig.vicuna_13b,
}


def _token_ids(value: int | list[int] | None) -> tuple[int, ...]:
    """One id, a list of ids or None -> a sorted tuple of distinct ids."""
    if value is None:
        return ()
    return tuple(sorted(set(value))) if isinstance(value, (list, tuple)) else (value,)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_cos_sin(inv_freq: np.ndarray, position_ids: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` of shape ``[batch, length, 1, head_dim]`` for ``position_ids [batch, length]``.

    Angles are computed in float32 whatever the model dtype, as transformers does.
    """
    freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x [batch, length, heads, head_dim]`` in transformers' rotate-half layout."""
    return x * cos + rotate_half(x) * sin


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention.

    q ``[batch, T, heads, head_dim]``; k, v ``[batch, S, kv_heads, head_dim]``;
    mask ``[batch, T, S]`` (True = attend). Returns ``[batch, T, heads, head_dim]``.
    Query heads are grouped per kv head by a reshape, so k and v are never repeated.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h) * jnp.asarray(h**-0.5, q.dtype)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)


class LlamaAttention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        hidden, h = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, h
        kw = dict(use_bias=config.attention_bias, custom_backward=False, dtype=dtype, rngs=rngs)
        self.q_proj = Dense(hidden, config.num_heads * h, axes=("embed", "heads"), **kw)
        self.k_proj = Dense(hidden, config.num_kv_heads * h, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Dense(hidden, config.num_kv_heads * h, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Dense(config.num_heads * h, hidden, axes=("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 kv: tuple[jax.Array, jax.Array] | None = None, slot: jax.Array | None = None):
        """x ``[batch, T, hidden]``; mask ``[batch, T, S]``.

        With ``kv`` (this layer's cache ``[batch, S, kv_heads, head_dim]`` each),
        the new keys and values are written at slots ``slot .. slot + T - 1`` and
        attention runs over the whole cache. Returns ``(out [batch, T, hidden], kv)``.
        """
        b, t, _ = x.shape
        q = sharding_lib.constrain(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), QUERY_AXES)
        k = sharding_lib.constrain(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), KV_AXES)
        v = sharding_lib.constrain(self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), KV_AXES)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            start = (0, slot, 0, 0)
            kv = (jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start),
                  jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start))
            k, v = kv
        out = sharding_lib.constrain(attention(q, k.astype(q.dtype), v.astype(q.dtype), mask), QUERY_AXES)
        return sharding_lib.constrain(self.o_proj(out.reshape(b, t, -1)), HIDDEN_AXES), kv


class LlamaMLP(nnx.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        hidden, inner = config.hidden_size, config.intermediate_size
        kw = dict(use_bias=config.mlp_bias, custom_backward=False, dtype=dtype, rngs=rngs)
        self.act = activation(config.hidden_act)
        self.gate_proj = Dense(hidden, inner, axes=("embed", "mlp"), **kw)
        self.up_proj = Dense(hidden, inner, axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(inner, hidden, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = sharding_lib.constrain(self.act(self.gate_proj(x)) * self.up_proj(x), MLP_AXES)
        return sharding_lib.constrain(self.down_proj(hidden), HIDDEN_AXES)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype, rngs=rngs)
        self.self_attn = LlamaAttention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype, rngs=rngs)
        self.mlp = LlamaMLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv=None, slot=None):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, slot)
        x = sharding_lib.constrain(x + h, HIDDEN_AXES)
        return sharding_lib.constrain(x + self.mlp(self.post_attention_layernorm(x)), HIDDEN_AXES), kv


def _run_layer(graphdef: nnx.GraphDef, treedef, leaves: list[jax.Array], x, cos, sin, mask):
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))(x, cos, sin, mask)[0]


class LlamaModel(nnx.Module):
    """Token embedding, decoder layers and the final norm (transformers' ``model.*``).

    ``remat`` names a policy of ``layers.REMAT_POLICIES``, applied to each decoder layer when
    there is no KV cache (training); it changes memory and compute, never the values.
    """

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs, remat: str = "none"):
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([LlamaDecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.rope, self.head_dim = config.rope, config.head_dim
        layers.check_remat(remat)
        self.remat = remat

    def __call__(self, x: jax.Array, attention_mask: jax.Array | None, position_ids: jax.Array | None,
                 cache: generation.KVCache | None):
        """x ``[batch, T, hidden]`` -> ``(normed hidden [batch, T, hidden], updated cache or None)``."""
        b, t, _ = x.shape
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if cache is None:
            slot, kv_cache = None, [None] * len(self.layers)
            key_valid, query_slots, key_slots, offset = valid, jnp.arange(t), jnp.arange(t), 0
        else:
            slot, kv_cache = cache.index, list(zip(cache.keys, cache.values, strict=True))
            key_valid = jax.lax.dynamic_update_slice(cache.mask, valid, (0, slot))
            query_slots, key_slots, offset = slot + jnp.arange(t), jnp.arange(cache.mask.shape[1]), cache.lengths
        if position_ids is None:
            # transformers' generate: pads take position 0, real tokens count on from the cache's length.
            position_ids = jnp.where(valid, jnp.cumsum(valid, axis=1) - 1 + jnp.reshape(offset, (-1, 1)), 0)
        mask = (key_slots[None, :] <= query_slots[:, None])[None] & key_valid[:, None, :]
        cos, sin = rope_cos_sin(self.rope.inv_freq(self.head_dim), position_ids, x.dtype)
        x = sharding_lib.constrain(x, HIDDEN_AXES)
        if cache is None and self.remat != "none":
            # Each layer goes in as plain arrays, not as a module: nnx.remat would write the module's
            # variables back, which fails when some are differentiated and others not (LoRA).
            for layer in self.layers:
                graphdef, state = nnx.split(layer)
                leaves, treedef = jax.tree.flatten(state)
                run = layers.remat(functools.partial(_run_layer, graphdef, treedef), self.remat)
                x = run(leaves, x, cos, sin, mask)
            return self.norm(x), None
        new_kv = []
        for layer, kv in zip(self.layers, kv_cache, strict=True):
            x, kv = layer(x, cos, sin, mask, kv, slot)
            new_kv.append(kv)
        if cache is not None:
            cache = cache.replace(keys=tuple(k for k, _ in new_kv), values=tuple(v for _, v in new_kv),
                                  mask=key_valid, lengths=cache.lengths + valid.sum(1, dtype=jnp.int32),
                                  index=cache.index + t)
        return self.norm(x), cache


@flax.struct.dataclass
class CausalLMOutput:
    """logits ``[batch, L, vocab]`` (the last ``logits_to_keep`` positions when that is set);
    hidden_states ``[batch, L, hidden]`` after the final norm, when asked for;
    cache: the updated :class:`~nvl_jax.models.generation.KVCache` when one was passed."""

    logits: jax.Array
    hidden_states: jax.Array | None = None
    cache: generation.KVCache | None = None


class LlamaForCausalLM(nnx.Module):
    """A Llama causal LM: ``model`` (:class:`LlamaModel`) and ``lm_head`` (None when tied to the embedding).

    ``__call__`` gives logits for a batch of sequences, ``embed`` the token
    embeddings that multimodal prefixes are merged into, ``generate`` new tokens.
    """

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 remat: str = "none"):
        """Random parameters (seed 0 unless ``rngs`` is given), stored and computed in ``dtype``.
        ``remat``: the decoder layers' rematerialization policy, one of ``layers.REMAT_POLICIES``."""
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config, self.dtype = config, dtype
        self.model = LlamaModel(config, dtype=dtype, rngs=rngs, remat=remat)
        self.lm_head = None if config.tie_word_embeddings else Dense(
            config.hidden_size, config.vocab_size, axes=("embed", "vocab"), use_bias=False, custom_backward=False,
            dtype=dtype, rngs=rngs)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings ``[batch, L, hidden]`` of ``input_ids [batch, L]``."""
        return self.model.embed_tokens(input_ids)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``[batch, L, hidden]`` -> ``[batch, L, vocab]`` through the LM head (or the tied embedding)."""
        if self.lm_head is not None:
            return sharding_lib.constrain(self.lm_head(hidden), LOGITS_AXES)
        return sharding_lib.constrain(hidden @ self.model.embed_tokens.embedding[...].astype(hidden.dtype).T,
                                      LOGITS_AXES)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        cache: generation.KVCache | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
    ) -> CausalLMOutput:
        """Runs ``input_ids [batch, L]`` or ``inputs_embeds [batch, L, hidden]``.

        attention_mask ``[batch, L]``: 1 for real tokens, 0 for padding (left
        padding for batches of prompts). position_ids ``[batch, L]`` default to
        ``cumsum(attention_mask) - 1`` (plus the cache's length per row).
        cache: written at its next slots and returned updated. logits_to_keep:
        0 for logits at every position, n for the last n only (prefill wants 1).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        hidden, cache = self.model(x, attention_mask, position_ids, cache)
        kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        return CausalLMOutput(logits=self.logits(kept), hidden_states=hidden if output_hidden_states else None,
                              cache=cache)

    def generate(self, prompts: list[list[int]] | np.ndarray | jax.Array | None = None,
                 **kwargs: Any) -> generation.GenerationOutput:
        """Samples continuations of token-id lists or a ``[batch, L]`` id array (with ``attention_mask=``);
        see :func:`nvl_jax.models.llama.generation.generate` for the arguments."""
        return generation.generate(self, prompts, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_name, *, gguf_file: str | None = None, subfolder: str | None = None,
                        dtype=jnp.float32, mesh=None, rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES,
                        remat: str = "none") -> LlamaForCausalLM:
        """Loads a Llama checkpoint: Hugging Face safetensors (single file or sharded) or a llama.cpp GGUF.

        A GGUF is a ``.gguf`` path, a folder holding one (and no config.json), or
        ``folder`` with ``gguf_file=name`` as in transformers; its tensors are
        dequantized to float32 (then cast to ``dtype``) and its config is read
        from its metadata (:meth:`LlamaConfig.from_gguf`); a folder's from its config files
        (:meth:`LlamaConfig.from_pretrained`). ``remat`` as in the constructor.
        """
        gguf_path = gguf_io.locate(path_or_name, gguf_file, subfolder)
        if gguf_path is not None:
            return cls.from_gguf(gguf_io.GGUFFile(gguf_path), dtype=dtype, mesh=mesh, rules=rules, remat=remat)
        folder = hf_loader.resolve(path_or_name, subfolder)
        config = LlamaConfig.from_pretrained(folder)
        return hf_loader.from_pretrained(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0), remat=remat), folder,
                                         key_map(config.tie_word_embeddings), mesh=mesh, rules=rules)

    @classmethod
    def from_gguf(cls, file: gguf_io.GGUFFile, *, dtype=jnp.float32, mesh=None,
                  rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES, remat: str = "none") -> LlamaForCausalLM:
        """Loads an opened GGUF (which :func:`nvl_jax.models.llama.tokenizer.tokenizer_from_gguf` can share)."""
        config = LlamaConfig.from_gguf(file)
        return hf_loader.from_pretrained(
            lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0), remat=remat), file.path.parent,
            gguf_key_map(config.num_heads, config.num_kv_heads, config.tie_word_embeddings),
            files=[file], mesh=mesh, rules=rules)
