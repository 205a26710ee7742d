"""CLIP vision and text towers (``modeling``), their key table (``params``) and the exact
``CLIPImageProcessor`` preprocessing (``image_processor``)."""

from nvl_jax.models.clip import image_processor
from nvl_jax.models.clip.modeling import (
    CLIPTextConfig, CLIPTextModel, CLIPTextOutput, CLIPVisionConfig, CLIPVisionModel, CLIPVisionOutput,
    LEGACY_EOS_TOKEN_ID, eos_positions, load_tokenizer, tokenize)
