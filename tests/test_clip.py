"""CLIP towers against transformers' CLIPVisionModelWithProjection / CLIPTextModelWithProjection;
gradients with and without the shared layers' hand-written backward passes."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from nvl_jax import sharding
from nvl_jax.models import clip, layers
from nvl_jax.models.clip import params as clip_params

VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, projection_dim=16)
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, projection_dim=16, bos_token_id=0, pad_token_id=1)
EOS = 50
TOLERANCE = 1e-4

vision_forward = nnx.jit(lambda model, pixels: model(pixels, output_hidden_states=True))
text_forward = nnx.jit(lambda model, ids, mask: model(ids, mask, output_hidden_states=True))


def _close(ours, theirs, what):
    theirs = theirs.detach().numpy()
    assert ours.shape == theirs.shape, what
    err = float(np.abs(np.asarray(ours) - theirs).max())
    assert err <= TOLERANCE, f"{what}: max abs error {err}"


def _pixels(batch, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 32, 32, 3), dtype=np.float32)


def _tokens(batch, length, eos, seed=0):
    """Random tokens, one end-of-text token per row at a varying place, then
    end-of-text padding (as CLIP's tokenizer pads) masked out."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 99, (batch, length))
    ids[ids == eos] = eos + 1
    ends = rng.integers(1, length, batch)
    after = np.arange(length)[None, :] >= ends[:, None]
    ids[after] = eos
    return ids.astype(np.int32), (~after | (np.arange(length)[None, :] == ends[:, None])).astype(np.int32)


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def vision(request, tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_act=request.param, **VISION)
    reference = transformers.CLIPVisionModelWithProjection(config).eval()
    folder = tmp_path_factory.mktemp(f"clip_vision_{request.param}")
    reference.save_pretrained(folder)
    return reference, clip.CLIPVisionModel.from_pretrained(folder), folder


# Both activations with the current end-of-text rule, and the legacy id-2 rule.
@pytest.fixture(scope="module", params=[("quick_gelu", EOS), ("gelu", EOS), ("quick_gelu", 2)],
                ids=["quick_gelu", "gelu", "legacy_eos"])
def text(request, tmp_path_factory):
    act, eos = request.param
    torch.manual_seed(1)
    config = transformers.CLIPTextConfig(hidden_act=act, eos_token_id=eos, **TEXT)
    reference = transformers.CLIPTextModelWithProjection(config).eval()
    folder = tmp_path_factory.mktemp(f"clip_text_{act}_{eos}")
    reference.save_pretrained(folder)
    return reference, clip.CLIPTextModel.from_pretrained(folder), folder


@pytest.mark.parametrize("batch", [1, 3])
def test_vision_matches_transformers(vision, batch):
    reference, model, _ = vision
    pixels = _pixels(batch)
    ours = vision_forward(model, pixels)
    with torch.no_grad():
        theirs = reference(torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
        pooled = reference.vision_model(torch.from_numpy(pixels).permute(0, 3, 1, 2)).pooler_output
    _close(ours.image_embeds, theirs.image_embeds, "image_embeds")
    _close(ours.last_hidden_state, theirs.last_hidden_state, "last_hidden_state")
    _close(ours.pooled_output, pooled, "pooled_output")
    assert len(ours.hidden_states) == len(theirs.hidden_states) == VISION["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        _close(a, b, f"hidden_states[{i}]")


@pytest.fixture(params=["on", "off"])
def custom_backward(request):
    previous = layers.set_custom_backward(request.param)
    yield request.param
    layers.set_custom_backward(previous)


@nnx.jit
def vision_value_and_grad(model, pixels, cotangent):
    def loss(model, pixels):
        return jnp.sum(model(pixels).image_embeds * cotangent)
    return nnx.value_and_grad(loss, argnums=(0, 1))(model, pixels)


def test_vision_gradients_match_transformers(vision, custom_backward):
    """Gradients of a random projection of image_embeds, for every weight (mapped through the
    checkpoint key table) and for the pixels."""
    reference, model, _ = vision
    pixels = _pixels(2, seed=5)
    cotangent = np.random.default_rng(6).standard_normal((2, VISION["projection_dim"])).astype(np.float32)
    loss, (grads, pixel_grad) = vision_value_and_grad(model, pixels, cotangent)
    torch_pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).requires_grad_()
    reference.zero_grad()
    theirs = (reference(torch_pixels).image_embeds * torch.from_numpy(cotangent)).sum()
    theirs.backward()
    np.testing.assert_allclose(float(loss), theirs.item(), atol=TOLERANCE)
    _close(pixel_grad, torch_pixels.grad.permute(0, 2, 3, 1), "d pixels")
    ours = {".".join(map(str, path)): np.asarray(g[...]) for path, g in nnx.to_flat_state(grads)}
    for name, param in reference.named_parameters():
        path, transform = clip_params.VISION_KEY_MAP.target(name)
        expected = param.grad.numpy()
        np.testing.assert_allclose(ours.pop(path), transform(expected) if transform else expected,
                                   atol=TOLERANCE, rtol=1e-4, err_msg=name)
    assert not ours, f"gradients without a transformers parameter: {sorted(ours)}"


@pytest.mark.parametrize("batch,length,masked", [(2, 7, False), (3, 16, True)])
def test_text_matches_transformers(text, batch, length, masked):
    reference, model, _ = text
    eos = model.config.eos_token_id
    ids, mask = _tokens(batch, length, eos, seed=length)
    # The input tells the two pooling rules apart, so the test sees which one runs.
    assert (np.argmax(ids, -1) != np.argmax(ids == eos, -1)).any()
    mask = mask if masked else None
    ours = text_forward(model, ids, mask)
    torch_mask = None if mask is None else torch.from_numpy(mask)
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids), attention_mask=torch_mask, output_hidden_states=True)
        pooled = reference.text_model(torch.from_numpy(ids), attention_mask=torch_mask).pooler_output
    _close(ours.text_embeds, theirs.text_embeds, "text_embeds")
    _close(ours.last_hidden_state, theirs.last_hidden_state, "last_hidden_state")
    _close(ours.pooled_output, pooled, "pooled_output")
    assert len(ours.hidden_states) == len(theirs.hidden_states) == TEXT["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        _close(a, b, f"hidden_states[{i}]")


def test_eos_positions_follow_both_rules():
    ids = np.array([[0, 7, 9, 2, 5, 3], [0, 2, 9, 9, 5, 2]])
    np.testing.assert_array_equal(clip.eos_positions(ids, 2), [2, 2])  # legacy: largest id
    np.testing.assert_array_equal(clip.eos_positions(ids, 5), [4, 4])  # first end-of-text


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory):
    """The published layout: both towers, both projections and logit_scale in one file."""
    torch.manual_seed(2)
    config = transformers.CLIPConfig(text_config=dict(TEXT, eos_token_id=EOS), vision_config=VISION,
                                     projection_dim=24)
    reference = transformers.CLIPModel(config).eval()
    folder = tmp_path_factory.mktemp("clip_full")
    reference.save_pretrained(folder)
    return reference, folder


