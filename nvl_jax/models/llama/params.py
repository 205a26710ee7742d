"""How checkpoint keys map onto :class:`nvl_jax.models.llama.LlamaForCausalLM`: transformers' safetensors
keys (:func:`key_map`) and llama.cpp's GGUF tensor names (:func:`gguf_key_map`).

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


def unpermute_rotary(w, heads: int):
    """Undoes llama.cpp's reordering of q/k projection rows (weight ``[heads * head_dim, in]`` or bias).

    llama.cpp's converter interleaves each head's two rotary halves row by row
    (``reshape(heads, 2, head_dim // 2, ...).swapaxes(1, 2)``) for its
    pairwise rotation; transformers rotates halves, so the rows go back.
    """
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_BLOCK = r"blk\.(\d+)\."


def gguf_key_map(num_heads: int, num_kv_heads: int, tie_word_embeddings: bool) -> KeyMap:
    """The key table of a llama.cpp GGUF (``token_embd``, ``blk.N.attn_q``, ..., ``output_norm``, ``output``).

    Nothing is ignored: a GGUF names exactly the model's tensors, and a tied
    model is one without ``output.weight``.
    """
    rules = [
        (r"token_embd\.weight", "model.embed_tokens.embedding", None),
        (_BLOCK + r"attn_q\.weight", r"model.layers.\1.self_attn.q_proj.kernel",
         lambda w: unpermute_rotary(w, num_heads).T),
        (_BLOCK + r"attn_k\.weight", r"model.layers.\1.self_attn.k_proj.kernel",
         lambda w: unpermute_rotary(w, num_kv_heads).T),
        (_BLOCK + r"attn_q\.bias", r"model.layers.\1.self_attn.q_proj.bias", lambda w: unpermute_rotary(w, num_heads)),
        (_BLOCK + r"attn_k\.bias", r"model.layers.\1.self_attn.k_proj.bias",
         lambda w: unpermute_rotary(w, num_kv_heads)),
        (_BLOCK + r"attn_v\.weight", r"model.layers.\1.self_attn.v_proj.kernel", linear),
        (_BLOCK + r"attn_v\.bias", r"model.layers.\1.self_attn.v_proj.bias", None),
        (_BLOCK + r"attn_output\.weight", r"model.layers.\1.self_attn.o_proj.kernel", linear),
        (_BLOCK + r"attn_output\.bias", r"model.layers.\1.self_attn.o_proj.bias", None),
        (_BLOCK + r"ffn_(gate|up|down)\.weight", r"model.layers.\1.mlp.\2_proj.kernel", linear),
        (_BLOCK + r"ffn_(gate|up|down)\.bias", r"model.layers.\1.mlp.\2_proj.bias", None),
        (_BLOCK + r"attn_norm\.weight", r"model.layers.\1.input_layernorm.scale", None),
        (_BLOCK + r"ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.scale", None),
        (r"output_norm\.weight", "model.norm.scale", None),
    ]
    if not tie_word_embeddings:
        rules.append((r"output\.weight", "lm_head.kernel", linear))
    return KeyMap(rules=rules)
