"""Autoregressive generation with a preallocated key/value cache.

Shapes stay static so each phase compiles once per (batch, bucketed prompt
length, cache length): prompts are left-padded up to a multiple of ``bucket``,
so every row's last prompt token sits in the same cache slot and each decode
step writes all rows at one slot with ``lax.dynamic_update_slice``. Two jitted
functions do the work: :func:`prefill` (prompt -> first token + filled cache)
and :func:`decode_step` (one token per row -> the next, the cache donated and
updated in place). The host loop asks whether every row is finished only every
``check_every`` steps, so the device is never idle waiting on a per-token sync.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@flax.struct.dataclass
class KVCache:
    """Per-layer keys and values ``[batch, max_len, kv_heads, head_dim]``.

    mask ``[batch, max_len]``: the slot holds a real token (False for padding and
    unwritten slots); lengths ``[batch]``: real tokens so far, i.e. the next
    position id; index ``[]``: the next slot to write, shared by all rows.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    mask: jax.Array
    lengths: jax.Array
    index: jax.Array

    @classmethod
    def create(cls, config, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        """An empty cache for a ``LlamaConfig``-like config (num_layers, num_kv_heads, head_dim)."""
        shape = (batch, max_len, config.num_kv_heads, config.head_dim)
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
            mask=jnp.zeros((batch, max_len), bool),
            lengths=jnp.zeros((batch,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How tokens are chosen and when rows stop; static under jit (hashable).

    temperature 0 is greedy decoding; top_p < 1 samples from the nucleus, the
    smallest set of tokens whose probabilities sum to at least ``top_p``.
    A row stops after emitting any of ``eos_token_ids`` and emits ``pad_token_id`` after.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0


@flax.struct.dataclass
class DecodeState:
    """What the decode loop carries.

    cache: the :class:`KVCache`; tokens ``[batch, max_new_tokens]``: emitted
    tokens, pad where not yet written; last ``[batch]``: the token to feed next;
    done ``[batch]``: the row has emitted an EOS; lengths ``[batch]``: tokens
    emitted per row, EOS included; step ``[]``: columns of ``tokens`` written;
    key: the PRNG key for sampling.
    """

    cache: KVCache
    tokens: jax.Array
    last: jax.Array
    done: jax.Array
    lengths: jax.Array
    step: jax.Array
    key: jax.Array


@flax.struct.dataclass
class GenerationOutput:
    """sequences ``[batch, new_tokens]`` int32: new tokens only, ``pad_token_id`` after a row's EOS,
    as many columns as the longest row; lengths ``[batch]`` int32: new tokens per row, EOS included."""

    sequences: jax.Array
    lengths: jax.Array


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Sets logits ``[batch, vocab]`` outside the nucleus to -inf.

    A token is kept when the tokens ranked above it hold less than ``top_p``
    of the probability, so the top token is always kept (transformers' rule).
    """
    sorted_logits = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    kept = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    threshold = jnp.take_along_axis(sorted_logits, kept.sum(-1, keepdims=True) - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample(logits: jax.Array, key: jax.Array, config: GenerationConfig) -> jax.Array:
    """Next tokens ``[batch]`` int32 from logits ``[batch, vocab]``."""
    if config.temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / config.temperature
    if config.top_p < 1:
        logits = top_p_filter(logits, config.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _emit(state: DecodeState, logits: jax.Array, config: GenerationConfig) -> DecodeState:
    """Samples from ``logits [batch, vocab]`` and records the token of every unfinished row."""
    key, sub = jax.random.split(state.key) if config.temperature > 0 else (state.key, state.key)
    token = jnp.where(state.done, config.pad_token_id, sample(logits, sub, config))
    done = state.done | jnp.isin(token, jnp.asarray(config.eos_token_ids, jnp.int32))
    return state.replace(
        tokens=jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step)),
        last=token, done=done, lengths=state.lengths + (~state.done).astype(jnp.int32),
        step=state.step + 1, key=key,
    )


def _prefill(graphdef: nnx.GraphDef, params: nnx.State, inputs: jax.Array, attention_mask: jax.Array,
             key: jax.Array, *, max_len: int, config: GenerationConfig) -> tuple[jax.Array, DecodeState]:
    model = nnx.merge(graphdef, params)
    mask = attention_mask.astype(bool)
    # A stable sort of the mask moves padding to the front and keeps token order.
    order = jnp.argsort(mask, axis=1, stable=True)
    mask = jnp.take_along_axis(mask, order, axis=1)
    embeds = model.embed(inputs) if inputs.ndim == 2 else inputs
    embeds = jnp.take_along_axis(embeds, order[:, :, None], axis=1)
    batch = embeds.shape[0]
    cache = KVCache.create(model.config, batch, max_len, model.dtype)
    out = model(inputs_embeds=embeds, attention_mask=mask, cache=cache, logits_to_keep=1)
    logits = out.logits[:, -1]
    state = DecodeState(
        cache=out.cache, tokens=jnp.full((batch, config.max_new_tokens), config.pad_token_id, jnp.int32),
        last=jnp.zeros((batch,), jnp.int32), done=jnp.zeros((batch,), bool),
        lengths=jnp.zeros((batch,), jnp.int32), step=jnp.zeros((), jnp.int32), key=key,
    )
    return logits, _emit(state, logits, config)


def _decode_step(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, *,
                 config: GenerationConfig) -> tuple[jax.Array, DecodeState]:
    model = nnx.merge(graphdef, params)
    out = model(state.last[:, None], cache=state.cache, logits_to_keep=1)
    logits = out.logits[:, -1]
    return logits, _emit(state.replace(cache=out.cache), logits, config)


@functools.lru_cache(maxsize=8)
def _jitted(graphdef: nnx.GraphDef):
    """The jitted prefill and decode step of one model structure.

    Binding the graphdef here, instead of passing it as a static argument,
    hashes it once per ``generate`` rather than once per token.
    """
    return (jax.jit(functools.partial(_prefill, graphdef), static_argnames=("max_len", "config")),
            jax.jit(functools.partial(_decode_step, graphdef), static_argnames=("config",),
                    donate_argnames=("state",)))


def prefill(graphdef: nnx.GraphDef, params: nnx.State, inputs: jax.Array, attention_mask: jax.Array,
            key: jax.Array, *, max_len: int, config: GenerationConfig) -> tuple[jax.Array, DecodeState]:
    """Runs the prompt and samples the first new token (jitted).

    inputs: token ids ``[batch, L]`` or embeddings ``[batch, L, hidden]``;
    attention_mask ``[batch, L]`` with any padding layout (rows are left-aligned
    here). Returns the logits of each row's last real token ``[batch, vocab]``
    and the decode state with a cache of ``max_len`` slots, L of them filled.
    """
    return _jitted(graphdef)[0](params, inputs, attention_mask, key, max_len=max_len, config=config)


def decode_step(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, *,
                config: GenerationConfig) -> tuple[jax.Array, DecodeState]:
    """Feeds ``state.last`` and samples the next token (jitted).

    Returns the logits ``[batch, vocab]`` the token was sampled from and the
    new state; the old state is donated, so the cache is updated in place.
    """
    return _jitted(graphdef)[1](params, state, config=config)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = 1
    return ids, mask


def _as_batch(name: str, array, dims: int) -> np.ndarray | jax.Array:
    """A jax array as is, anything else (numpy, a torch tensor, nested lists) through numpy; checks its rank."""
    array = array if isinstance(array, jax.Array) else np.asarray(array)
    if array.ndim != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(array.shape)}")
    return array


def generate(
    model,
    prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array | None = None,
    *,
    input_ids: jax.Array | None = None,
    inputs_embeds: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    key: jax.Array | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    bucket: int = 8,
    check_every: int = 8,
) -> GenerationOutput:
    """Continues a batch of prompts with a ``LlamaForCausalLM``-like model.

    Give exactly one of: ``prompts`` (token-id lists of any lengths),
    ``input_ids [batch, L]`` (an integer array, numpy or jax; also accepted
    in place of ``prompts``, as transformers users pass it) or
    ``inputs_embeds [batch, L, hidden]`` (e.g. text with brain tokens merged
    in), the last two with an optional ``attention_mask [batch, L]`` (1 = real
    token, 0 = padding, left or right or anywhere).
    eos_token_id: one id or several; None takes the config's, ``()`` stops
    only at ``max_new_tokens``. pad_token_id defaults to the config's, else the
    first EOS id, else 0. temperature 0 is greedy; otherwise tokens are sampled
    with ``key`` (a ``jax.random`` key), from the top-p nucleus when
    ``top_p < 1``. Prompts are padded to a multiple of ``bucket`` tokens to
    limit recompilation; whether all rows are done is checked every
    ``check_every`` tokens.
    """
    if prompts is not None and not isinstance(prompts, Sequence):
        if input_ids is not None:
            raise ValueError("pass exactly one of prompts, input_ids and inputs_embeds")
        prompts, input_ids = None, prompts
    if sum(x is not None for x in (prompts, input_ids, inputs_embeds)) != 1:
        raise ValueError("pass exactly one of prompts, input_ids and inputs_embeds")
    if prompts is not None and attention_mask is not None:
        raise ValueError("attention_mask goes with input_ids or inputs_embeds; token-id lists are padded here")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    cfg = model.config
    eos = cfg.eos_token_ids if eos_token_id is None else (
        tuple(eos_token_id) if isinstance(eos_token_id, Sequence) else (eos_token_id,))
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                              eos_token_ids=tuple(int(i) for i in eos), pad_token_id=int(pad_token_id))

    if prompts is not None:
        inputs, attention_mask = _left_pad(prompts, config.pad_token_id)
    else:
        if input_ids is not None:
            inputs = _as_batch("input_ids", input_ids, 2)
            if not jnp.issubdtype(inputs.dtype, jnp.integer):
                raise ValueError(f"input_ids must hold integer token ids, got dtype {inputs.dtype}")
        else:
            inputs = _as_batch("inputs_embeds", inputs_embeds, 3)
        if attention_mask is None:
            attention_mask = np.ones(inputs.shape[:2], np.int32)
        attention_mask = _as_batch("attention_mask", attention_mask, 2)
        if attention_mask.shape != inputs.shape[:2]:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the inputs "
                             f"[batch, L] = {tuple(inputs.shape[:2])}")
        empty = np.flatnonzero(~np.asarray(attention_mask).astype(bool).any(axis=1))
        if empty.size:
            raise ValueError(f"attention_mask rows {empty.tolist()} have no tokens (all 0)")
    length = _round_up(inputs.shape[1], bucket)
    extra = length - inputs.shape[1]
    inputs = jnp.pad(jnp.asarray(inputs), [(0, 0), (extra, 0)] + [(0, 0)] * (inputs.ndim - 2))
    attention_mask = jnp.pad(jnp.asarray(attention_mask), [(0, 0), (extra, 0)])
    # The last sampled token is never fed back, hence max_new_tokens - 1 decode slots.
    max_len = _round_up(length + max_new_tokens - 1, bucket)
    key = jax.random.key(0) if key is None else key

    graphdef, params = nnx.split(model)
    run_prefill, run_decode_step = _jitted(graphdef)
    _, state = run_prefill(params, inputs, attention_mask, key, max_len=max_len, config=config)
    for step in range(1, max_new_tokens):
        if config.eos_token_ids and step % check_every == 0 and bool(state.done.all()):
            break
        _, state = run_decode_step(params, state, config=config)
    lengths = state.lengths
    width = int(lengths.max())
    return GenerationOutput(sequences=state.tokens[:, :width], lengths=lengths)
