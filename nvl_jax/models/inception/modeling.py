"""torchvision's InceptionV3 up to ``avgpool``, in Flax NNX, with its ``transform_input``.

torchvision's pretrained ``inception_v3`` (IMAGENET1K_V1, weights ported from TensorFlow) is built
with ``transform_input=True``: it takes ImageNet-normalized pixels and re-normalizes them to the
``(x - 0.5) / 0.5`` range the TensorFlow weights were trained on. The reconstruction metrics
normalize with ImageNet's mean and std and rely on that step, so it is on by default here too.
Note pytorch-fid's Inception is a different network (FID's TensorFlow graph: other pooling in the
last blocks) and does not load these weights. Channels-last; key table in ``inception.params``.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx

from nvl_jax import sharding
from nvl_jax.models import hf_loader
from nvl_jax.models.cnn_layers import ConvBN, avg_pool, checkpoint_folder, global_avg_pool, max_pool
from nvl_jax.models.inception.params import KEY_MAP

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURES = 2048


@dataclasses.dataclass(frozen=True)
class InceptionV3Config:
    """``transform_input``: map ImageNet-normalized input to ``(x - 0.5) / 0.5``, as torchvision's
    pretrained model does; ``bn_eps``: ``BasicConv2d``'s batch-norm epsilon."""

    transform_input: bool = True
    bn_eps: float = 1e-3

    @classmethod
    def torchvision(cls) -> InceptionV3Config:
        """``torchvision.models.inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1)``."""
        return cls()


def transform_input(x: jax.Array) -> jax.Array:
    """ImageNet-normalized ``[..., 3]`` -> the same pixels normalized as ``(p - 0.5) / 0.5``."""
    mean, std = jnp.asarray(IMAGENET_MEAN, x.dtype), jnp.asarray(IMAGENET_STD, x.dtype)
    return x * (std / 0.5) + (mean - 0.5) / 0.5


class InceptionA(nnx.Module):
    """35 x 35 block: 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, in_channels: int, pool_features: int, *, eps, dtype, rngs):
        conv = functools.partial(ConvBN, eps=eps, dtype=dtype, rngs=rngs)
        self.branch1x1 = conv(in_channels, 64, 1)
        self.branch5x5_1 = conv(in_channels, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(in_channels, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(in_channels, pool_features, 1)

    def __call__(self, x):
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool(x, 3, 1, 1)),
        ], axis=-1)


class InceptionB(nnx.Module):
    """Grid reduction 35 -> 17: strided 3x3, strided double 3x3 and max-pool branches."""

    def __init__(self, in_channels: int, *, eps, dtype, rngs):
        conv = functools.partial(ConvBN, eps=eps, dtype=dtype, rngs=rngs)
        self.branch3x3 = conv(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(in_channels, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def __call__(self, x):
        return jnp.concatenate([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            max_pool(x, 3, 2),
        ], axis=-1)


class InceptionC(nnx.Module):
    """17 x 17 block with factorized 7x7 convs (1x7 then 7x1) of ``channels_7x7`` channels."""

    def __init__(self, in_channels: int, channels_7x7: int, *, eps, dtype, rngs):
        conv = functools.partial(ConvBN, eps=eps, dtype=dtype, rngs=rngs)
        c7 = channels_7x7
        self.branch1x1 = conv(in_channels, 192, 1)
        self.branch7x7_1 = conv(in_channels, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(in_channels, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv(in_channels, 192, 1)

    def __call__(self, x):
        double = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            double = conv(double)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(avg_pool(x, 3, 1, 1)),
        ], axis=-1)


class InceptionD(nnx.Module):
    """Grid reduction 17 -> 8: strided 3x3, 7x7-then-strided-3x3 and max-pool branches."""

    def __init__(self, in_channels: int, *, eps, dtype, rngs):
        conv = functools.partial(ConvBN, eps=eps, dtype=dtype, rngs=rngs)
        self.branch3x3_1 = conv(in_channels, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(in_channels, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def __call__(self, x):
        seven = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return jnp.concatenate([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(seven),
            max_pool(x, 3, 2),
        ], axis=-1)


class InceptionE(nnx.Module):
    """8 x 8 block whose 3x3 branches split into parallel 1x3 and 3x1 convs."""

    def __init__(self, in_channels: int, *, eps, dtype, rngs):
        conv = functools.partial(ConvBN, eps=eps, dtype=dtype, rngs=rngs)
        self.branch1x1 = conv(in_channels, 320, 1)
        self.branch3x3_1 = conv(in_channels, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(in_channels, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(in_channels, 192, 1)

    def __call__(self, x):
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(avg_pool(x, 3, 1, 1)),
        ], axis=-1)


class InceptionV3(nnx.Module):
    """``[batch, height, width, 3]`` ImageNet-normalized pixels (at least 75 px) -> ``avgpool``
    ``[batch, 2048]``."""

    def __init__(self, config: InceptionV3Config = InceptionV3Config(), *, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        kwargs = dict(eps=config.bn_eps, dtype=dtype, rngs=rngs)
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2, **kwargs)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3, **kwargs)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1, **kwargs)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1, **kwargs)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3, **kwargs)
        self.Mixed_5b = InceptionA(192, 32, **kwargs)
        self.Mixed_5c = InceptionA(256, 64, **kwargs)
        self.Mixed_5d = InceptionA(288, 64, **kwargs)
        self.Mixed_6a = InceptionB(288, **kwargs)
        self.Mixed_6b = InceptionC(768, 128, **kwargs)
        self.Mixed_6c = InceptionC(768, 160, **kwargs)
        self.Mixed_6d = InceptionC(768, 160, **kwargs)
        self.Mixed_6e = InceptionC(768, 192, **kwargs)
        self.Mixed_7a = InceptionD(768, **kwargs)
        self.Mixed_7b = InceptionE(1280, **kwargs)
        self.Mixed_7c = InceptionE(2048, **kwargs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        x = transform_input(pixel_values) if self.config.transform_input else pixel_values
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x, 3, 2)
        x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return global_avg_pool(x)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, config: InceptionV3Config | None = None,
                        dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
                        rules: sharding.Rules = sharding.DEFAULT_RULES) -> InceptionV3:
        """Loads a folder holding torchvision's InceptionV3 state dict as ``model.safetensors``."""
        folder = checkpoint_folder(path, "inception")
        return hf_loader.from_pretrained(lambda: cls(config or InceptionV3Config.torchvision(), dtype=dtype),
                                         folder, KEY_MAP, mesh=mesh, rules=rules)