def test_towers_load_from_full_clip_checkpoint(full_checkpoint):
    reference, folder = full_checkpoint
    vision = clip.CLIPVisionModel.from_pretrained(folder)
    text = clip.CLIPTextModel.from_pretrained(folder)
    # The top-level projection_dim wins over the towers' own.
    assert vision.config.projection_dim == text.config.projection_dim == 24
    pixels = _pixels(2, seed=3)
    ids, mask = _tokens(2, 9, EOS, seed=3)
    with torch.no_grad():
        image_embeds = reference.get_image_features(
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).pooler_output
        text_embeds = reference.get_text_features(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).pooler_output
    _close(vision_forward(vision, pixels).image_embeds, image_embeds, "image_embeds")
    _close(text_forward(text, ids, mask).text_embeds, text_embeds, "text_embeds")


def test_configs_read_transformers_defaults_as_vit_b_32():
    full = transformers.CLIPConfig().to_dict()
    assert clip.CLIPVisionConfig.from_hf_config(full) == clip.CLIPVisionConfig.vit_b_32()
    assert clip.CLIPTextConfig.from_hf_config(full) == clip.CLIPTextConfig.vit_b_32()
    tower = transformers.CLIPVisionConfig(**dataclasses.asdict(clip.CLIPVisionConfig.vit_l_14())).to_dict()
    assert clip.CLIPVisionConfig.from_hf_config(tower) == clip.CLIPVisionConfig.vit_l_14()
    # Old full configs carry *_config_dict overrides, which transformers applies.
    legacy = dict(full, vision_config_dict={"hidden_size": 1024, "num_attention_heads": 16})
    assert clip.CLIPVisionConfig.from_hf_config(legacy).hidden_size == 1024
    with pytest.raises(ValueError, match="clip_text_model"):
        clip.CLIPTextConfig.from_hf_config(tower)


