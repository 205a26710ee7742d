"""Llama-family causal LMs (``modeling``), their key table (``params``) and KV-cache
generation (``generation``)."""

from nvl_jax.models.llama import generation
from nvl_jax.models.llama.modeling import CausalLMOutput, LlamaConfig, LlamaForCausalLM, LlamaModel, RopeConfig
