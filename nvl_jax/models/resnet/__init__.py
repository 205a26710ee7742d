"""torchvision-layout ResNet up to ``avgpool`` (``modeling``), SwAV's backbone, and its key table (``params``)."""

from nvl_jax.models.resnet.modeling import ResNet, ResNetConfig
