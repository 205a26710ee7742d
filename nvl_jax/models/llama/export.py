"""Writes a ``LlamaForCausalLM`` as a Hugging Face folder (``config.json`` + ``model.safetensors``)
that transformers' ``LlamaForCausalLM.from_pretrained`` and this package's loader both read.

The inverse of ``params.key_map``: Dense kernels ``[in, out]`` are stored as Linear weights
``[out, in]``, ``scale`` as ``weight``. LoRA adapters must be merged first
(``brain_lm.lora.merge_lora``): an unmerged adapter is an error, not a silently dropped weight.
"""

from __future__ import annotations

import json
from pathlib import Path
import re

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

# (NNX path regex, checkpoint key template, transpose?)
_RULES = (
    (r"model\.embed_tokens\.embedding", "model.embed_tokens.weight", False),
    (r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.kernel", r"model.layers.\1.\2.\3.weight", True),
    (r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.bias", r"model.layers.\1.\2.\3.bias", False),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.scale", r"model.layers.\1.\2.weight", False),
    (r"model\.norm\.scale", "model.norm.weight", False),
    (r"lm_head\.kernel", "lm_head.weight", True),
)


def hf_config(config) -> dict:
    """transformers' ``LlamaConfig`` dict of a :class:`LlamaConfig`."""
    rope = {"rope_type": config.rope.type, "rope_theta": config.rope.theta}
    if config.rope.type == "linear":
        rope["factor"] = config.rope.factor
    elif config.rope.type == "llama3":
        rope.update(factor=config.rope.factor, low_freq_factor=config.rope.low_freq_factor,
                    high_freq_factor=config.rope.high_freq_factor,
                    original_max_position_embeddings=config.rope.original_max_position_embeddings)
    eos = list(config.eos_token_ids)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps, "rope_parameters": rope, "rope_theta": config.rope.theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias, "hidden_act": config.hidden_act, "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": config.pad_token_id,
    }


def checkpoint_tensors(model) -> dict[str, np.ndarray]:
    """``{checkpoint key: array}`` of every parameter of ``model``, on the host."""
    tensors = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(str(p) for p in path)
        for pattern, key, transpose in _RULES:
            if re.fullmatch(pattern, name):
                array = np.asarray(variable[...])
                tensors[re.sub(pattern, key, name)] = np.ascontiguousarray(array.T if transpose else array)
                break
        else:
            raise ValueError(f"{name}: no checkpoint key for this parameter (merge LoRA adapters before export)")
    return tensors


def save_pretrained(model, folder: str | Path) -> Path:
    """Writes ``folder/config.json`` and ``folder/model.safetensors``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint_tensors(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config(model.config), indent=2))
    return folder
