"""torchvision's EfficientNet (B0-B7 family, the B1 preset) up to ``avgpool``, in Flax NNX.

The reconstruction metrics compare images by the correlation distance of EfficientNet-B1's
``avgpool`` features with torchvision's IMAGENET1K_V2 weights. Layout as torchvision builds it:
``features.0`` the stem, ``features.1`` .. ``features.7`` the MBConv stages, ``features.8`` the 1x1
head conv. Channels-last; the key table is in ``efficientnet.params``.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from nvl_jax import sharding
from nvl_jax.models import hf_loader
from nvl_jax.models.cnn_layers import ConvBN, checkpoint_folder, global_avg_pool
from nvl_jax.models.efficientnet.params import KEY_MAP
from nvl_jax.models.layers import Dense

# Per stage of EfficientNet-B0 (the paper's Table 1): expand ratio, kernel, stride, in, out, layers.
B0_STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
             (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: the nearest multiple of ``divisor``, never 10 % below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig:
    """``width_mult`` / ``depth_mult`` scale B0's channels and stage depths as torchvision does."""

    width_mult: float = 1.0
    depth_mult: float = 1.1
    bn_eps: float = 1e-5

    @classmethod
    def b1(cls) -> EfficientNetConfig:
        """``torchvision.models.efficientnet_b1``."""
        return cls(width_mult=1.0, depth_mult=1.1)

    def stages(self) -> list[tuple[int, int, int, int, int, int]]:
        """``(expand_ratio, kernel, stride, in_channels, out_channels, layers)`` per stage, scaled."""
        return [(expand, kernel, stride, make_divisible(c_in * self.width_mult),
                 make_divisible(c_out * self.width_mult), int(math.ceil(layers * self.depth_mult)))
                for expand, kernel, stride, c_in, c_out, layers in B0_STAGES]

    @property
    def features(self) -> int:
        """Channels of ``avgpool``: four times the last stage's output, 1280 for B1."""
        return 4 * self.stages()[-1][4]


class SqueezeExcitation(nnx.Module):
    """``x * sigmoid(fc2(silu(fc1(mean(x)))))`` over the spatial axes."""

    def __init__(self, channels: int, squeeze_channels: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = Dense(channels, squeeze_channels, axes=("conv_in", "conv_out"), dtype=dtype, rngs=rngs)
        self.fc2 = Dense(squeeze_channels, channels, axes=("conv_in", "conv_out"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.fc2(jax.nn.silu(self.fc1(x.mean(axis=(1, 2), keepdims=True))))
        return x * jax.nn.sigmoid(scale)


class MBConv(nnx.Module):
    """Inverted residual: 1x1 expand (unless the ratio is 1), depthwise conv, squeeze-excitation, 1x1
    project; a residual where stride is 1 and channels are kept (stochastic depth is off in eval)."""

    def __init__(self, expand_ratio: int, kernel: int, stride: int, in_channels: int, out_channels: int,
                 config: EfficientNetConfig, *, dtype, rngs: nnx.Rngs):
        self.use_residual = stride == 1 and in_channels == out_channels
        expanded = make_divisible(in_channels * expand_ratio)
        kwargs = dict(eps=config.bn_eps, dtype=dtype, rngs=rngs)
        block = []
        if expanded != in_channels:
            block.append(ConvBN(in_channels, expanded, 1, activation=jax.nn.silu, **kwargs))
        block.append(ConvBN(expanded, expanded, kernel, stride=stride, padding=(kernel - 1) // 2, groups=expanded,
                            activation=jax.nn.silu, **kwargs))
        block.append(SqueezeExcitation(expanded, max(1, in_channels // 4), dtype=dtype, rngs=rngs))
        block.append(ConvBN(expanded, out_channels, 1, activation=None, **kwargs))
        self.block = nnx.List(block)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        for layer in self.block:
            h = layer(h)
        return h + x if self.use_residual else h


class EfficientNet(nnx.Module):
    """``[batch, height, width, 3]`` ImageNet-normalized pixels -> ``avgpool`` ``[batch, config.features]``."""

    def __init__(self, config: EfficientNetConfig = EfficientNetConfig(), *, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        stages = config.stages()
        kwargs = dict(eps=config.bn_eps, dtype=dtype, rngs=rngs)
        features = [ConvBN(3, stages[0][3], 3, stride=2, padding=1, activation=jax.nn.silu, **kwargs)]
        for expand, kernel, stride, c_in, c_out, layers in stages:
            features.append(nnx.List([
                MBConv(expand, kernel, stride if i == 0 else 1, c_in if i == 0 else c_out, c_out, config,
                       dtype=dtype, rngs=rngs)
                for i in range(layers)]))
        features.append(ConvBN(stages[-1][4], config.features, 1, activation=jax.nn.silu, **kwargs))
        self.features = nnx.List(features)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        stem, *stages, head = self.features
        x = stem(pixel_values)
        for stage in stages:
            for block in stage:
                x = block(x)
        return global_avg_pool(head(x))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, config: EfficientNetConfig | None = None,
                        dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
                        rules: sharding.Rules = sharding.DEFAULT_RULES) -> EfficientNet:
        """Loads a folder holding torchvision's EfficientNet state dict as ``model.safetensors``."""
        folder = checkpoint_folder(path, "efficientnet")
        return hf_loader.from_pretrained(lambda: cls(config or EfficientNetConfig.b1(), dtype=dtype), folder,
                                         KEY_MAP, mesh=mesh, rules=rules)
