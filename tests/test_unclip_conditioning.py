"""Stable unCLIP's conditioning against diffusers: the timestep embedding, the image normalizer loaded from a
saved ``image_normalizer/`` folder, the noised image embedding (diffusers' own pipeline method), and guidance."""

import types

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.models.embeddings import get_timestep_embedding as reference_timestep_embedding
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer as \
    ReferenceNormalizer
from safetensors.numpy import load_file, save_file

from nvl_jax.diffusion import (StableUnCLIPImageNormalizer, classifier_free_guidance, get_timestep_embedding,
                               noise_image_embeddings)
from nvl_jax.diffusion.schedulers import DDPMScheduler
from nvl_jax.models.hf_loader import CheckpointMismatchError

EMBED_DIM = 32
BATCH = 3
WEIGHTS = "diffusion_pytorch_model.safetensors"
IMAGE_NOISING = dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000, clip_sample=True,
                     prediction_type="epsilon", variance_type="fixed_small")


# The UNet's time projection (320), unCLIP-L's noise-level embedding (768), an odd width, a scaled one.
@pytest.mark.parametrize("dim,flip,shift,scale", [(320, True, 0, 1), (768, True, 0, 1), (33, False, 1, 1),
                                                   (64, False, 1, 2.5)])
def test_timestep_embedding_equals_diffusers(dim, flip, shift, scale):
    timesteps = np.concatenate([np.arange(1000), [17.5, 0.25]]).astype(np.float32)
    expected = reference_timestep_embedding(torch.from_numpy(timesteps), dim, flip_sin_to_cos=flip,
                                            downscale_freq_shift=shift, scale=scale).numpy()
    actual = jax.jit(get_timestep_embedding, static_argnums=(1, 2, 3, 4))(timesteps, dim, flip, shift, scale)
    assert actual.shape == (len(timesteps), dim) and actual.dtype == jnp.float32
    # Angles reach 1000 rad, where one float32 ulp is 6e-5: torch's exp (SLEEF's) is not always
    # correctly rounded, so a few of its frequencies sit an ulp from ours, and sin/cos move by that much.
    np.testing.assert_allclose(np.asarray(actual), expected, atol=1e-4, rtol=0)


def test_timestep_embedding_wants_a_batch_of_timesteps():
    with pytest.raises(ValueError, match=r"1-D \[batch\]"):
        get_timestep_embedding(jnp.zeros((2, 1)), 8)


@pytest.fixture(scope="module")
def reference_normalizer():
    torch.manual_seed(0)
    normalizer = ReferenceNormalizer(embedding_dim=EMBED_DIM)
    with torch.no_grad():  # diffusers starts at mean 0, std 1: random statistics make the test see them
        normalizer.mean.copy_(torch.randn(1, EMBED_DIM))
        normalizer.std.copy_(torch.rand(1, EMBED_DIM) + 0.5)
    return normalizer


@pytest.fixture(scope="module")
def pipeline_dir(reference_normalizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("unclip")
    reference_normalizer.save_pretrained(root / "image_normalizer")
    diffusers.DDPMScheduler(**IMAGE_NOISING).save_config(root / "image_noising_scheduler")
    return root


@pytest.fixture(scope="module")
def normalizer(pipeline_dir):
    return StableUnCLIPImageNormalizer.from_pretrained(pipeline_dir, subfolder="image_normalizer")


def test_normalizer_loads_and_scales_as_diffusers(reference_normalizer, normalizer):
    assert normalizer.mean.shape == (1, EMBED_DIM) and normalizer.std.shape == (1, EMBED_DIM)
    embeds = np.random.default_rng(0).standard_normal((BATCH, EMBED_DIM)).astype(np.float32)
    with torch.no_grad():
        scaled = reference_normalizer.scale(torch.from_numpy(embeds)).numpy()
        unscaled = reference_normalizer.unscale(torch.from_numpy(embeds)).numpy()
    np.testing.assert_allclose(np.asarray(normalizer.scale(embeds)), scaled, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(normalizer.unscale(embeds)), unscaled, rtol=1e-6, atol=1e-6)


def test_normalizer_load_is_strict(pipeline_dir, tmp_path):
    tensors = load_file(pipeline_dir / "image_normalizer" / WEIGHTS)
    config = (pipeline_dir / "image_normalizer" / "config.json").read_text()
    for name, broken in [("extra", {**tensors, "scale": tensors["std"]}),
                         ("missing", {"mean": tensors["mean"]}),
                         ("wide", {k: np.concatenate([v, v], axis=1) for k, v in tensors.items()})]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(config)
        save_file(broken, folder / WEIGHTS)
        with pytest.raises(CheckpointMismatchError):
            StableUnCLIPImageNormalizer.from_pretrained(folder)


@pytest.mark.parametrize("noise_level", [0, 1, 250, 999])
def test_noise_image_embeddings_equals_diffusers_pipeline(reference_normalizer, normalizer, pipeline_dir,
                                                          noise_level):
    rng = np.random.default_rng(noise_level)
    embeds = rng.standard_normal((BATCH, EMBED_DIM)).astype(np.float32)
    noise = rng.standard_normal((BATCH, EMBED_DIM)).astype(np.float32)
    # diffusers' own method, on an object holding just the two components it reads.
    components = types.SimpleNamespace(image_normalizer=reference_normalizer,
                                       image_noising_scheduler=diffusers.DDPMScheduler(**IMAGE_NOISING))
    with torch.no_grad():
        expected = diffusers.StableUnCLIPImg2ImgPipeline.noise_image_embeddings(
            components, torch.from_numpy(embeds), noise_level, noise=torch.from_numpy(noise)).numpy()
    noising = DDPMScheduler.from_config(pipeline_dir, subfolder="image_noising_scheduler")
    # noise_level traced: one compilation serves every level.
    actual = jax.jit(noise_image_embeddings, static_argnums=(4,))(embeds, noise_level, noise, normalizer, noising)
    assert actual.shape == (BATCH, 2 * EMBED_DIM)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5, atol=2e-6)
    # Even level 0 noises the embedding (abar_0 < 1): the injected noise matters.
    assert not np.allclose(np.asarray(actual[:, :EMBED_DIM]), embeds, atol=1e-3)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0, 7.5])
def test_classifier_free_guidance_equals_diffusers(guidance_scale):
    rng = np.random.default_rng(0)
    model_output = rng.standard_normal((2 * BATCH, 4, 4, 2)).astype(np.float32)  # [uncond; cond]
    uncond, cond = torch.from_numpy(model_output).chunk(2)  # the pipelines' split
    guider = ClassifierFreeGuidance(guidance_scale=guidance_scale)
    expected = guider.forward(cond, uncond).pred.numpy()
    actual = jax.jit(classifier_free_guidance)(model_output, guidance_scale)
    assert actual.shape == (BATCH, 4, 4, 2)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-6, atol=1e-6)


def test_classifier_free_guidance_wants_paired_halves():
    with pytest.raises(ValueError, match="halves"):
        classifier_free_guidance(jnp.zeros((3, 2)), 2.0)
