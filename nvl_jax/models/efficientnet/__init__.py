"""torchvision's EfficientNet up to ``avgpool`` (``modeling``, B1 preset) and its key table (``params``)."""

from nvl_jax.models.efficientnet.modeling import EfficientNet, EfficientNetConfig
