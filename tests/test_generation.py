"""KV-cache generation against transformers' generate and forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.generation.logits_process import TopPLogitsWarper

from nvl_jax.models.llama import generation
from nvl_jax.models.llama import LlamaForCausalLM

PROMPTS = [[1, 17, 99, 4, 56, 23, 8, 120, 64], [1, 42, 7, 88]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, our model): GQA, Llama-3.1 rope scaling, sharded checkpoint."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                             low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=16))
    reference = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("llama")
    reference.save_pretrained(folder, max_shard_size="100KB")
    return reference, LlamaForCausalLM.from_pretrained(folder)


def left_pad(prompts):
    width = max(map(len, prompts))
    ids = np.array([[0] * (width - len(p)) + p for p in prompts])
    return ids, np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts])


def torch_generate(reference, prompts, **kwargs):
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        out = reference.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                 do_sample=False, pad_token_id=0, **kwargs)
    return out[:, ids.shape[1]:].numpy()


def torch_logits(reference, ids):
    with torch.no_grad():
        return reference(input_ids=torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def greedy_reference(pair):
    """transformers' 20 greedy tokens per prompt, no EOS."""
    expected = torch_generate(pair[0], PROMPTS, max_new_tokens=20, eos_token_id=None)
    assert expected.shape == (2, 20)
    return expected


def test_greedy_matches_transformers(pair, greedy_reference):
    out = pair[1].generate(PROMPTS, max_new_tokens=20, eos_token_id=())
    np.testing.assert_array_equal(np.asarray(out.sequences), greedy_reference)
    np.testing.assert_array_equal(np.asarray(out.lengths), [20, 20])


def test_greedy_stops_at_eos_like_transformers(pair, greedy_reference):
    """Each row stops at its own EOS (two ids), pads after it, and generation ends when all rows stop."""
    eos = [int(greedy_reference[0, 5]), int(greedy_reference[1, 9])]
    expected = torch_generate(pair[0], PROMPTS, max_new_tokens=20, eos_token_id=eos)
    out = pair[1].generate(PROMPTS, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    assert expected.shape[1] < 20
    np.testing.assert_array_equal(np.asarray(out.sequences), expected)
    lengths = [next(i + 1 for i, t in enumerate(row) if t in eos) for row in expected]
    np.testing.assert_array_equal(np.asarray(out.lengths), lengths)


def test_ids_embeds_and_any_padding_give_the_same_tokens(pair, greedy_reference):
    """input_ids or inputs_embeds with a right-padded mask are left-aligned internally."""
    model = pair[1]
    width = max(map(len, PROMPTS))
    ids = np.array([p + [0] * (width - len(p)) for p in PROMPTS])
    mask = np.array([[1] * len(p) + [0] * (width - len(p)) for p in PROMPTS])
    from_ids = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=())
    from_embeds = model.generate(inputs_embeds=model.embed(jnp.asarray(ids)), attention_mask=mask,
                                 max_new_tokens=8, eos_token_id=())
    np.testing.assert_array_equal(np.asarray(from_ids.sequences), greedy_reference[:, :8])
    np.testing.assert_array_equal(np.asarray(from_embeds.sequences), greedy_reference[:, :8])


def test_padded_id_array_as_transformers_users_pass_it(pair, greedy_reference):
    """A left-padded ``[B, L]`` array, numpy or jax, with its attention mask, in place of token-id lists."""
    ids, mask = left_pad(PROMPTS)
    assert len(set(map(len, PROMPTS))) == 2 and not mask.all()
    for to_array in (np.asarray, jnp.asarray):
        out = pair[1].generate(to_array(ids), attention_mask=to_array(mask), max_new_tokens=20, eos_token_id=())
        np.testing.assert_array_equal(np.asarray(out.sequences), greedy_reference)
    unpadded = pair[1].generate(np.array([PROMPTS[0]]), max_new_tokens=20, eos_token_id=())
    np.testing.assert_array_equal(np.asarray(unpadded.sequences), greedy_reference[:1])


@pytest.mark.parametrize("inputs, kwargs, message", [
    (np.zeros((2, 3, 4), np.int32), {}, "input_ids must have 2 dimensions"),
    (np.zeros((2, 3), np.float32), {}, "integer token ids"),
    (np.zeros((2, 3), np.int32), dict(attention_mask=np.ones((2, 4))), r"attention_mask has shape \(2, 4\)"),
    (np.zeros((2, 3), np.int32), dict(attention_mask=np.array([[1, 1, 1], [0, 0, 0]])), r"rows \[1\] have no tokens"),
    ([[1, 2]], dict(attention_mask=np.ones((1, 2))), "token-id lists are padded here"),
])
def test_bad_array_inputs_fail_clearly(pair, inputs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pair[1].generate(inputs, max_new_tokens=2, **kwargs)


def test_prefill_and_decode_logits_equal_full_forward(pair):
    """The cached path's logits at every step match transformers' forward over the whole sequence."""
    reference, model = pair
    graphdef, params = nnx.split(model)
    ids, mask = left_pad(PROMPTS)
    ids, mask = np.pad(ids, [(0, 0), (23, 0)]), np.pad(mask, [(0, 0), (23, 0)])
    config = generation.GenerationConfig(max_new_tokens=6)
    logits, state = generation.prefill(graphdef, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0),
                                       max_len=64, config=config)
    steps = [logits]
    for _ in range(5):
        logits, state = generation.decode_step(graphdef, params, state, config=config)
        steps.append(logits)
    tokens = np.asarray(state.tokens)
    for row, prompt in enumerate(PROMPTS):
        expected = torch_logits(reference, prompt + tokens[row, :5].tolist())[len(prompt) - 1:]
        np.testing.assert_allclose(np.stack([s[row] for s in steps]), expected, atol=1e-4, rtol=0)


def test_top_p_filter_matches_transformers():
    logits = np.random.default_rng(0).normal(0, 3, (6, 128)).astype(np.float32)
    for top_p in (0.3, 0.9):
        expected = TopPLogitsWarper(top_p)(None, torch.from_numpy(logits)).numpy()
        got = np.asarray(generation.top_p_filter(jnp.asarray(logits), top_p))
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(expected))


def test_sampling_is_deterministic_and_stays_in_the_nucleus(pair):
    reference, model = pair
    prompts = [PROMPTS[0]] * 16
    sample = lambda key: model.generate(prompts, max_new_tokens=5, temperature=0.7, top_p=0.6,  # noqa: E731
                                        key=key, eos_token_id=())
    first, again, other = sample(jax.random.key(1)), sample(jax.random.key(1)), sample(jax.random.key(2))
    tokens = np.asarray(first.sequences)
    np.testing.assert_array_equal(tokens, np.asarray(again.sequences))
    assert not np.array_equal(tokens, np.asarray(other.sequences))
    assert len({tuple(row) for row in tokens}) > 1
    warper = TopPLogitsWarper(0.6)
    prompt = len(PROMPTS[0])
    for row in tokens:
        logits = torch.from_numpy(torch_logits(reference, PROMPTS[0] + row.tolist())[prompt - 1:-1] / 0.7)
        allowed = torch.isfinite(warper(None, logits)).numpy()
        assert allowed[np.arange(5), row].all()
