"""Stable unCLIP's image conditioning: the CLIP image embedding, noise-augmented, plus its noise level.

diffusers' ``StableUnCLIPImg2ImgPipeline.noise_image_embeddings``: the embedding
is normalized with the checkpoint's ``image_normalizer`` statistics, noised with
a DDPM forward process at ``noise_level``, un-normalized, and concatenated with
the sinusoidal embedding of ``noise_level``. The result ``[batch, 2 * embed_dim]``
is the UNet's ``class_labels``.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from nvl_jax import sharding
from nvl_jax.diffusion.embeddings import get_timestep_embedding
from nvl_jax.diffusion.schedulers.base import Scheduler
from nvl_jax.models import hf_loader

# diffusers' StableUnCLIPImageNormalizer holds two parameters, named as here.
KEY_MAP = hf_loader.KeyMap(rules=[(r"mean", "mean", None), (r"std", "std", None)])


@dataclasses.dataclass(frozen=True)
class StableUnCLIPImageNormalizerConfig:
    embedding_dim: int = 768

    @classmethod
    def from_hf_config(cls, d: dict) -> StableUnCLIPImageNormalizerConfig:
        class_name = d.get("_class_name", "StableUnCLIPImageNormalizer")
        if class_name != "StableUnCLIPImageNormalizer":
            raise ValueError(f"config is for {class_name!r}, not StableUnCLIPImageNormalizer")
        return cls(embedding_dim=d.get("embedding_dim", 768))


class StableUnCLIPImageNormalizer(nnx.Module):
    """The CLIP image embedders' statistics: ``mean`` and ``std``, each ``[1, embedding_dim]``."""

    def __init__(self, config: StableUnCLIPImageNormalizerConfig, *, dtype=jnp.float32):
        self.config = config
        # Replicated: two vectors of the embedding width.
        self.mean = nnx.Param(jnp.zeros((1, config.embedding_dim), dtype), out_sharding=(None, None),
                              eager_sharding=False)
        self.std = nnx.Param(jnp.ones((1, config.embedding_dim), dtype), out_sharding=(None, None),
                             eager_sharding=False)

    def scale(self, embeds: jax.Array) -> jax.Array:
        """``[batch, embedding_dim]`` -> the same, standardized."""
        return (embeds - self.mean[...]) * 1.0 / self.std[...]

    def unscale(self, embeds: jax.Array) -> jax.Array:
        """Inverse of :meth:`scale`."""
        return embeds * self.std[...] + self.mean[...]

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, *, subfolder: str | None = None, dtype=jnp.float32,
                        mesh: jax.sharding.Mesh | None = None,
                        rules: sharding.Rules = sharding.DEFAULT_RULES) -> StableUnCLIPImageNormalizer:
        """Loads diffusers' ``image_normalizer/`` folder; ``subfolder="image_normalizer"`` reads it from a pipeline."""
        folder = hf_loader.resolve(path_or_name, subfolder)
        config = StableUnCLIPImageNormalizerConfig.from_hf_config(hf_loader.read_config(folder))
        return hf_loader.from_pretrained(lambda: cls(config, dtype=dtype), folder, KEY_MAP, mesh=mesh, rules=rules)


def noise_image_embeddings(image_embeds: jax.Array, noise_level: int | jax.Array, noise: jax.Array,
                           normalizer: StableUnCLIPImageNormalizer, noising_scheduler: Scheduler) -> jax.Array:
    """The UNet's class labels ``[batch, 2 * embed_dim]`` from CLIP image embeddings ``[batch, embed_dim]``.

    ``noise``: ``[batch, embed_dim]``, standard normal. ``noise_level`` in
    ``[0, num_train_timesteps)`` (may be traced); 0 still adds a little noise,
    since ``abar_0 < 1``. ``noising_scheduler``: the pipeline's
    ``image_noising_scheduler`` (a :class:`DDPMScheduler`).
    """
    batch, embed_dim = image_embeds.shape
    noise_levels = jnp.full((batch,), noise_level, jnp.int32)
    embeds = normalizer.scale(image_embeds)
    embeds = noising_scheduler.add_noise(embeds, noise, noise_levels)
    embeds = normalizer.unscale(embeds)
    level_embedding = get_timestep_embedding(noise_levels, embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    return jnp.concatenate([embeds, level_embedding.astype(embeds.dtype)], axis=1)
