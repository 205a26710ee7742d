"""Llama-family causal LMs (``modeling``), their key tables (``params``: safetensors and GGUF),
KV-cache generation (``generation``) and tokenizers from a checkpoint folder or a GGUF (``tokenizer``)."""

from nvl_jax.models.llama import generation
from nvl_jax.models.llama.modeling import (
    CausalLMOutput, LlamaConfig, LlamaForCausalLM, LlamaModel, RopeConfig,
)
from nvl_jax.models.llama.tokenizer import load_tokenizer, tokenizer_from_gguf
