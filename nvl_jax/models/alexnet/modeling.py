"""torchvision's AlexNet (the "one weird trick" variant, IMAGENET1K_V1) up to ``features.11``, in Flax NNX.

The reconstruction metrics compare images in two of its layers, named as torchvision's feature
extractor names them: ``features.4`` (the ReLU after the second conv) and ``features.11`` (the ReLU
after the fifth). Channels-last throughout; the key table is in ``alexnet.params``.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from nvl_jax import sharding
from nvl_jax.models import hf_loader
from nvl_jax.models.alexnet.params import KEY_MAP
from nvl_jax.models.cnn_layers import Conv, checkpoint_folder, max_pool

FEATURE_LAYERS = ("features.4", "features.11")


@dataclasses.dataclass(frozen=True)
class AlexNetConfig:
    """Output channels of the five convs; their kernels, strides and paddings are AlexNet's own."""

    channels: tuple[int, int, int, int, int] = (64, 192, 384, 256, 256)

    @classmethod
    def torchvision(cls) -> AlexNetConfig:
        """``torchvision.models.alexnet``."""
        return cls()


class AlexNet(nnx.Module):
    """``[batch, height, width, 3]`` ImageNet-normalized pixels -> ``{"features.4", "features.11"}``."""

    def __init__(self, config: AlexNetConfig = AlexNetConfig(), *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        c1, c2, c3, c4, c5 = config.channels
        kwargs = dict(use_bias=True, dtype=dtype, rngs=rngs)
        self.conv1 = Conv(3, c1, 11, stride=4, padding=2, **kwargs)
        self.conv2 = Conv(c1, c2, 5, padding=2, **kwargs)
        self.conv3 = Conv(c2, c3, 3, padding=1, **kwargs)
        self.conv4 = Conv(c3, c4, 3, padding=1, **kwargs)
        self.conv5 = Conv(c4, c5, 3, padding=1, **kwargs)

    def __call__(self, pixel_values: jax.Array) -> dict[str, jax.Array]:
        """``features.4`` ``[batch, h2, w2, channels[1]]`` and ``features.11`` ``[batch, h5, w5, channels[4]]``
        (31 x 31 and 15 x 15 for a 256 px input)."""
        x = max_pool(jax.nn.relu(self.conv1(pixel_values)), 3, 2)
        features_4 = jax.nn.relu(self.conv2(x))
        x = max_pool(features_4, 3, 2)
        x = jax.nn.relu(self.conv4(jax.nn.relu(self.conv3(x))))
        features_11 = jax.nn.relu(self.conv5(x))
        return {"features.4": features_4, "features.11": features_11}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, config: AlexNetConfig | None = None, dtype=jnp.float32,
                        mesh: jax.sharding.Mesh | None = None,
                        rules: sharding.Rules = sharding.DEFAULT_RULES) -> AlexNet:
        """Loads a folder holding torchvision's AlexNet state dict as ``model.safetensors``."""
        folder = checkpoint_folder(path, "alexnet")
        return hf_loader.from_pretrained(lambda: cls(config or AlexNetConfig.torchvision(), dtype=dtype), folder,
                                         KEY_MAP, mesh=mesh, rules=rules)
