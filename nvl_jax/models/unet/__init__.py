"""The Stable Diffusion 2.x / Stable unCLIP ``UNet2DConditionModel`` (``modeling``; its blocks in ``blocks``,
``attention`` and ``embeddings``) and its key table (``params``)."""

from nvl_jax.models.unet.embeddings import TimestepEmbedding, timestep_features
from nvl_jax.models.unet.modeling import UNet2DConditionModel, UNet2DConditionOutput, UNetConfig
