"""A tiny random-weight Stable unCLIP, saved as a diffusers ``StableUnCLIPImg2ImgPipeline`` folder.

``--unclip tiny-random`` builds it, so the in-silico demo runs offline from stage-1 run to metrics.
Its VAE and CLIP image encoder are exactly the tiny random models that the in-silico targets are
computed with (``nvl_jax.data.targets.tiny_random_models`` at the same seed), so a stage-1 run's
predicted latent ``z_v`` decodes through the VAE it was regressed onto and ``z_c`` lives in the
space of that image encoder. The UNet and text encoder are random: a reconstruction from this
model does NOT resemble its stimulus (that needs generative models trained on the stimuli). It
exercises the pipeline, its shapes and its files, nothing more.
"""

from __future__ import annotations

import json
from pathlib import Path
import string
import tempfile

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nvl_jax.data import targets
from nvl_jax.diffusion import conditioning
from nvl_jax.models import clip, unet
from nvl_jax.reconstruction import export

NAME = "tiny-random"

# Stable unCLIP's own scheduler settings (v-prediction, SD 2.x's scaled-linear betas, PLMS) and its
# image-embedding noising schedule, as the published pipeline's scheduler folders hold them.
SCHEDULER = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading"}
IMAGE_NOISING_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000,
                           "beta_schedule": "squaredcos_cap_v2", "clip_sample": True, "prediction_type": "epsilon",
                           "variance_type": "fixed_small"}

# A byte-level-free CLIP BPE vocabulary: single letters (inside and at the end of a word), a few
# merges, then the special tokens last, as in CLIP (the end-of-text token has the largest id).
_MERGES = ("t h", "th e</w>", "a n", "an d</w>", "o f</w>", "i n", "o n</w>")
START, END = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


def _vocabulary() -> dict[str, int]:
    symbols = string.ascii_lowercase + string.digits + ".,'!?-"
    tokens = [*symbols, *(c + "</w>" for c in symbols), *("".join(m.split()) for m in _MERGES), START, END]
    return {token: i for i, token in enumerate(tokens)}


def save_tokenizer(folder: Path) -> dict[str, int]:
    """A transformers ``CLIPTokenizer`` folder with the tiny vocabulary; returns the vocabulary."""
    from transformers import CLIPTokenizer

    vocab = _vocabulary()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp)
        (source / "vocab.json").write_text(json.dumps(vocab))
        (source / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
        CLIPTokenizer(str(source / "vocab.json"), str(source / "merges.txt"), pad_token=END,
                      model_max_length=MAX_LENGTH).save_pretrained(folder)
    return vocab


def unet_config(clip_dim: int, latent_channels: int, latent_size: int, text_width: int) -> unet.UNetConfig:
    """Two levels, 32 and 64 channels, one layer each, linear transformer projections, class labels
    ``[batch, 2 * clip_dim]`` (the noised embedding and its noise level's features) as in Stable unCLIP."""
    return unet.UNetConfig(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=text_width,
        attention_head_dim=(2, 4), use_linear_projection=True, class_embed_type="projection",
        projection_class_embeddings_input_dim=2 * clip_dim)


def save_tiny_random_unclip(folder: str | Path, *, seed: int = 0, image_size: int = 64) -> Path:
    """Writes the tiny random unCLIP to ``folder``; returns it.

    ``seed``: the seed the in-silico targets were computed with (``tiny_random_models(seed)``:
    its VAE and CLIP image encoder are reused). ``image_size``: the pixels the UNet's
    ``sample_size`` documents (any multiple of 8 runs).
    """
    folder = Path(folder)
    image_encoder, vae = targets.tiny_random_models(seed)
    clip_dim = image_encoder.config.projection_dim
    vocab = save_tokenizer(folder / "tokenizer")
    text_config = clip.CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
                                      projection_dim=32, hidden_act="gelu", eos_token_id=vocab[END])
    text_encoder = clip.CLIPTextModel(text_config, with_projection=False, rngs=nnx.Rngs(seed + 2))
    denoiser = unet.UNet2DConditionModel(
        unet_config(clip_dim, vae.config.latent_channels, image_size // vae.config.downscale_factor,
                    text_config.hidden_size), rngs=nnx.Rngs(seed + 3))
    normalizer = conditioning.StableUnCLIPImageNormalizer(
        conditioning.StableUnCLIPImageNormalizerConfig(embedding_dim=clip_dim))
    rng = np.random.default_rng(seed + 4)
    normalizer.mean[...] = jnp.asarray(rng.normal(0.0, 0.5, (1, clip_dim)), jnp.float32)
    normalizer.std[...] = jnp.asarray(rng.uniform(0.5, 1.5, (1, clip_dim)), jnp.float32)

    export.save_unet(denoiser, folder / "unet")
    export.save_vae(vae, folder / "vae")
    export.save_text_encoder(text_encoder, folder / "text_encoder", pad_token_id=vocab[END],
                             bos_token_id=vocab[START])
    export.save_image_encoder(image_encoder, folder / "image_encoder")
    export.save_image_normalizer(normalizer, folder / "image_normalizer")
    for name, config in (("scheduler", SCHEDULER), ("image_noising_scheduler", IMAGE_NOISING_SCHEDULER)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    size = image_encoder.config.image_size
    (folder / "feature_extractor").mkdir(parents=True, exist_ok=True)
    (folder / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
        indent=2))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableUnCLIPImg2ImgPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "image_normalizer": ["stable_diffusion", "StableUnCLIPImageNormalizer"],
        "image_noising_scheduler": ["diffusers", "DDPMScheduler"],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    return folder
