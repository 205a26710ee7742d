"""Stable unCLIP's components, loaded from a diffusers ``StableUnCLIPImg2ImgPipeline`` folder.

The folder's ``unet/``, ``vae/``, ``text_encoder/`` (OpenCLIP ViT-H's text tower as a transformers
``CLIPTextModel``), ``tokenizer/``, ``image_normalizer/``, ``scheduler/`` and
``image_noising_scheduler/`` are read, each through its strict loader. ``image_encoder/`` and
``feature_extractor/`` are not: reconstruction conditions on CLIP image embeddings predicted from
the brain, not on an image.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nvl_jax import sharding
from nvl_jax.diffusion import StableUnCLIPImageNormalizer
from nvl_jax.diffusion.schedulers import DDPMScheduler, Scheduler, scheduler_from_config
from nvl_jax.models import clip, hf_loader, unet, vae

# The published pipelines; "small" is the paper's (CLIP ViT-L/14 image embeddings).
STABLE_UNCLIP_SMALL = "stabilityai/stable-diffusion-2-1-unclip-small"


@dataclasses.dataclass
class StableUnCLIP:
    """The denoiser, its conditioning and the decoder. ``scheduler``: the sampler (the folder's
    ``scheduler/``, or another class reading its config); ``image_noising_scheduler``: the DDPM
    noising of the image embedding."""

    unet: unet.UNet2DConditionModel
    vae: vae.AutoencoderKL
    text_encoder: clip.CLIPTextModel
    tokenizer: object
    image_normalizer: StableUnCLIPImageNormalizer
    scheduler: Scheduler
    image_noising_scheduler: DDPMScheduler
    folder: Path

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, *, scheduler: str | None = None, dtype=jnp.float32,
                        mesh: jax.sharding.Mesh | None = None,
                        rules: sharding.Rules = sharding.DEFAULT_RULES) -> StableUnCLIP:
        """Loads a pipeline folder (or hub name). ``scheduler``: a class name of
        ``nvl_jax.diffusion.schedulers`` to sample with instead of the folder's (e.g. ``"DDIMScheduler"``),
        built from the folder's scheduler config as diffusers' ``from_config`` does."""
        root = hf_loader.resolve(path_or_name)
        absent = [name for name in ("unet", "vae", "text_encoder", "tokenizer", "image_normalizer", "scheduler",
                                    "image_noising_scheduler") if not (root / name).is_dir()]
        if absent:
            raise FileNotFoundError(f"{root}: not a StableUnCLIPImg2ImgPipeline folder; missing {absent}")
        kwargs = dict(dtype=dtype, mesh=mesh, rules=rules)
        noising = scheduler_from_config(root, subfolder="image_noising_scheduler")
        if not isinstance(noising, DDPMScheduler):
            raise ValueError(f"{root / 'image_noising_scheduler'}: expected a DDPMScheduler config, got "
                             f"{type(noising).__name__}")
        return cls(
            unet=unet.UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kwargs),
            vae=vae.AutoencoderKL.from_pretrained(root, subfolder="vae", **kwargs),
            text_encoder=clip.CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kwargs),
            tokenizer=clip.load_tokenizer(root, subfolder="tokenizer"),
            image_normalizer=StableUnCLIPImageNormalizer.from_pretrained(root, subfolder="image_normalizer",
                                                                         **kwargs),
            scheduler=scheduler_from_config(root, subfolder="scheduler", class_name=scheduler),
            image_noising_scheduler=noising,
            folder=root,
        )

    @property
    def embedding_dim(self) -> int:
        """Width of the CLIP image embeddings the UNet is conditioned on (768 for unCLIP-small)."""
        return self.image_normalizer.config.embedding_dim

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        """int32 ``[len(prompts), model_max_length]``, padded as diffusers' pipeline pads."""
        ids, _ = clip.tokenize(self.tokenizer, prompts, max_length=self.tokenizer.model_max_length)
        return ids
