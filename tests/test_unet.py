"""nvl_jax's UNet2DConditionModel against diffusers' on tiny random UNets saved with ``save_pretrained``."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from nvl_jax import sharding
from nvl_jax.models import hf_loader
from nvl_jax.models.unet import UNet2DConditionModel, UNetConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"
TOL = 1e-4

# SD 2.x / unCLIP-like: two cross-attention levels over a plain one, linear projections,
# heads per block, upcast attention, and a class-label projection added to the time embedding.
UNCLIP_LIKE = dict(
    block_out_channels=(32, 64, 64), layers_per_block=[1, 2, 1],
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8, cross_attention_dim=32, attention_head_dim=[2, 4, 8], use_linear_projection=True,
    upcast_attention=True, class_embed_type="projection", projection_class_embeddings_input_dim=24,
    sample_size=16)
# SD 1.x-like: 1x1-conv projections, one head count for all blocks, two transformer layers,
# unflipped sinusoids with a frequency shift, the LDM's asymmetric downsampling pad, no class labels.
SD1_LIKE = dict(
    block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4, use_linear_projection=False,
    transformer_layers_per_block=2, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
    mid_block_scale_factor=1.5, sample_size=16)
CONFIGS = {"unclip_like": UNCLIP_LIKE, "sd1_like": SD1_LIKE}

# The unet/config.json of stabilityai/stable-diffusion-2-1-unclip-small as diffusers writes it
# (written from the original v2-1-stable-unclip-l-inference.yaml; not checked against a download).
STABLE_UNCLIP_SMALL_CONFIG = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": None,
    "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "class_embed_type": "projection", "class_embeddings_concat": False,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 1024, "cross_attention_norm": None,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": 1536, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 96, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
    "timestep_post_act": None, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                                  "CrossAttnUpBlock2D"],
    "upcast_attention": True, "use_linear_projection": True,
}


def _reference(config: dict, seed: int = 0) -> diffusers.UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**config).eval()
    # diffusers starts every norm at scale 1, bias 0; random values make a
    # swapped or dropped norm mapping show in the outputs.
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                module.weight.add_(0.2 * torch.randn_like(module.weight))
                module.bias.add_(0.2 * torch.randn_like(module.bias))
    return unet


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """name -> (name, diffusers reference, pipeline-layout folder whose ``unet/`` holds it, our loaded model),
    each built once per module."""
    built = {}

    def get(name):
        if name not in built:
            reference = _reference(CONFIGS[name])
            root = tmp_path_factory.mktemp(name)
            reference.save_pretrained(root / "unet")
            built[name] = name, reference, root, UNet2DConditionModel.from_pretrained(root, subfolder="unet")
        return built[name]

    return get


@pytest.fixture(params=list(CONFIGS))
def pair(request, build):
    return build(request.param)


def _inputs(config: dict, batch: int, height: int, width: int, seed: int = 0, float_timesteps: bool = False):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, height, width, 4)).astype(np.float32)
    timesteps = rng.uniform(0, 1000, batch).astype(np.float32) if float_timesteps else rng.integers(0, 1000, batch)
    context = rng.standard_normal((batch, 7, config["cross_attention_dim"])).astype(np.float32)
    labels = None
    if config.get("class_embed_type") == "projection":
        labels = rng.standard_normal((batch, config["projection_class_embeddings_input_dim"])).astype(np.float32)
    return sample, timesteps, context, labels


def _expected(reference, sample, timesteps, context, labels):
    with torch.no_grad():
        out = reference(torch.from_numpy(np.ascontiguousarray(sample.transpose(0, 3, 1, 2))),
                        torch.as_tensor(timesteps), torch.from_numpy(context),
                        class_labels=None if labels is None else torch.from_numpy(labels)).sample
    return out.permute(0, 2, 3, 1).numpy()


@nnx.jit
def _forward(model, sample, timesteps, context, labels):
    return model(sample, timesteps, context, labels).sample


def _max_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


# (batch, height, width, float timesteps): a square latent with integer timesteps, and one whose
# sides are not multiples of the total downsampling, so the upsamplers resize to the skips' sizes
# (diffusers' upsample_size). The first is also the sharded test's input (one compile for both).
SHAPES = [(4, 16, 16, False), (1, 12, 10, True)]


@pytest.mark.parametrize("shape", SHAPES, ids=["square", "odd"])
def test_forward_matches_diffusers(pair, shape):
    name, reference, _, model = pair
    sample, timesteps, context, labels = _inputs(CONFIGS[name], *shape)
    expected = _expected(reference, sample, timesteps, context, labels)
    out = _forward(model, jnp.asarray(sample), jnp.asarray(timesteps), jnp.asarray(context),
                   None if labels is None else jnp.asarray(labels))
    assert out.shape == (*shape[:3], 4)
    assert np.abs(expected).max() > 0.1
    assert _max_err(out, expected) < TOL


def test_scalar_timestep_broadcasts(pair):
    name, reference, _, model = pair
    _, _, _, labels = _inputs(CONFIGS[name], 2, 8, 8, seed=1)
    emb = model.embed_conditions(417.5, 2, labels)
    assert emb.shape == (2, 4 * CONFIGS[name]["block_out_channels"][0])
    np.testing.assert_array_equal(emb, model.embed_conditions(jnp.full((2,), 417.5), 2, labels))
    with pytest.raises(ValueError, match=r"timesteps must be a scalar or \[batch=2\], got shape \[3\]"):
        model.embed_conditions(jnp.zeros(3), 2, labels)


def test_class_labels_are_checked(pair):
    name, _, _, model = pair
    sample, timesteps, context, labels = _inputs(CONFIGS[name], 1, 8, 8)
    if labels is None:
        with pytest.raises(ValueError, match="class_embed_type=None"):
            model(sample, timesteps, context, np.zeros((1, 24), np.float32))
    else:
        with pytest.raises(ValueError, match=r"class_labels of shape \[1, 24\], got None"):
            model(sample, timesteps, context)
        with pytest.raises(ValueError, match=r"got \[1, 23\]"):
            model(sample, timesteps, context, labels[:, :23])


def test_config_reads_diffusers_configs(pair):
    name, reference, _, _ = pair
    config = UNetConfig.from_hf_config(dict(reference.config))
    assert config.num_attention_heads == ((2, 4, 8) if name == "unclip_like" else (4, 4))
    assert config.use_linear_projection == (name == "unclip_like")

    preset = UNetConfig.stable_unclip_small()
    assert UNetConfig.from_hf_config(STABLE_UNCLIP_SMALL_CONFIG) == preset
    assert preset.num_attention_heads == (5, 10, 20, 20)
    assert preset.layers_per_block == (2, 2, 2, 2) and preset.cross_attention_dim == (1024,) * 4
    assert (preset.time_embed_dim, preset.projection_class_embeddings_input_dim) == (1280, 1536)
    # Every head of the real model is 64 wide.
    assert {c // h for c, h in zip(preset.block_out_channels, preset.num_attention_heads)} == {64}


@pytest.mark.parametrize("field, value", [
    ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "text_time"),
    ("num_attention_heads", 8),
    ("resnet_time_scale_shift", "scale_shift"),
    ("only_cross_attention", [True, False]),
])
def test_config_rejects_unsupported_options(field, value):
    config = dict(STABLE_UNCLIP_SMALL_CONFIG, block_out_channels=[32, 64], attention_head_dim=4,
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
    with pytest.raises(ValueError, match=field):
        UNetConfig.from_hf_config(dict(config, **{field: value}))


def test_strict_loading_names_extra_and_missing_keys(tmp_path):
    reference = _reference(SD1_LIKE)
    reference.save_pretrained(tmp_path / "good")
    tensors = load_file(tmp_path / "good" / WEIGHTS)
    config_json = (tmp_path / "good" / "config.json").read_text()

    def saved(name, changed):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(config_json)
        save_file(changed, folder / WEIGHTS, metadata={"format": "pt"})
        return folder

    extra = saved("extra", dict(tensors, **{"mid_block.attentions.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(hf_loader.CheckpointMismatchError, match=r"unused checkpoint keys(.|\n)*extra\.weight"):
        UNet2DConditionModel.from_pretrained(extra)
    dropped = "down_blocks.0.attentions.0.transformer_blocks.1.attn2.to_k.weight"
    missing = saved("missing", {k: v for k, v in tensors.items() if k != dropped})
    with pytest.raises(hf_loader.CheckpointMismatchError,
                       match=r"missing(.|\n)*down_blocks\.0\.attentions\.0\.transformer_blocks\.1\.attn2\.to_k\.kernel"):
        UNet2DConditionModel.from_pretrained(missing)


def test_sharded_forward_matches_unsharded(build):
    name, _, root, model = build("unclip_like")
    mesh = sharding.make_mesh((2, 2, 2))
    sharded = UNet2DConditionModel.from_pretrained(root, subfolder="unet", mesh=mesh)
    kernel = sharded.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # The batch is split over data x fsdp = 4 devices.
    inputs = _inputs(CONFIGS[name], *SHAPES[0])
    placed = [jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)) for x in inputs]
    out = _forward(sharded, *placed)
    assert out.sharding.spec[0] == ("data", "fsdp")
    expected = _forward(model, *[None if x is None else jnp.asarray(x) for x in inputs])
    assert _max_err(out, expected) < 1e-5
