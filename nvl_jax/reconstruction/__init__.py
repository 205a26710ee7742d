"""Visual reconstruction with Stable unCLIP from stage-1 predictions (docs/reconstruction.md).

``components`` loads a diffusers ``StableUnCLIPImg2ImgPipeline`` folder; ``pipeline`` samples from the
predicted latent and CLIP embedding in one jitted program; ``beta_start`` holds the two readings of
the paper's start; ``tiny_random`` writes the offline demo's random unCLIP; ``export`` writes the
Flax models back as Hugging Face folders.
"""

from nvl_jax.reconstruction import beta_start, tiny_random
from nvl_jax.reconstruction.components import STABLE_UNCLIP_SMALL, StableUnCLIP
from nvl_jax.reconstruction.pipeline import SamplingConfig, UnCLIPSampler, to_uint8
