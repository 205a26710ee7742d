"""Layers of the torchvision-layout image classifiers the reconstruction metrics read (AlexNet,
InceptionV3, EfficientNet-B1, ResNet-50), for inference only.

Arrays are channels-last ``[batch, height, width, channels]``; a conv kernel is
``[kh, kw, in / groups, out]``. Padding, pooling and batch-norm arithmetic follow
``torch.nn``: zero padding given per side, max pooling that pads with -inf,
average pooling that counts the zero padding (``count_include_pad=True``), and
batch norm with the running statistics.
"""

from __future__ import annotations

from collections.abc import Iterator
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from nvl_jax.models.hf_loader import conv2d
from nvl_jax.models.layers import param


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class Conv(nnx.Module):
    """``torch.nn.Conv2d`` on ``[batch, height, width, in_channels]``: rectangular kernels, per-axis
    padding and grouped (depthwise) convolution."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], *,
                 stride: int = 1, padding: int | tuple[int, int] = 0, groups: int = 1, use_bias: bool = False,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv: {in_channels} -> {out_channels} channels do not split into {groups} groups")
        self.stride, self.padding, self.groups = stride, _pair(padding), groups
        kh, kw = _pair(kernel_size)
        self.kernel = param(rngs, nnx.initializers.lecun_normal(), (kh, kw, in_channels // groups, out_channels),
                            dtype, (None, None, "conv_in", "conv_out"))
        self.bias = param(rngs, nnx.initializers.zeros, (out_channels,), dtype, ("conv_out",)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[batch, height, width, in_channels]`` -> ``[batch, height', width', out_channels]``."""
        ph, pw = self.padding
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...].astype(x.dtype), (self.stride,) * 2, ((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class BatchNorm(nnx.Module):
    """``torch.nn.BatchNorm2d`` in eval mode: ``(x - mean) / sqrt(var + eps) * scale + bias``."""

    def __init__(self, features: int, *, eps: float, dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (features,), dtype, ("norm",))
        self.bias = param(rngs, nnx.initializers.zeros, (features,), dtype, ("norm",))
        self.mean = nnx.BatchStat(jnp.zeros((features,), dtype), out_sharding=("norm",), eager_sharding=False)
        self.var = nnx.BatchStat(jnp.ones((features,), dtype), out_sharding=("norm",), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., features]`` -> the same shape."""
        multiplier = self.scale[...] * jax.lax.rsqrt(self.var[...] + self.eps)
        return (x * multiplier + (self.bias[...] - self.mean[...] * multiplier)).astype(x.dtype)


class ConvBN(nnx.Module):
    """Conv without bias, batch norm, then an optional activation: torchvision's ``BasicConv2d`` and
    ``Conv2dNormActivation``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], *,
                 stride: int = 1, padding: int | tuple[int, int] = 0, groups: int = 1, eps: float,
                 activation=jax.nn.relu, dtype=jnp.float32, rngs: nnx.Rngs):
        self.activation = activation
        self.conv = Conv(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups,
                         dtype=dtype, rngs=rngs)
        self.bn = BatchNorm(out_channels, eps=eps, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.bn(self.conv(x))
        return y if self.activation is None else self.activation(y)


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
    """``torch.nn.MaxPool2d(window, stride, padding)`` (floor mode) on ``[batch, height, width, channels]``."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), pad)


def avg_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
    """``torch.nn.AvgPool2d(window, stride, padding)``, zero padding counted in the mean as torch's default."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, window, window, 1), (1, stride, stride, 1), pad)
    return summed / (window * window)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """``AdaptiveAvgPool2d(1)`` then flatten: ``[batch, height, width, channels]`` -> ``[batch, channels]``."""
    return x.mean(axis=(1, 2))


def conv_rules(source: str, target: str) -> Iterator[tuple[str, str, object]]:
    """Key-table rows for a torch conv named by regex ``source`` and the NNX :class:`Conv` at ``target``."""
    yield rf"{source}\.weight", rf"{target}.kernel", conv2d
    yield rf"{source}\.bias", rf"{target}.bias", None


def batch_norm_rules(source: str, target: str) -> Iterator[tuple[str, str, object]]:
    """Key-table rows for a torch ``BatchNorm2d`` named by regex ``source`` and the :class:`BatchNorm` at
    ``target``; its ``num_batches_tracked`` counter is training state, listed in :data:`BATCH_NORM_IGNORED`."""
    for torch_name, nnx_name in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
                                 ("running_var", "var")):
        yield rf"{source}\.{torch_name}", rf"{target}.{nnx_name}", None


BATCH_NORM_IGNORED = r".*\.num_batches_tracked"


def checkpoint_folder(path: str | os.PathLike, network: str) -> Path:
    """The local folder holding ``network``'s converted ``model.safetensors``; these torchvision and SwAV
    weights are not on the Hugging Face hub in this layout, so nothing is downloaded."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: no such folder. Convert the published {network} checkpoint once with "
            f"`python -m nvl_jax.models.convert_feature_nets {network} SRC.pth {folder}`.")
    return folder
