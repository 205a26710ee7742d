"""torchvision's InceptionV3 up to ``avgpool`` (``modeling``) and its key table (``params``)."""

from nvl_jax.models.inception.modeling import InceptionV3, InceptionV3Config, transform_input
