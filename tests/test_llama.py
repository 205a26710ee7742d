"""The Llama causal LM against transformers' LlamaForCausalLM, and its config parsing."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from nvl_jax import sharding
from nvl_jax.models.llama import LlamaConfig, LlamaForCausalLM, RopeConfig

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
CHECKPOINTS = {
    # Grouped-query attention, Llama-3.1 rope scaling, untied head; saved in shards.
    "gqa_llama3": dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE,
                       tie_word_embeddings=False),
    # Multi-head attention, plain rope, head tied to the embedding, biases on.
    "tied_bias": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                      attention_bias=True, mlp_bias=True),
}


def build_reference(name: str) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, **CHECKPOINTS[name])
    model = transformers.LlamaForCausalLM(config).eval()
    # Random biases: the default zeros would hide a bias that is loaded wrongly.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its saved checkpoint, folder)."""
    reference = build_reference(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder, max_shard_size="100KB" if request.param == "gqa_llama3" else "10MB")
    return reference, LlamaForCausalLM.from_pretrained(folder), folder


def torch_logits(model, ids, attention_mask=None, position_ids=None):
    as_torch = lambda a: None if a is None else torch.from_numpy(np.asarray(a, np.int64))  # noqa: E731
    with torch.no_grad():
        return model(input_ids=as_torch(ids), attention_mask=as_torch(attention_mask),
                     position_ids=as_torch(position_ids)).logits.numpy()


def test_checkpoint_layouts(pair):
    reference, model, folder = pair
    assert (folder / "model.safetensors.index.json").exists() == (not reference.config.tie_word_embeddings)
    assert (model.lm_head is None) == reference.config.tie_word_embeddings
    assert model.config.num_kv_heads == reference.config.num_key_value_heads


@pytest.mark.parametrize("shape", [(1, 7), (3, 40)])
def test_logits_match_transformers(pair, shape):
    reference, model, _ = pair
    ids = np.random.default_rng(shape[1]).integers(0, 128, shape)
    expected = torch_logits(reference, ids)
    got = np.asarray(model(jnp.asarray(ids)).logits)
    assert got.shape == (*shape, 128)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    if model.config.rope.type == "llama3" and shape[1] > model.config.rope.original_max_position_embeddings:
        # Past original_max_position_embeddings the scaling is visible: plain rope misses by far more.
        plain = LlamaForCausalLM(dataclasses.replace(model.config, rope=RopeConfig(theta=model.config.rope.theta)))
        nnx.update(plain, nnx.state(model))
        assert np.abs(np.asarray(plain(jnp.asarray(ids)).logits) - expected).max() > 1e-3


def test_inputs_embeds_equal_input_ids(pair):
    _, model, _ = pair
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 9)))
    from_ids = model(ids, output_hidden_states=True)
    from_embeds = model(inputs_embeds=model.embed(ids), output_hidden_states=True)
    np.testing.assert_array_equal(np.asarray(from_embeds.logits), np.asarray(from_ids.logits))
    assert from_ids.hidden_states.shape == (2, 9, 64)


def test_left_padded_batch_matches_each_prompt_alone(pair):
    """Padding is masked and positions restart at each row's first real token."""
    reference, model, _ = pair
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 128, n) for n in (12, 7, 1)]
    ids = np.zeros((3, 12), np.int64)
    mask = np.zeros((3, 12), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, 12 - len(prompt):], mask[row, 12 - len(prompt):] = prompt, 1
    got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    for row, prompt in enumerate(prompts):
        alone = torch_logits(reference, prompt[None])[0]
        np.testing.assert_allclose(got[row, 12 - len(prompt):], alone, atol=1e-4, rtol=0)


def test_forward_on_a_2x2x2_mesh_equals_unsharded(pair):
    _, model, folder = pair
    mesh = sharding.make_mesh((2, 2, 2))
    sharded_model = LlamaForCausalLM.from_pretrained(folder, mesh=mesh)
    ids = np.random.default_rng(3).integers(0, 128, (4, 16))
    sharded_ids = jax.device_put(ids, sharding.batch_sharding(mesh, 2))
    graphdef, state = nnx.split(sharded_model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).logits)
    got = forward(state, sharded_ids)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), np.asarray(model(jnp.asarray(ids)).logits), atol=1e-5, rtol=0)


