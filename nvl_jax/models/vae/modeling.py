"""The Stable Diffusion variational autoencoder (diffusers' ``AutoencoderKL``) in Flax NNX.

The encoder maps an image ``[batch, height, width, 3]`` in ``[-1, 1]`` to a
diagonal Gaussian over latents ``[batch, height / f, width / f, latent_channels]``
(``f = 2 ** (len(block_out_channels) - 1)``, 8 for Stable Diffusion); the
decoder maps latents back to images. Module names follow diffusers' (the
three renames are listed in ``vae.params``), so the checkpoint key table stays short.
Arrays are channels-last throughout.
"""

from __future__ import annotations

import dataclasses
import os

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from nvl_jax import sharding
from nvl_jax.models import hf_loader
from nvl_jax.models.layers import Conv2d, Dense, GroupNorm, activation
from nvl_jax.models.vae.params import KEY_MAP

# diffusers builds every VAE norm (resnets, attention, output) with this epsilon.
NORM_EPS = 1e-6
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """The fields of a diffusers ``AutoencoderKL`` ``config.json`` that shape the model.

    ``latents_mean`` / ``latents_std`` (SDXL-era pipelines) are pipeline-side
    normalisation and are not read; ``scaling_factor`` and ``shift_factor`` are
    applied by :meth:`AutoencoderKL.scale_latents`.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int | tuple[int, ...] = 512

    @property
    def downscale_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_hf_config(cls, d: dict) -> AutoencoderKLConfig:
        """Reads a diffusers ``AutoencoderKL`` config dict; raises on block types this port lacks.

        An absent field takes diffusers' constructor default, as diffusers itself would.
        """
        class_name = d.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise ValueError(f"config is for {class_name!r}, not AutoencoderKL")
        block_out_channels = tuple(d.get("block_out_channels", (64,)))
        for field, supported in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
            types = tuple(d.get(field, (supported,)))
            unsupported = sorted(set(types) - {supported})
            if unsupported:
                raise ValueError(f"AutoencoderKL config: {field} has {unsupported}; only {supported} is supported")
            if len(types) != len(block_out_channels):
                raise ValueError(f"AutoencoderKL config: {len(types)} {field} for "
                                 f"{len(block_out_channels)} block_out_channels")
        sample_size = d.get("sample_size", 32)
        return cls(
            in_channels=d.get("in_channels", 3),
            out_channels=d.get("out_channels", 3),
            block_out_channels=block_out_channels,
            layers_per_block=d.get("layers_per_block", 1),
            latent_channels=d.get("latent_channels", 4),
            norm_num_groups=d.get("norm_num_groups", 32),
            act_fn=d.get("act_fn", "silu"),
            scaling_factor=d.get("scaling_factor", 0.18215),
            shift_factor=d.get("shift_factor"),
            use_quant_conv=d.get("use_quant_conv", True),
            use_post_quant_conv=d.get("use_post_quant_conv", True),
            mid_block_add_attention=d.get("mid_block_add_attention", True),
            sample_size=tuple(sample_size) if isinstance(sample_size, list) else sample_size,
        )

    @classmethod
    def sd_vae_ft_mse(cls) -> AutoencoderKLConfig:
        """``stabilityai/sd-vae-ft-mse``: the SD 1.x VAE with the MSE-finetuned decoder."""
        return cls(sample_size=256)

    @classmethod
    def stable_unclip_vae(cls) -> AutoencoderKLConfig:
        """``stabilityai/stable-diffusion-2-1-unclip-small``, subfolder ``vae``: the SD 2.x VAE."""
        return cls(sample_size=768)


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior over latents, a Gaussian with diagonal covariance.

    mean: ``[batch, height / f, width / f, latent_channels]``.
    logvar: same shape; clipped to ``[-30, 20]`` as diffusers does, so ``std`` stays finite.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """Splits ``[..., 2 * latent_channels]`` into mean and log-variance, in that order."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        """``exp(logvar / 2)``, shape of ``mean``."""
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """A reparameterised draw ``mean + std * eps``, ``eps ~ N(0, I)``; shape of ``mean``."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        """The most likely latents: ``mean``."""
        return self.mean


class ResnetBlock2D(nnx.Module):
    """``x + conv2(act(norm2(conv1(act(norm1(x))))))``; the skip is a 1x1 conv when channels change."""

    def __init__(self, in_channels: int, out_channels: int, config: AutoencoderKLConfig, *, dtype, rngs: nnx.Rngs):
        groups = config.norm_num_groups
        self.act = activation(config.act_fn)
        self.norm1 = GroupNorm(in_channels, groups, eps=NORM_EPS, dtype=dtype, rngs=rngs)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(out_channels, groups, eps=NORM_EPS, dtype=dtype, rngs=rngs)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (Conv2d(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                              if in_channels != out_channels else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[batch, height, width, in_channels]`` -> ``[batch, height, width, out_channels]``."""
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SpatialSelfAttention(nnx.Module):
    """Single-head self-attention across all ``height * width`` positions, with a residual.

    One head as wide as the channels, so the logits are scaled by ``channels ** -0.5``.
    """

    def __init__(self, channels: int, config: AutoencoderKLConfig, *, dtype, rngs: nnx.Rngs):
        self.group_norm = GroupNorm(channels, config.norm_num_groups, eps=NORM_EPS, dtype=dtype, rngs=rngs)
        self.to_q = Dense(channels, channels, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.to_k = Dense(channels, channels, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.to_v = Dense(channels, channels, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.to_out = Dense(channels, channels, axes=("heads", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[batch, height, width, channels]`` -> the same shape."""
        batch, height, width, channels = x.shape
        h = self.group_norm(x).reshape(batch, height * width, 1, channels)
        # The XLA path takes the softmax in float32, as diffusers' upcast_softmax does.
        h = jax.nn.dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))
        return x + self.to_out(h.reshape(x.shape))


class MidBlock(nnx.Module):
    """resnet, attention (unless the config drops it), resnet, at the lowest resolution."""

    def __init__(self, channels: int, config: AutoencoderKLConfig, *, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, config, dtype=dtype, rngs=rngs)
                                 for _ in range(2)])
        self.attention = (SpatialSelfAttention(channels, config, dtype=dtype, rngs=rngs)
                          if config.mid_block_add_attention else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class DownEncoderBlock(nnx.Module):
    """``num_layers`` resnets, then (except in the last block) a stride-2 conv halving height and width."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_downsample: bool,
                 config: AutoencoderKLConfig, *, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, config, dtype=dtype, rngs=rngs)
            for i in range(num_layers)])
        self.downsample_conv = (Conv2d(out_channels, out_channels, 3, stride=2, dtype=dtype, rngs=rngs)
                                if add_downsample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsample_conv is not None:
            # The original LDM pads only the bottom and right edge before the
            # unpadded stride-2 conv; symmetric padding would shift every output pixel.
            x = self.downsample_conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))
        return x


class UpDecoderBlock(nnx.Module):
    """``num_layers`` resnets, then (except in the last block) nearest 2x upsampling and a 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_upsample: bool,
                 config: AutoencoderKLConfig, *, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, config, dtype=dtype, rngs=rngs)
            for i in range(num_layers)])
        self.upsample_conv = (Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
                              if add_upsample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsample_conv is not None:
            x = self.upsample_conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
        return x


class Encoder(nnx.Module):
    """Image ``[batch, height, width, in_channels]`` -> Gaussian moments ``[batch, h, w, 2 * latent_channels]``."""

    def __init__(self, config: AutoencoderKLConfig, *, dtype, rngs: nnx.Rngs):
        channels = config.block_out_channels
        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            DownEncoderBlock(channels[max(i - 1, 0)], channels[i], config.layers_per_block,
                             i < len(channels) - 1, config, dtype=dtype, rngs=rngs)
            for i in range(len(channels))])
        self.mid_block = MidBlock(channels[-1], config, dtype=dtype, rngs=rngs)
        self.conv_norm_out = GroupNorm(channels[-1], config.norm_num_groups, eps=NORM_EPS, dtype=dtype, rngs=rngs)
        self.conv_out = Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        # diffusers hard-codes SiLU here whatever act_fn says.
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latents ``[batch, h, w, latent_channels]`` -> image ``[batch, h * f, w * f, out_channels]``."""

    def __init__(self, config: AutoencoderKLConfig, *, dtype, rngs: nnx.Rngs):
        channels = config.block_out_channels[::-1]
        self.conv_in = Conv2d(config.latent_channels, channels[0], 3, padding=1, dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(channels[0], config, dtype=dtype, rngs=rngs)
        self.up_blocks = nnx.List([
            UpDecoderBlock(channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1,
                           i < len(channels) - 1, config, dtype=dtype, rngs=rngs)
            for i in range(len(channels))])
        self.conv_norm_out = GroupNorm(channels[-1], config.norm_num_groups, eps=NORM_EPS, dtype=dtype, rngs=rngs)
        self.conv_out = Conv2d(channels[-1], config.out_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        # diffusers hard-codes SiLU here whatever act_fn says.
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """The Stable Diffusion VAE: ``encode`` images to a latent Gaussian, ``decode`` latents to images.

    Images are ``[batch, height, width, 3]`` in ``[-1, 1]``; height and width
    are multiples of ``config.downscale_factor`` (``f``, 8 for Stable Diffusion).

    Latent scaling. ``encode`` returns and ``decode`` takes *unscaled* latents,
    as diffusers' ``AutoencoderKL`` does. Stable Diffusion's UNet works on
    *scaled* latents, ``scale_latents(z) = (z - shift_factor) * scaling_factor``
    (``0.18215``, no shift, for SD 1.x/2.x), which have roughly unit variance;
    a pipeline scales after ``encode`` and calls ``unscale_latents`` before
    ``decode``. Code that regresses latents chooses which space its targets live
    in; to feed a Stable Diffusion UNet, they must end up scaled.
    """

    def __init__(self, config: AutoencoderKLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        """Random parameters (seed 0 unless ``rngs`` is given), stored and computed in ``dtype``."""
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config, self.dtype = config, dtype
        latent = config.latent_channels
        self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
        self.quant_conv = (Conv2d(2 * latent, 2 * latent, 1, dtype=dtype, rngs=rngs)
                           if config.use_quant_conv else None)
        self.post_quant_conv = (Conv2d(latent, latent, 1, dtype=dtype, rngs=rngs)
                                if config.use_post_quant_conv else None)
        self.decoder = Decoder(config, dtype=dtype, rngs=rngs)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Images ``[batch, height, width, 3]`` in ``[-1, 1]`` -> posterior over unscaled latents
        ``[batch, height / f, width / f, latent_channels]``."""
        moments = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents ``[batch, h, w, latent_channels]`` -> images ``[batch, h * f, w * f, 3]``."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstructs images ``[batch, height, width, 3]``: decodes the posterior mode, or a sample if ``key``."""
        posterior = self.encode(x)
        return self.decode(posterior.mode() if key is None else posterior.sample(key))

    def scale_latents(self, z: jax.Array) -> jax.Array:
        """Unscaled (``encode``) latents -> the scaled latents a Stable Diffusion UNet works on."""
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def unscale_latents(self, z: jax.Array) -> jax.Array:
        """The inverse of :meth:`scale_latents`: scaled latents -> what ``decode`` takes."""
        return z / self.config.scaling_factor + (self.config.shift_factor or 0.0)

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, *, subfolder: str | None = None, dtype=jnp.float32,
                        mesh: jax.sharding.Mesh | None = None,
                        rules: sharding.Rules = sharding.DEFAULT_RULES) -> AutoencoderKL:
        """Loads a diffusers ``AutoencoderKL`` checkpoint: a local folder or a hub name.

        ``subfolder="vae"`` reads the VAE of a full pipeline repository.
        Parameters and compute use ``dtype``; with a ``mesh``, every parameter
        is placed on the sharding its logical axes map to under ``rules``.
        """
        folder = hf_loader.resolve(path_or_name, subfolder)
        config = AutoencoderKLConfig.from_hf_config(hf_loader.read_config(folder))
        return hf_loader.from_pretrained(lambda: cls(config, dtype=dtype), folder, KEY_MAP, mesh=mesh, rules=rules)
