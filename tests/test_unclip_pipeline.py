"""The reconstruction sampler against diffusers' StableUnCLIPImg2ImgPipeline, and the beta start.

The reference pipeline is built from diffusers / transformers classes with tiny configs, saved
with save_pretrained and loaded by ours. diffusers draws the image-embedding noise itself (noise
level 0 still adds noise), so its own ``noise_image_embeddings`` is called with our noise.
"""

import types

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

from nvl_jax import sharding
from nvl_jax.diffusion.schedulers import PNDMScheduler
from nvl_jax.reconstruction import SamplingConfig, StableUnCLIP, UnCLIPSampler, beta_start, tiny_random
from nvl_jax.reconstruction.export import checkpoint_tensors

EMBED = 16
LATENT = (2, 8, 8, 4)  # batch, h, w, channels
PROMPTS = ["the cat", "a photo of the dog and the cat"]
UNCLIP_PNDM = tiny_random.SCHEDULER


def _reference_pipeline(folder):
    torch.manual_seed(0)
    vocab = tiny_random.save_tokenizer(folder / "tokenizer")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu", eos_token_id=vocab[tiny_random.END],
        bos_token_id=vocab[tiny_random.START], pad_token_id=vocab[tiny_random.END]))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
        upcast_attention=True, class_embed_type="projection", projection_class_embeddings_input_dim=2 * EMBED)
    vae = diffusers.AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                  sample_size=16)
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=EMBED)
    with torch.no_grad():
        normalizer.mean.normal_(0, 0.5)
        normalizer.std.uniform_(0.5, 1.5)
    image_encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
        patch_size=16, projection_dim=EMBED))
    pipe = diffusers.StableUnCLIPImg2ImgPipeline(
        feature_extractor=transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                          crop_size={"height": 32, "width": 32}),
        image_encoder=image_encoder, image_normalizer=normalizer,
        image_noising_scheduler=diffusers.DDPMScheduler(**{k: v for k, v in
                                                           tiny_random.IMAGE_NOISING_SCHEDULER.items()
                                                           if k != "_class_name"}),
        tokenizer=tokenizer, text_encoder=text_encoder, unet=unet,
        scheduler=diffusers.PNDMScheduler(**{k: v for k, v in UNCLIP_PNDM.items() if k != "_class_name"}), vae=vae)
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unclip")
    return _reference_pipeline(folder), folder


@pytest.fixture(scope="module")
def ours(reference):
    return StableUnCLIP.from_pretrained(reference[1])


def _inputs(seed=0, batch=LATENT[0]):
    rng = np.random.default_rng(seed)
    shape = (batch, *LATENT[1:])
    return (rng.standard_normal(shape).astype(np.float32), rng.standard_normal((batch, EMBED)).astype(np.float32),
            rng.standard_normal(shape).astype(np.float32), rng.standard_normal((batch, EMBED)).astype(np.float32))


def _diffusers_images(pipe, image_embeds, latent_noise, embedding_noise, prompts, *, steps, guidance, noise_level):
    """diffusers' pipeline from our injected noise: the latents it starts from, and its own
    noise_image_embeddings called with our embedding noise instead of a draw."""
    own = type(pipe).noise_image_embeddings

    def injected(self, image_embeds, noise_level, noise=None, generator=None):
        return own(self, image_embeds, noise_level, noise=torch.from_numpy(embedding_noise), generator=generator)

    pipe.noise_image_embeddings = types.MethodType(injected, pipe)
    try:
        out = pipe(prompt=prompts, image_embeds=torch.from_numpy(image_embeds),
                   latents=torch.from_numpy(latent_noise.transpose(0, 3, 1, 2)), noise_level=noise_level,
                   num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                   height=64, width=64)  # only checked for divisibility: the latents set the size
    finally:
        del pipe.noise_image_embeddings
    return out.images


@pytest.mark.parametrize("guidance,noise_level,prompts", [(1.0, 0, None), (7.0, 0, PROMPTS), (5.0, 250, None)],
                         ids=["unguided-empty", "guided-prompts", "guided-noised-embedding"])
def test_beta_one_equals_diffusers_pipeline(reference, ours, guidance, noise_level, prompts):
    pipe, _ = reference
    z_v, image_embeds, latent_noise, embedding_noise = _inputs()
    expected = _diffusers_images(pipe, image_embeds, latent_noise, embedding_noise, prompts or ["", ""], steps=6,
                                 guidance=guidance, noise_level=noise_level)
    config = SamplingConfig(num_inference_steps=6, guidance_scale=guidance, noise_level=noise_level, beta=1.0)
    ids = ours.tokenize(prompts) if prompts else None
    actual = np.asarray(UnCLIPSampler(ours)(z_v, image_embeds, latent_noise, embedding_noise, ids, config=config))
    assert actual.shape == expected.shape == (2, 16, 16, 3)
    err = np.abs(actual - expected).max()
    print(f"max pixel error vs diffusers ({guidance=}, {noise_level=}): {err:.2e}")
    assert err < 1e-3


def test_both_readings_start_from_pure_noise_at_beta_one():
    sched = PNDMScheduler.from_config(UNCLIP_PNDM)
    state = sched.init_state(20, LATENT)
    z_v, _, noise, _ = _inputs()
    for reading in beta_start.READINGS:
        first = beta_start.start_index(1.0, reading, 20)
        assert first == 0
        np.testing.assert_array_equal(beta_start.start_latents(z_v, noise, 1.0, reading, sched, state.timesteps, 0),
                                      noise)


