"""nvl_jax's AutoencoderKL against diffusers' on a tiny random VAE saved with ``save_pretrained``."""

import dataclasses
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from nvl_jax import sharding
from nvl_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

TINY = dict(
    block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
    norm_num_groups=8, sample_size=32)
WEIGHTS = "diffusion_pytorch_model.safetensors"
# (batch, height, width): a square and a non-square image.
SHAPES = [(2, 32, 32), (1, 48, 32)]
TOL = 1e-4

# The config.json of stabilityai/sd-vae-ft-mse, which leaves scaling_factor to diffusers' default.
SD_VAE_FT_MSE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.4.2", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 256, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**TINY).eval()
    # diffusers starts every norm at scale 1, bias 0; random values make a
    # swapped or dropped norm mapping show in the outputs.
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.add_(0.2 * torch.randn_like(module.weight))
                module.bias.add_(0.2 * torch.randn_like(module.bias))
    return vae


@pytest.fixture(scope="module")
def pipeline_dir(reference, tmp_path_factory):
    """A pipeline-layout folder: the VAE is its ``vae/`` subfolder."""
    root = tmp_path_factory.mktemp("pipeline")
    reference.save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def model(pipeline_dir):
    return AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae")


def _images(batch, height, width, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, height, width, 3)).astype(np.float32)


