"""How transformers' ``LlamaForCausalLM`` safetensors keys map onto :class:`nvl_jax.models.llama.LlamaForCausalLM`.

Module paths match transformers' one for one; Linear weights ``[out, in]``
become Dense kernels ``[in, out]`` and RMSNorm ``weight`` becomes ``scale``.
"""

from __future__ import annotations

from nvl_jax.models.hf_loader import KeyMap, linear

_LAYER = r"model\.layers\.(\d+)\."


def key_map(tie_word_embeddings: bool) -> KeyMap:
    """The key table; a tied model has no LM head and ignores a stored ``lm_head.weight``."""
    rules = [
        (r"model\.embed_tokens\.weight", "model.embed_tokens.embedding", None),
        (_LAYER + r"self_attn\.([qkvo]_proj)\.weight", r"model.layers.\1.self_attn.\2.kernel", linear),
        (_LAYER + r"self_attn\.([qkvo]_proj)\.bias", r"model.layers.\1.self_attn.\2.bias", None),
        (_LAYER + r"mlp\.(gate_proj|up_proj|down_proj)\.weight", r"model.layers.\1.mlp.\2.kernel", linear),
        (_LAYER + r"mlp\.(gate_proj|up_proj|down_proj)\.bias", r"model.layers.\1.mlp.\2.bias", None),
        (_LAYER + r"(input_layernorm|post_attention_layernorm)\.weight", r"model.layers.\1.\2.scale", None),
        (r"model\.norm\.weight", "model.norm.scale", None),
    ]
    # Old conversions stored the rotary tables; they are recomputed from the config.
    ignore = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq"]
    if tie_word_embeddings:
        ignore.append(r"lm_head\.weight")
    else:
        rules.append((r"lm_head\.weight", "lm_head.kernel", linear))
    return KeyMap(rules=rules, ignore=ignore)
