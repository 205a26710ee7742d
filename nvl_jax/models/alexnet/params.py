"""How torchvision's ``alexnet`` state dict (``alexnet-owt-7be5be79.pth``, IMAGENET1K_V1, converted to
safetensors) maps onto :class:`nvl_jax.models.alexnet.AlexNet`.

torchvision's ``features`` is one ``nn.Sequential`` whose convs sit at indices 0, 3, 6, 8 and 10; they
become ``conv1`` .. ``conv5``. The classifier (``classifier.*``) comes after every layer the metrics
read, so the port stops before it and its keys are listed as ignored.
"""

from __future__ import annotations

from nvl_jax.models.cnn_layers import conv_rules
from nvl_jax.models.hf_loader import KeyMap

# torchvision's Sequential index of each conv -> the port's name.
CONV_INDICES = {0: "conv1", 3: "conv2", 6: "conv3", 8: "conv4", 10: "conv5"}

KEY_MAP = KeyMap(
    rules=[row for index, name in CONV_INDICES.items() for row in conv_rules(rf"features\.{index}", name)],
    ignore=[r"classifier\..*"],
)
