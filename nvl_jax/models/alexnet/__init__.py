"""torchvision's AlexNet up to ``features.11`` (``modeling``) and its key table (``params``)."""

from nvl_jax.models.alexnet.modeling import FEATURE_LAYERS, AlexNet, AlexNetConfig
