"""The ViT3D fMRI extractor with its CLIP / VAE alignment heads (``modeling``)."""

from nvl_jax.models.vit3d.modeling import (
    BrainEncoder, COMPUTE_DTYPES, Stage1Output, ViT3D, ViT3DConfig, ViT3DOutput, attention, dual_stream_loss)
