"""The shared checkpoint loader: file discovery, dtype casting and its one clear mismatch error."""

import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from nvl_jax.models import hf_loader, llama
from nvl_jax.models.safetensors_io import SafetensorsError, SafetensorsFile


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _rewrite(src, dst, edit):
    """Copies the checkpoint folder ``src`` to ``dst`` with ``edit(tensors)`` applied to its weights."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_key_is_named(llama_dir, tmp_path):
    folder = _rewrite(llama_dir, tmp_path / "c", lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(hf_loader.CheckpointMismatchError) as e:
        llama.LlamaForCausalLM.from_pretrained(folder)
    message = str(e.value)
    assert str(folder) in message and "model.safetensors" in message
    assert "missing from the checkpoint (model parameters) (1)" in message
    assert "layers.0.mlp.up_proj.kernel [32, 48]" in message


def test_extra_key_is_named(llama_dir, tmp_path):
    def add(t):
        t["model.layers.0.self_attn.rotary_scale"] = np.ones(4, np.float32)
    folder = _rewrite(llama_dir, tmp_path / "c", add)
    with pytest.raises(hf_loader.CheckpointMismatchError) as e:
        llama.LlamaForCausalLM.from_pretrained(folder)
    assert "unused checkpoint keys (1):" in str(e.value)
    assert "model.safetensors: model.layers.0.self_attn.rotary_scale [4]" in str(e.value)


def test_wrong_shape_is_named(llama_dir, tmp_path):
    def shrink(t):
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][:16]
    folder = _rewrite(llama_dir, tmp_path / "c", shrink)
    with pytest.raises(hf_loader.CheckpointMismatchError) as e:
        llama.LlamaForCausalLM.from_pretrained(folder)
    assert "wrong shapes (1):" in str(e.value)
    assert "model.layers.0.self_attn.q_proj.weight has shape [16, 32], model expects [32, 32]" in str(e.value)
    assert "missing" not in str(e.value)  # a wrong shape is reported once, not also as missing


def test_every_problem_in_one_error(llama_dir, tmp_path):
    def break_all(t):
        t.pop("model.norm.weight")
        t["lm_head.bias"] = np.zeros(64, np.float32)
        t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"][:, :8]
    folder = _rewrite(llama_dir, tmp_path / "c", break_all)
    with pytest.raises(hf_loader.CheckpointMismatchError) as e:
        llama.LlamaForCausalLM.from_pretrained(folder)
    message = str(e.value)
    assert "missing from the checkpoint" in message and "norm.scale" in message
    assert "unused checkpoint keys" in message and "lm_head.bias" in message
    assert "wrong shapes" in message and "model.embed_tokens.weight" in message


def test_bf16_checkpoint_is_cast_to_requested_dtype(llama_dir, tmp_path):
    folder = tmp_path / "bf16"
    model = transformers.LlamaForCausalLM.from_pretrained(llama_dir).to(torch.bfloat16)
    model.save_pretrained(folder)
    assert SafetensorsFile(folder / "model.safetensors").tensors["lm_head.weight"].dtype == ml_dtypes.bfloat16
    expected = model.lm_head.weight.float().detach().numpy().T
    ours = llama.LlamaForCausalLM.from_pretrained(folder, dtype=jnp.float32)
    assert ours.lm_head.kernel[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(ours.lm_head.kernel[...]), expected)
    ours16 = llama.LlamaForCausalLM.from_pretrained(folder, dtype=jnp.bfloat16)
    assert ours16.lm_head.kernel[...].dtype == jnp.bfloat16


def test_missing_shard_and_missing_weights_are_clear(llama_dir, tmp_path):
    folder = tmp_path / "sharded"
    transformers.LlamaForCausalLM.from_pretrained(llama_dir).save_pretrained(folder, max_shard_size="10KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (folder / victim).unlink()
    with pytest.raises(FileNotFoundError, match=f"model.safetensors.index.json: names shards that are missing.*{victim}"):
        llama.LlamaForCausalLM.from_pretrained(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        llama.LlamaForCausalLM.from_pretrained(empty)
    with pytest.raises(FileNotFoundError, match="not a local folder and could not be fetched"):
        llama.LlamaForCausalLM.from_pretrained(str(tmp_path / "nowhere" / "model"))


def test_truncated_safetensors_is_named(llama_dir, tmp_path):
    path = tmp_path / "model.safetensors"
    data = (llama_dir / "model.safetensors").read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(SafetensorsError, match=f"{path}.*truncated"):
        SafetensorsFile(path)


def test_keymap_first_rule_wins_and_groups_expand():
    key_map = hf_loader.KeyMap(
        rules=[(r"a\.(\d+)\.w", r"blocks.\1.kernel", hf_loader.linear), (r"a\..*", "other", None)],
        ignore=[r"buffers\..*"])
    assert key_map.target("a.3.w") == ("blocks.3.kernel", hf_loader.linear)
    assert key_map.target("a.x") == ("other", None)
    assert key_map.target("b") is None
    assert key_map.ignores("buffers.inv_freq") and not key_map.ignores("a.3.w")


def test_bin_checkpoint_converts_and_loads(llama_dir, tmp_path):
    """A hub-style sharded pytorch_model-*.bin folder (as vicuna-13b-v1.5 ships) converts and loads exactly."""
    from nvl_jax.models import convert_to_safetensors

    reference = transformers.LlamaForCausalLM.from_pretrained(llama_dir).to(torch.bfloat16)
    state = reference.state_dict()
    src = tmp_path / "bin"
    src.mkdir()
    keys = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, shard_keys in halves.items():
        torch.save({k: state[k] for k in shard_keys}, src / name)
    weight_map = {k: name for name, shard_keys in halves.items() for k in shard_keys}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(llama_dir / "config.json", src / "config.json")

    dst = convert_to_safetensors.convert(src, tmp_path / "st")
    assert (dst / "model.safetensors.index.json").exists() and (dst / "config.json").exists()
    assert not list(dst.glob("*.bin"))
    ours = llama.LlamaForCausalLM.from_pretrained(dst, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(ours.model.embed_tokens.embedding[...]),
                                  reference.model.embed_tokens.weight.detach().float().numpy())
