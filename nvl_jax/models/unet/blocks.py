"""The UNet's resolution levels: time-conditioned resnets, the stride-2 down / nearest up samplers, and
the down, mid and up blocks that stack them with spatial transformers. Channels-last throughout."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nvl_jax.models.layers import Conv2d, Dense, GroupNorm, activation
from nvl_jax.models.unet.attention import Transformer2DModel, TransformerSettings


@dataclasses.dataclass(frozen=True)
class ResnetSettings:
    """What every ``ResnetBlock2D`` of the UNet shares.

    temb_channels: width of the time embedding. groups / eps: its GroupNorms.
    act_fn: the nonlinearity, also applied to the time embedding before its projection.
    """

    temb_channels: int
    groups: int
    eps: float
    act_fn: str


class ResnetBlock2D(nnx.Module):
    """``(skip(x) + conv2(act(norm2(conv1(act(norm1(x))) + proj(act(temb)))))) / output_scale_factor``;
    the skip is a 1x1 conv when the channels change."""

    def __init__(self, in_channels: int, out_channels: int, settings: ResnetSettings, *,
                 output_scale_factor: float = 1.0, dtype, rngs: nnx.Rngs):
        self.act = activation(settings.act_fn)
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(in_channels, settings.groups, eps=settings.eps, dtype=dtype, rngs=rngs)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.time_emb_proj = Dense(settings.temb_channels, out_channels, axes=("embed", "conv_out"),
                                   dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(out_channels, settings.groups, eps=settings.eps, dtype=dtype, rngs=rngs)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (Conv2d(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                              if in_channels != out_channels else None)

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        """``x [batch, height, width, in_channels]``, ``temb [batch, temb_channels]`` ->
        ``[batch, height, width, out_channels]``."""
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.time_emb_proj(self.act(temb))[:, None, None, :]
        h = self.conv2(self.act(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nnx.Module):
    """A stride-2 3x3 conv halving height and width (rounding up with ``padding=1``)."""

    def __init__(self, channels: int, padding: int, *, dtype, rngs: nnx.Rngs):
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            # diffusers then pads only the bottom and right edges, as the original LDM did.
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize of ``[batch, height, width, channels]`` to ``size = (height', width')``.

    PyTorch's ``interpolate(mode="nearest", size=...)``: output pixel ``i`` reads
    input pixel ``floor(i * (in / out))`` with the ratio in float32.
    """
    for axis, out in zip((1, 2), size):
        length = x.shape[axis]
        if out == 2 * length:
            x = jnp.repeat(x, 2, axis=axis)
        elif out != length:
            ratio = np.float32(length) / np.float32(out)
            index = np.minimum(np.floor(np.arange(out, dtype=np.float32) * ratio).astype(np.int32), length - 1)
            x = jnp.take(x, index, axis=axis)
    return x


class Upsample2D(nnx.Module):
    """Nearest upsampling (to 2x, or to the skip connection's size) and a 3x3 conv."""

    def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, size: tuple[int, int]) -> jax.Array:
        return self.conv(upsample_nearest(x, size))


def _transformers(channels: int, count: int, settings: TransformerSettings | None, dtype, rngs) -> nnx.List | None:
    if settings is None:
        return None
    return nnx.List([Transformer2DModel(channels, settings, dtype=dtype, rngs=rngs) for _ in range(count)])


class DownBlock2D(nnx.Module):
    """``num_layers`` resnets, each followed by a spatial transformer when ``transformer`` is given
    (diffusers' ``CrossAttnDownBlock2D``; ``DownBlock2D`` without), then an optional downsampler.

    Returns the output and the skip connections the up path reads: every layer's output, and
    the downsampled one.
    """

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, resnet: ResnetSettings,
                 transformer: TransformerSettings | None, add_downsample: bool, downsample_padding: int, *,
                 dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, resnet, dtype=dtype, rngs=rngs)
            for i in range(num_layers)])
        self.attentions = _transformers(out_channels, num_layers, transformer, dtype, rngs)
        self.downsampler = (Downsample2D(out_channels, downsample_padding, dtype=dtype, rngs=rngs)
                            if add_downsample else None)

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsampler is not None:
            x = self.downsampler(x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnet, then (spatial transformer, resnet) ``num_layers`` times, at the lowest resolution."""

    def __init__(self, channels: int, resnet: ResnetSettings, transformer: TransformerSettings,
                 output_scale_factor: float, num_layers: int = 1, *, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(channels, channels, resnet, output_scale_factor=output_scale_factor, dtype=dtype, rngs=rngs)
            for _ in range(num_layers + 1)])
        self.attentions = _transformers(channels, num_layers, transformer, dtype, rngs)

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        x = self.resnets[0](x, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attention(x, context), temb)
        return x


class UpBlock2D(nnx.Module):
    """``num_layers`` resnets on ``[x, skip]`` concatenated along channels, each followed by a spatial
    transformer when ``transformer`` is given (diffusers' ``CrossAttnUpBlock2D``; ``UpBlock2D``
    without), then an optional upsampler.

    ``skip_channels``: the channels of the down path's skips that the last layer reads
    (the earlier layers read ``out_channels``-wide ones); ``prev_channels``: the input's.
    """

    def __init__(self, skip_channels: int, prev_channels: int, out_channels: int, num_layers: int,
                 resnet: ResnetSettings, transformer: TransformerSettings | None, add_upsample: bool, *,
                 dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D((prev_channels if i == 0 else out_channels)
                          + (skip_channels if i == num_layers - 1 else out_channels),
                          out_channels, resnet, dtype=dtype, rngs=rngs)
            for i in range(num_layers)])
        self.attentions = _transformers(out_channels, num_layers, transformer, dtype, rngs)
        self.upsampler = Upsample2D(out_channels, dtype=dtype, rngs=rngs) if add_upsample else None

    def __call__(self, x: jax.Array, skips: list[jax.Array], temb: jax.Array, context: jax.Array,
                 upsample_size: tuple[int, int] | None) -> jax.Array:
        """``skips``: this block's skip connections, consumed last first; ``upsample_size``: the
        ``(height, width)`` to upsample to (the next block's skips'), None for the last block."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips[-1 - i]], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsampler is not None:
            x = self.upsampler(x, upsample_size)
        return x
