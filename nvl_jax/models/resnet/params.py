"""How torchvision's ``resnet50`` state dict, or SwAV's (``swav_800ep_pretrain.pth.tar``, the same
layout), converted to safetensors, maps onto :class:`nvl_jax.models.resnet.ResNet`.

Module names are torchvision's, so each row only renames the leaf: a conv's ``weight`` becomes
``kernel``; a batch norm's ``weight`` / ``running_mean`` / ``running_var`` become ``scale`` / ``mean`` /
``var``; ``downsample.0`` / ``downsample.1`` become ``downsample_conv`` / ``downsample_bn``.

Ignored: the classifier ``fc`` (after ``avgpool``, which is all the metrics read; SwAV's checkpoint has
none), SwAV's self-supervision heads ``projection_head`` and ``prototypes``, and batch-norm counters.
SwAV's own ``torch.hub`` loader drops the same keys (``strict=False``).
"""

from __future__ import annotations

from nvl_jax.models.cnn_layers import BATCH_NORM_IGNORED, batch_norm_rules, conv_rules
from nvl_jax.models.hf_loader import KeyMap

_BLOCK = r"(layer[1-4]\.\d+)"

KEY_MAP = KeyMap(
    rules=[
        *conv_rules(r"conv1", "conv1"),
        *batch_norm_rules(r"bn1", "bn1"),
        *conv_rules(rf"{_BLOCK}\.(conv[1-3])", r"\1.\2"),
        *batch_norm_rules(rf"{_BLOCK}\.(bn[1-3])", r"\1.\2"),
        *conv_rules(rf"{_BLOCK}\.downsample\.0", r"\1.downsample_conv"),
        *batch_norm_rules(rf"{_BLOCK}\.downsample\.1", r"\1.downsample_bn"),
    ],
    ignore=[r"fc\..*", r"projection_head\..*", r"prototypes\..*", BATCH_NORM_IGNORED],
)
