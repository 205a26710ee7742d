"""Diffusion: schedulers (``schedulers``), the timestep embedding, Stable unCLIP conditioning and guidance."""

from nvl_jax.diffusion.conditioning import StableUnCLIPImageNormalizer, noise_image_embeddings
from nvl_jax.diffusion.embeddings import get_timestep_embedding
from nvl_jax.diffusion.guidance import classifier_free_guidance