def _to_torch(x):
    """NHWC numpy -> NCHW torch."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _to_numpy(t):
    """NCHW torch -> NHWC numpy."""
    return t.detach().permute(0, 2, 3, 1).numpy()


def _max_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@nnx.jit
def _encode(model, x):
    return model.encode(x)


@nnx.jit
def _decode(model, z):
    return model.decode(z)


@nnx.jit
def _reconstruct(model, x, key=None):
    return model(x, key)


@pytest.mark.parametrize("shape", SHAPES)
def test_encode_matches_diffusers(model, reference, shape):
    x = _images(*shape)
    with torch.no_grad():
        posterior = reference.encode(_to_torch(x)).latent_dist
    ours = _encode(model, jnp.asarray(x))
    batch, height, width = shape
    assert ours.mean.shape == (batch, height // 2, width // 2, 4)
    assert _max_err(ours.mean, _to_numpy(posterior.mean)) < TOL
    assert _max_err(ours.logvar, _to_numpy(posterior.logvar)) < TOL
    assert _max_err(ours.std, _to_numpy(posterior.std)) < TOL


@pytest.mark.parametrize("shape", SHAPES)
def test_decode_matches_diffusers(model, reference, shape):
    batch, height, width = shape
    z = np.random.default_rng(1).standard_normal((batch, height // 2, width // 2, 4)).astype(np.float32)
    with torch.no_grad():
        expected = _to_numpy(reference.decode(_to_torch(z)).sample)
    image = _decode(model, jnp.asarray(z))
    assert image.shape == (batch, height, width, 3)
    assert _max_err(image, expected) < TOL


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_diffusers(model, reference, shape):
    x = _images(*shape, seed=2)
    with torch.no_grad():
        expected = _to_numpy(reference(_to_torch(x)).sample)
    assert _max_err(_reconstruct(model, jnp.asarray(x)), expected) < TOL


def test_plain_folder_loads_and_pipeline_root_needs_subfolder(pipeline_dir, reference):
    x = _images(*SHAPES[0], seed=3)
    with torch.no_grad():
        expected = _to_numpy(reference(_to_torch(x)).sample)
    plain = AutoencoderKL.from_pretrained(pipeline_dir / "vae")
    assert _max_err(_reconstruct(plain, jnp.asarray(x)), expected) < TOL
    with pytest.raises(FileNotFoundError, match="config.json"):
        AutoencoderKL.from_pretrained(pipeline_dir)


LEGACY_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


@pytest.mark.parametrize("as_conv1x1", [False, True], ids=["linear", "conv1x1"])
def test_legacy_attention_names_load(pipeline_dir, reference, tmp_path, as_conv1x1):
    folder = tmp_path / "vae"
    shutil.copytree(pipeline_dir / "vae", folder)
    tensors = {}
    for key, value in load_file(folder / WEIGHTS).items():
        for current, legacy in LEGACY_NAMES.items():
            key = key.replace(f".attentions.0.{current}.", f".attentions.0.{legacy}.")
        if as_conv1x1 and ".attentions.0." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        tensors[key] = value
    assert "encoder.mid_block.attentions.0.query.weight" in tensors
    assert not any(".to_q." in key for key in tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})

    x = _images(*SHAPES[1], seed=4)
    with torch.no_grad():
        expected = _to_numpy(reference(_to_torch(x)).sample)
    legacy = AutoencoderKL.from_pretrained(folder)
    assert _max_err(_reconstruct(legacy, jnp.asarray(x)), expected) < TOL


def test_scale_latents_matches_scaling_factor_and_inverts(model, reference):
    z = jnp.asarray(np.random.default_rng(5).standard_normal((2, 4, 4, 4)).astype(np.float32))
    scale = reference.config.scaling_factor
    assert scale == model.config.scaling_factor == 0.18215
    np.testing.assert_allclose(model.scale_latents(z), np.asarray(z) * scale, rtol=1e-6)
    np.testing.assert_allclose(model.unscale_latents(model.scale_latents(z)), z, rtol=1e-6, atol=1e-6)

    # A shifted latent space (the SD3 VAE's constants): scaled = (z - shift) * scale.
    shifted = dataclasses.replace(model.config, scaling_factor=1.5305, shift_factor=0.0609)
    # Scaling reads only the config, so an abstract model will do.
    vae = nnx.eval_shape(lambda: AutoencoderKL(shifted))
    np.testing.assert_allclose(vae.scale_latents(z), (np.asarray(z) - 0.0609) * 1.5305, rtol=1e-6)
    np.testing.assert_allclose(vae.unscale_latents(vae.scale_latents(z)), z, rtol=1e-6, atol=1e-6)


def test_sample_draws_from_the_posterior(model, reference):
    x = jnp.asarray(_images(*SHAPES[0], seed=6))
    posterior = _encode(model, x)
    keys = jax.random.split(jax.random.key(0), 512)
    samples = jax.vmap(posterior.sample)(keys)
    assert samples.shape == (512, *posterior.mean.shape)
    # 512 draws: the sample mean is within 5 standard errors of the mean.
    assert np.all(np.abs(samples.mean(0) - posterior.mean) < 5 * posterior.std / np.sqrt(512))
    np.testing.assert_allclose(samples.std(0), posterior.std, rtol=0.25)
    np.testing.assert_array_equal(posterior.sample(keys[0]), samples[0])
    assert posterior.mode() is posterior.mean

    # model(x, key) decodes that draw, as diffusers decodes the same latents.
    z = posterior.sample(keys[1])
    with torch.no_grad():
        expected = _to_numpy(reference.decode(_to_torch(z)).sample)
    assert _max_err(_reconstruct(model, x, keys[1]), expected) < TOL


def test_sharded_forward_matches_unsharded(pipeline_dir, model):
    mesh = sharding.make_mesh((2, 2, 2))
    sharded = AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae", mesh=mesh)
    kernel = sharded.decoder.mid_block.attention.to_q.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # The batch is split over data x fsdp = 4 devices.
    x = _images(4, 32, 32, seed=7)
    x_sharded = jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
    out = _reconstruct(sharded, x_sharded)
    assert out.sharding.is_equivalent_to(x_sharded.sharding, out.ndim)
    assert _max_err(out, _reconstruct(model, jnp.asarray(x))) < 1e-5


def test_config_reads_diffusers_configs(reference):
    assert AutoencoderKLConfig.from_hf_config(SD_VAE_FT_MSE_CONFIG) == AutoencoderKLConfig.sd_vae_ft_mse()
    unclip = dict(SD_VAE_FT_MSE_CONFIG, sample_size=768, scaling_factor=0.18215, force_upcast=True)
    assert AutoencoderKLConfig.from_hf_config(unclip) == AutoencoderKLConfig.stable_unclip_vae()
    preset = AutoencoderKLConfig.stable_unclip_vae()
    assert (preset.block_out_channels, preset.layers_per_block, preset.latent_channels) == ((128, 256, 512, 512), 2, 4)
    assert (preset.norm_num_groups, preset.scaling_factor, preset.shift_factor, preset.act_fn) == (
        32, 0.18215, None, "silu")
    assert preset.downscale_factor == 8

    tiny = AutoencoderKLConfig.from_hf_config(dict(reference.config))
    assert (tiny.block_out_channels, tiny.norm_num_groups, tiny.layers_per_block) == ((16, 32), 8, 1)

    attn_blocks = dict(SD_VAE_FT_MSE_CONFIG, down_block_types=["AttnDownEncoderBlock2D"] * 4)
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        AutoencoderKLConfig.from_hf_config(attn_blocks)
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        AutoencoderKLConfig.from_hf_config(dict(SD_VAE_FT_MSE_CONFIG, _class_name="UNet2DConditionModel"))
