"""torchvision's ResNet (bottleneck blocks, stride in the 3x3 conv) up to ``avgpool``, in Flax NNX.

ResNet-50 in this layout is the backbone of SwAV (Caron et al. 2020), whose ``avgpool`` features the
reconstruction metrics compare. Channels-last; module names follow torchvision (``layer1.0.conv1``),
so the key table in ``resnet.params`` only renames leaves.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from nvl_jax import sharding
from nvl_jax.models import hf_loader
from nvl_jax.models.cnn_layers import BatchNorm, Conv, checkpoint_folder, global_avg_pool, max_pool
from nvl_jax.models.resnet.params import KEY_MAP

EXPANSION = 4  # a bottleneck's output is 4x its width


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """``layers``: bottleneck blocks per stage; ``width``: the first stage's bottleneck width (doubled
    per stage); ``bn_eps``: torch's BatchNorm2d default."""

    layers: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    bn_eps: float = 1e-5

    @classmethod
    def resnet50(cls) -> ResNetConfig:
        """``torchvision.models.resnet50``, SwAV's backbone."""
        return cls()

    @property
    def features(self) -> int:
        """Channels of ``avgpool``: 2048 for ResNet-50."""
        return self.width * 2 ** (len(self.layers) - 1) * EXPANSION


class Bottleneck(nnx.Module):
    """``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))``; the shortcut is a strided
    1x1 conv and batch norm where the shape changes."""

    def __init__(self, in_channels: int, width: int, stride: int, config: ResNetConfig, *, dtype, rngs: nnx.Rngs):
        out_channels = width * EXPANSION
        eps = config.bn_eps
        self.conv1 = Conv(in_channels, width, 1, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(width, eps=eps, dtype=dtype, rngs=rngs)
        self.conv2 = Conv(width, width, 3, stride=stride, padding=1, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm(width, eps=eps, dtype=dtype, rngs=rngs)
        self.conv3 = Conv(width, out_channels, 1, dtype=dtype, rngs=rngs)
        self.bn3 = BatchNorm(out_channels, eps=eps, dtype=dtype, rngs=rngs)
        if stride != 1 or in_channels != out_channels:
            self.downsample_conv = Conv(in_channels, out_channels, 1, stride=stride, dtype=dtype, rngs=rngs)
            self.downsample_bn = BatchNorm(out_channels, eps=eps, dtype=dtype, rngs=rngs)
        else:
            self.downsample_conv = self.downsample_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[batch, height, width, in_channels]`` -> ``[batch, height / stride, width / stride, 4 * width]``."""
        h = jax.nn.relu(self.bn1(self.conv1(x)))
        h = jax.nn.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        shortcut = x if self.downsample_conv is None else self.downsample_bn(self.downsample_conv(x))
        return jax.nn.relu(h + shortcut)


class ResNet(nnx.Module):
    """``[batch, height, width, 3]`` ImageNet-normalized pixels -> ``avgpool`` ``[batch, config.features]``."""

    def __init__(self, config: ResNetConfig = ResNetConfig(), *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.conv1 = Conv(3, config.width, 7, stride=2, padding=3, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(config.width, eps=config.bn_eps, dtype=dtype, rngs=rngs)
        in_channels = config.width
        for stage, blocks in enumerate(config.layers):
            width = config.width * 2**stage
            stage_blocks = []
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                stage_blocks.append(Bottleneck(in_channels, width, stride, config, dtype=dtype, rngs=rngs))
                in_channels = width * EXPANSION
            setattr(self, f"layer{stage + 1}", nnx.List(stage_blocks))

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        x = max_pool(jax.nn.relu(self.bn1(self.conv1(pixel_values))), 3, 2, padding=1)
        for stage in range(len(self.config.layers)):
            for block in getattr(self, f"layer{stage + 1}"):
                x = block(x)
        return global_avg_pool(x)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, config: ResNetConfig | None = None, dtype=jnp.float32,
                        mesh: jax.sharding.Mesh | None = None,
                        rules: sharding.Rules = sharding.DEFAULT_RULES) -> ResNet:
        """Loads a folder holding a torchvision-layout ResNet state dict (SwAV's) as ``model.safetensors``."""
        folder = checkpoint_folder(path, "swav")
        return hf_loader.from_pretrained(lambda: cls(config or ResNetConfig.resnet50(), dtype=dtype), folder,
                                         KEY_MAP, mesh=mesh, rules=rules)
