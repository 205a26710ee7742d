"""How torchvision's ``efficientnet_b1`` state dict (IMAGENET1K_V2, ``efficientnet_b1-c27df63c.pth``,
converted to safetensors) maps onto :class:`nvl_jax.models.efficientnet.EfficientNet`.

Module paths are torchvision's (``features.2.1.block.0``) except that each ``Conv2dNormActivation``
(a Sequential of conv and batch norm) names its two parts ``conv`` and ``bn`` instead of ``0`` and
``1``. The squeeze-and-excitation 1x1 convs ``fc1`` / ``fc2`` act on pooled vectors and load as
dense layers. The classifier (after ``avgpool``) is ignored.
"""

from __future__ import annotations

from nvl_jax.models.cnn_layers import BATCH_NORM_IGNORED, batch_norm_rules, conv_rules
from nvl_jax.models.hf_loader import KeyMap, conv1x1_as_linear

KEY_MAP = KeyMap(
    rules=[
        (r"(.*\.fc[12])\.weight", r"\1.kernel", conv1x1_as_linear),
        (r"(.*\.fc[12])\.bias", r"\1.bias", None),
        *conv_rules(r"(features\..*)\.0", r"\1.conv"),
        *batch_norm_rules(r"(features\..*)\.1", r"\1.bn"),
    ],
    ignore=[r"classifier\..*", BATCH_NORM_IGNORED],
)
