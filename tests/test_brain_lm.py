"""The brain-language model: merging at <image>, padding sides, LoRA, the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nvl_jax.models import brain_lm, llama, vit3d
from nvl_jax.models.brain_lm import IGNORE_INDEX, IMAGE_TOKEN_INDEX

LLM = llama.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)
CONFIG = brain_lm.BrainLMConfig(extractor=vit3d.ViT3DConfig.tiny(), llm=LLM)


def _model(lora_rank=0):
    config = brain_lm.BrainLMConfig(extractor=CONFIG.extractor, llm=LLM, lora=brain_lm.LoRAConfig(rank=lora_rank))
    return brain_lm.BrainLanguageModel(config, rngs=nnx.Rngs(0))


def _patches(batch, seed=0):
    cfg = CONFIG.extractor
    rng = np.random.default_rng(seed)
    coords = np.array([[0, 0, 0], [1, 2, 1], [0, 1, 1], [1, 0, 0], [0, 2, 1]], np.int32)
    return jnp.asarray(rng.normal(size=(batch, len(coords), cfg.patch_dim)), jnp.float32), jnp.asarray(coords)


def _naive_merge(text, ids, brain, mask):
    rows = []
    for t, i, b, m in zip(text, ids, brain, mask):
        p = int(np.flatnonzero(i == IMAGE_TOKEN_INDEX)[0])
        rows.append((np.concatenate([t[:p], b, t[p + 1:]]), np.concatenate([m[:p], np.ones(len(b)), m[p + 1:]])))
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def test_merge_puts_the_brain_tokens_at_the_placeholder_of_each_row():
    rng = np.random.default_rng(1)
    ids = np.array([[5, IMAGE_TOKEN_INDEX, 7, 8, 0, 0], [0, 0, 4, 5, 6, IMAGE_TOKEN_INDEX]], np.int32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], np.int32)
    labels = np.where(mask == 1, ids, IGNORE_INDEX)
    text, brain = rng.normal(size=(2, 6, 3)), rng.normal(size=(2, 4, 3))
    embeds, merged_mask, merged_labels = brain_lm.merge_brain_tokens(jnp.asarray(text), jnp.asarray(ids),
                                                                      jnp.asarray(brain), jnp.asarray(mask),
                                                                      jnp.asarray(labels))
    expected, expected_mask = _naive_merge(text, ids, brain, mask)
    np.testing.assert_allclose(embeds, expected, rtol=1e-6)
    np.testing.assert_array_equal(merged_mask, expected_mask)
    np.testing.assert_array_equal(merged_labels[0], [5, -100, -100, -100, -100, 7, 8, -100, -100])
    brain_lm.check_placeholders(ids)
    with pytest.raises(ValueError, match=r"rows \[1\] hold \[0\] <image> placeholders"):
        brain_lm.check_placeholders(np.array([ids[0], [1, 2, 3, 4, 5, 6]]))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_a_padded_batch_gives_each_row_its_unpadded_logits(padding_side):
    """Rows of different lengths, padded either side: positions and masks line up as for a lone row."""
    model = _model()
    prompts = [[1, 9, IMAGE_TOKEN_INDEX, 11, 12, 13], [1, IMAGE_TOKEN_INDEX, 20]]
    width = max(map(len, prompts))
    ids = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), np.int32)
    for row, p in enumerate(prompts):
        span = slice(width - len(p), width) if padding_side == "left" else slice(0, len(p))
        ids[row, span], mask[row, span] = p, 1
    patches, coords = _patches(2)
    batched = model(patches, coords, jnp.asarray(ids), jnp.asarray(mask)).logits
    n = len(coords) + 1
    for row, p in enumerate(prompts):
        alone = model(patches[row:row + 1], coords, jnp.asarray([p]), jnp.ones((1, len(p)), jnp.int32)).logits[0]
        length = len(p) - 1 + n
        got = batched[row, -length:] if padding_side == "left" else batched[row, :length]
        np.testing.assert_allclose(got, alone, rtol=2e-5, atol=2e-5)


def test_brain_tokens_are_the_penultimate_layer_with_cls():
    model = _model()
    patches, coords = _patches(2)
    hidden = model.encoder(patches, coords, output_hidden_states=True).hidden_states[-2]
    tokens = model.brain_tokens(patches, coords)
    assert tokens.shape == (2, len(coords) + 1, LLM.hidden_size)
    np.testing.assert_allclose(tokens, model.projector(hidden), rtol=1e-6)


def test_lora_starts_at_the_base_model_and_merges_exactly():
    base, adapted = _model(), _model(lora_rank=4)
    patches, coords = _patches(1)
    ids = jnp.asarray([[1, IMAGE_TOKEN_INDEX, 5, 6]])
    mask = jnp.ones_like(ids)
    np.testing.assert_allclose(adapted(patches, coords, ids, mask).logits, base(patches, coords, ids, mask).logits,
                               rtol=1e-6, atol=1e-6)
    # Move the adapters off zero, then fold them in: the merged model computes the same.
    for variable in jax.tree.leaves(nnx.state(adapted, brain_lm.lora.LoRAParam), is_leaf=lambda x: isinstance(x, nnx.Variable)):
        variable[...] = variable[...] + 0.05
    before = adapted(patches, coords, ids, mask).logits
    assert not np.allclose(before, base(patches, coords, ids, mask).logits, atol=1e-4)
    brain_lm.lora.merge_lora(adapted.llm)
    assert not nnx.state(adapted, brain_lm.lora.LoRAParam)
    np.testing.assert_allclose(adapted(patches, coords, ids, mask).logits, before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown: \\['qkv'\\]"):
        brain_lm.lora.apply_lora(base.llm, 4, 8.0, ("qkv",), rngs=nnx.Rngs(0))


def test_next_token_loss_covers_supervised_tokens_only():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(1, 5, 7)), jnp.float32)
    labels = jnp.asarray([[IGNORE_INDEX, IGNORE_INDEX, 3, IGNORE_INDEX, 6]])
    loss, count = brain_lm.next_token_loss(logits, labels)
    log_probs = jax.nn.log_softmax(np.asarray(logits[0]))
    expected = -(log_probs[1, 3] + log_probs[3, 6]) / 2
    assert int(count) == 2
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