def test_random_init_in_bfloat16():
    """The plain constructors build random towers that store and compute in the given dtype."""
    vision = clip.CLIPVisionModel(clip.CLIPVisionConfig(**VISION), dtype=jnp.bfloat16)
    text = clip.CLIPTextModel(clip.CLIPTextConfig(eos_token_id=EOS, **{k: v for k, v in TEXT.items()
                                                                       if not k.endswith("token_id")}),
                              dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    assert vision.layers[1].mlp.fc2.kernel[...].dtype == jnp.bfloat16
    image_embeds = vision_forward(vision, _pixels(2)).image_embeds
    text_embeds = text_forward(text, *_tokens(2, 7, EOS)).text_embeds
    for embeds in (image_embeds, text_embeds):
        assert embeds.shape == (2, 16) and embeds.dtype == jnp.bfloat16
        assert np.isfinite(np.asarray(embeds, np.float32)).all()


def test_vision_rejects_other_image_sizes(vision):
    with pytest.raises(ValueError, match=r"takes \[batch, 32, 32, 3\] images"):
        vision[1](np.zeros((1, 64, 64, 3), np.float32))


def test_tokenizer_from_checkpoint_folder(tmp_path):
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges = ["p h", "ph o", "pho t", "phot o</w>", "c a", "ca t</w>", "o f</w>"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*letters, *(c + "</w>" for c in letters), *("".join(m.split()) for m in merges)]:
        vocab[token] = len(vocab)
    source = tmp_path / "source"
    source.mkdir()
    (source / "vocab.json").write_text(json.dumps(vocab))
    (source / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    transformers.CLIPTokenizer.from_pretrained(source).save_pretrained(tmp_path / "model" / "tokenizer")

    tokenizer = clip.load_tokenizer(tmp_path / "model", subfolder="tokenizer")
    ids, mask = clip.tokenize(tokenizer, ["a photo of a cat", "cat"], max_length=10)
    assert ids.dtype == mask.dtype == np.int32
    words = [vocab[w] for w in ("a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>")]
    np.testing.assert_array_equal(ids, [[0, *words, 1, 1, 1, 1], [0, vocab["cat</w>"], *[1] * 8]])
    np.testing.assert_array_equal(mask, [[1] * 7 + [0] * 3, [1] * 3 + [0] * 7])
    np.testing.assert_array_equal(clip.eos_positions(ids, 1), [6, 2])

    long_ids, long_mask = clip.tokenize(tokenizer, "a photo of a cat " * 4, max_length=8)
    assert long_ids.shape == (1, 8) and long_ids[0, -1] == 1 and long_mask.all()


def test_mesh_forward_matches_unsharded(full_checkpoint):
    _, folder = full_checkpoint
    mesh = sharding.make_mesh((2, 2, 2))
    batch = 4  # split over data x fsdp

    sharded = clip.CLIPVisionModel.from_pretrained(folder, mesh=mesh)
    assert sharded.layers[0].mlp.fc1.kernel[...].sharding.spec == P("fsdp", "tensor")
    pixels = _pixels(batch, seed=4)
    ours = vision_forward(sharded, jax.device_put(pixels, sharding.batch_sharding(mesh, 4)))
    plain = vision_forward(clip.CLIPVisionModel.from_pretrained(folder), pixels)
    np.testing.assert_allclose(ours.image_embeds, plain.image_embeds, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours.last_hidden_state, plain.last_hidden_state, atol=1e-5, rtol=0)

    sharded = clip.CLIPTextModel.from_pretrained(folder, mesh=mesh)
    assert sharded.layers[0].self_attn.out_proj.kernel[...].sharding.spec == P("tensor", "fsdp")
    ids, mask = _tokens(batch, 9, EOS, seed=4)
    ours = text_forward(sharded, jax.device_put(ids, sharding.batch_sharding(mesh, 2)),
                        jax.device_put(mask, sharding.batch_sharding(mesh, 2)))
    plain = text_forward(clip.CLIPTextModel.from_pretrained(folder), ids, mask)
    np.testing.assert_allclose(ours.text_embeds, plain.text_embeds, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours.last_hidden_state, plain.last_hidden_state, atol=1e-5, rtol=0)