def test_linear_mix_is_the_papers_start():
    sched = PNDMScheduler.from_config(UNCLIP_PNDM)
    z_v, _, noise, _ = _inputs()
    start = beta_start.start_latents(z_v, noise, 0.93, "linear_mix", sched, sched.set_timesteps(20), 0)
    np.testing.assert_allclose(start, 0.07 * z_v + 0.93 * noise, rtol=1e-6, atol=1e-6)
    assert beta_start.start_index(0.6, "linear_mix", 20) == 0


@pytest.mark.parametrize("beta", [0.93, 0.6, 0.75])
def test_img2img_start_equals_diffusers_img2img(beta):
    reference = diffusers.PNDMScheduler(**{k: v for k, v in UNCLIP_PNDM.items() if k != "_class_name"})
    reference.set_timesteps(20)
    holder = types.SimpleNamespace(scheduler=reference)
    timesteps, remaining = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(holder, 20, beta, "cpu")
    z_v, _, noise, _ = _inputs()
    expected = reference.add_noise(torch.from_numpy(z_v), torch.from_numpy(noise), timesteps[:1].repeat(2)).numpy()

    sched = PNDMScheduler.from_config(UNCLIP_PNDM)
    first = beta_start.start_index(beta, "img2img", 20)
    all_timesteps = sched.set_timesteps(20)
    np.testing.assert_array_equal(np.asarray(all_timesteps[first:]), timesteps.numpy())
    assert remaining == 20 - first
    start = beta_start.start_latents(z_v, noise, beta, "img2img", sched, all_timesteps, first)
    np.testing.assert_allclose(start, expected, rtol=1e-5, atol=1e-6)


def test_start_below_one_keeps_the_predicted_latent(ours):
    z_v, image_embeds, latent_noise, embedding_noise = _inputs()
    sampler = UnCLIPSampler(ours)
    images = {reading: np.asarray(sampler(z_v, image_embeds, latent_noise, embedding_noise,
                                          config=SamplingConfig(num_inference_steps=4, guidance_scale=1.0, beta=b,
                                                                beta_start=reading)))
              for reading, b in (("linear_mix", 1.0), ("img2img", 0.5), ("linear_mix", 0.5))}
    assert all(np.isfinite(v).all() and v.shape == (2, 16, 16, 3) for v in images.values())
    assert np.abs(images["linear_mix"] - images["img2img"]).max() > 1e-3


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="beta=1.5"):
        SamplingConfig(beta=1.5)
    with pytest.raises(ValueError, match="beta_start='mix'"):
        SamplingConfig(beta_start="mix")
    with pytest.raises(ValueError, match="no denoising step"):
        SamplingConfig(beta=0.01, beta_start="img2img", num_inference_steps=20)
    with pytest.raises(ValueError, match="noise_level=1000"):
        SamplingConfig(noise_level=1000)


def test_sharded_sampling_equals_unsharded(reference):
    mesh = sharding.make_mesh((2, 2, 2))
    sharded = StableUnCLIP.from_pretrained(reference[1], mesh=mesh)
    single = StableUnCLIP.from_pretrained(reference[1])
    z_v, image_embeds, latent_noise, embedding_noise = _inputs(batch=4)
    config = SamplingConfig(num_inference_steps=3, guidance_scale=3.0)
    expected = UnCLIPSampler(single)(z_v, image_embeds, latent_noise, embedding_noise, config=config)
    actual = UnCLIPSampler(sharded, mesh)(z_v, image_embeds, latent_noise, embedding_noise, config=config)
    assert actual.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=1e-5)


def test_tiny_random_unclip_is_a_diffusers_pipeline_folder(tmp_path):
    """Our tiny random unCLIP loads in diffusers, samples as diffusers does, and holds the in-silico
    targets' own VAE and CLIP image encoder."""
    from nvl_jax.data import targets
    from nvl_jax.models.vae.params import KEY_MAP as VAE_KEY_MAP
    from nvl_jax.reconstruction.export import VAE_RENAMES

    folder = tiny_random.save_tiny_random_unclip(tmp_path / "tiny", seed=3, image_size=32)
    pipe = diffusers.StableUnCLIPImg2ImgPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    ours = StableUnCLIP.from_pretrained(folder)
    _, target_vae = targets.tiny_random_models(3)
    saved = checkpoint_tensors(ours.vae, VAE_KEY_MAP, VAE_RENAMES)
    for key, value in checkpoint_tensors(target_vae, VAE_KEY_MAP, VAE_RENAMES).items():
        np.testing.assert_array_equal(saved[key], value)

    rng = np.random.default_rng(1)
    latent_noise = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    image_embeds, embedding_noise = rng.standard_normal((2, 1, 768)).astype(np.float32)
    expected = _diffusers_images(pipe, image_embeds, latent_noise, embedding_noise, ["the cat"], steps=3,
                                 guidance=4.0, noise_level=10)
    actual = UnCLIPSampler(ours)(latent_noise, image_embeds, latent_noise, embedding_noise, ours.tokenize(["the cat"]),
                                 config=SamplingConfig(num_inference_steps=3, guidance_scale=4.0, noise_level=10,
                                                       beta=1.0))
    assert np.abs(np.asarray(actual) - expected).max() < 1e-3


def test_bench_reports_both_speedups():
    """The benchmark at toy sizes (a smoke test: nothing here is timed)."""
    from nvl_jax.bench import unclip as bench

    report = bench.run(bench.parse_args(["--channels", "32", "64", "--heads", "2", "4", "--text_width", "32",
                                         "--embed_dim", "16", "--latent_size", "8", "--steps", "2", "--repeats", "1"]))
    assert report["unet_speedup_vs_torch"] > 0 and report["pipeline_speedup_vs_torch"] > 0
    assert report["pipeline_max_pixel_diff"] < 1e-3
