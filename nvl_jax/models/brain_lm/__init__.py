"""The brain-language model: ViT3D brain tokens, the ``mlp2x_gelu`` projector, ``<image>`` merging,
LoRA adapters, and a Llama-family LLM."""

from nvl_jax.models.brain_lm import lora
from nvl_jax.models.brain_lm.merge import (
    IGNORE_INDEX, IMAGE_TOKEN_INDEX, check_placeholders, merge_brain_tokens, text_ids)
from nvl_jax.models.brain_lm.modeling import (
    BrainLanguageModel, BrainLMConfig, BrainLMOutput, LoRAConfig, next_token_loss)
from nvl_jax.models.brain_lm.projector import Projector