def test_legacy_config_format_parses_to_the_same_config(pair):
    """Older config.json files keep rope_theta at the top and name the scaling rope_scaling."""
    _, model, folder = pair
    current = json.loads((folder / "config.json").read_text())
    legacy = {k: v for k, v in current.items() if k != "rope_parameters"}
    params = dict(current["rope_parameters"])
    legacy["rope_theta"] = params.pop("rope_theta")
    legacy["rope_scaling"] = None if params["rope_type"] == "default" else {"type": params.pop("rope_type"), **params}
    assert LlamaConfig.from_hf_config(legacy) == LlamaConfig.from_hf_config(current) == model.config


def test_hub_configs_parse_to_the_presets():
    """config.json of meta-llama/Meta-Llama-3-8B-Instruct and lmsys/vicuna-13b-v1.5, as published."""
    common = dict(architectures=["LlamaForCausalLM"], hidden_act="silu", model_type="llama", pretraining_tp=1,
                  rms_norm_eps=1e-05, rope_scaling=None, tie_word_embeddings=False, use_cache=True)
    llama3 = dict(common, bos_token_id=128000, eos_token_id=[128001, 128009], hidden_size=4096,
                  intermediate_size=14336, max_position_embeddings=8192, num_attention_heads=32,
                  num_hidden_layers=32, num_key_value_heads=8, rope_theta=500000.0, vocab_size=128256)
    vicuna = dict(common, bos_token_id=1, eos_token_id=2, hidden_size=5120, intermediate_size=13824,
                  max_position_embeddings=4096, num_attention_heads=40, num_hidden_layers=40,
                  num_key_value_heads=40, pad_token_id=0, vocab_size=32000)
    assert LlamaConfig.from_hf_config(llama3) == LlamaConfig.llama3_8b()
    assert LlamaConfig.from_hf_config(vicuna) == LlamaConfig.vicuna_13b()


@pytest.mark.parametrize("scaling", [{"type": "dynamic", "factor": 2.0}, {"rope_type": "yarn", "factor": 4.0}])
def test_unsupported_rope_types_fail_clearly(scaling):
    config = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                  rope_scaling=scaling)
    with pytest.raises(ValueError, match="rope type .* is not supported"):
        LlamaConfig.from_hf_config(config)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    dict(LLAMA3_ROPE, rope_theta=500000.0, original_max_position_embeddings=64),
])
def test_scaled_rope_frequencies_match_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, rope_parameters=dict(rope))
    expected, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config)
    got = LlamaConfig.from_hf_config(config.to_dict()).rope.inv_freq(32)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6)


def test_export_is_read_back_by_transformers_with_the_same_logits(tmp_path):
    from nvl_jax.models.llama import export

    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, rope=RopeConfig(theta=500.0), tie_word_embeddings=False,
                         eos_token_ids=(2, 3))
    ours = LlamaForCausalLM(config, rngs=nnx.Rngs(3))
    folder = export.save_pretrained(ours, tmp_path / "hf")
    theirs = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    ids = np.array([[1, 5, 9, 17, 33, 2]])
    with torch.no_grad():
        expected = theirs(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids)).logits), expected, rtol=1e-5, atol=1e-5)
    reloaded = LlamaForCausalLM.from_pretrained(folder)
    assert reloaded.config == config


def test_projections_train_with_autodiff_even_when_the_hand_written_passes_are_on():
    from nvl_jax.models import layers

    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=8, tie_word_embeddings=False)
    graphdef, params = nnx.split(LlamaForCausalLM(config, rngs=nnx.Rngs(4)))
    ids = jnp.asarray([[1, 5, 9, 17]])

    def mean_logit(params):
        return nnx.merge(graphdef, params)(ids).logits.mean()

    previous = layers.set_custom_backward("on")
    try:  # forward mode needs every matmul free of custom_vjp
        _, directional = jax.jvp(mean_logit, (params,), (params,))
        gradient = jax.grad(mean_logit)(params)
    finally:
        layers.set_custom_backward(previous)
    expected = sum(jnp.vdot(g, p) for g, p in zip(jax.tree.leaves(gradient), jax.tree.leaves(params)))
    np.testing.assert_allclose(float(directional), float(expected), rtol=1e-4)
