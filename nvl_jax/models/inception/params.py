"""How torchvision's ``inception_v3`` state dict (IMAGENET1K_V1, ``inception_v3_google-0cc3c7bd.pth``,
converted to safetensors) maps onto :class:`nvl_jax.models.inception.InceptionV3`.

Module names are torchvision's (``Mixed_6b.branch7x7dbl_3.conv``), so every ``BasicConv2d`` loads by
renaming leaves only. Ignored: the auxiliary classifier ``AuxLogits`` (used in training only), the
final ``fc`` (after ``avgpool``, which is all the metrics read) and batch-norm counters.
"""

from __future__ import annotations

from nvl_jax.models.cnn_layers import BATCH_NORM_IGNORED, batch_norm_rules, conv_rules
from nvl_jax.models.hf_loader import KeyMap

KEY_MAP = KeyMap(
    rules=[*conv_rules(r"(.*)\.conv", r"\1.conv"), *batch_norm_rules(r"(.*)\.bn", r"\1.bn")],
    ignore=[r"AuxLogits\..*", r"fc\..*", BATCH_NORM_IGNORED],
)
