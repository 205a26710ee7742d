"""The reconstruction metrics' protocol against direct references: the resizes against
``torch.nn.functional.interpolate`` (what torchvision's ``Resize`` calls on tensors), SSIM and the
grayscale conversion against scikit-image, and the two-way identification, PixCorr and correlation
distance against MindEye's NumPy / SciPy arithmetic written out literally."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.spatial.distance
import torch
import torch.nn.functional as F
from flax import nnx

from nvl_jax.evaluation import reconstruction
from nvl_jax.models.alexnet import AlexNet
from nvl_jax.models.clip import CLIPVisionConfig, CLIPVisionModel
from nvl_jax.models.efficientnet import EfficientNet, EfficientNetConfig
from nvl_jax.models.resnet import ResNet, ResNetConfig

skimage_color = pytest.importorskip("skimage.color")
skimage_metrics = pytest.importorskip("skimage.metrics")


def torch_resize(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision < 0.17's tensor ``Resize``: bilinear, no antialiasing. ``[N, H, W, C]`` in and out."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    y = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return y.permute(0, 2, 3, 1).numpy()


def mindeye_two_way(real: np.ndarray, pred: np.ndarray) -> float:
    """MindEye's ``two_way_identification``, verbatim in NumPy."""
    r = np.corrcoef(real, pred)[:len(real), len(real):]
    success = r < np.diag(r)
    return np.mean(np.sum(success, 0)) / (len(real) - 1)


def photos(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth random uint8 images ``[n, height, width, 3]`` (structure at several scales, like photos)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, size=(n, height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
    smooth = torch_resize(coarse, height, width)
    noisy = smooth + 0.1 * rng.normal(size=smooth.shape)
    return (np.clip(noisy, 0, 1) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("in_size,out_size", [((40, 40), (24, 24)), ((20, 30), (45, 37)), ((256, 256), (224, 224)),
                                               ((256, 256), (425, 425))])
def test_resize_matches_torch_interpolate(in_size, out_size):
    images = np.random.default_rng(0).uniform(size=(2, *in_size, 3)).astype(np.float32)
    ours = reconstruction.resize(jnp.asarray(images), *out_size)
    np.testing.assert_allclose(np.asarray(ours), torch_resize(images, *out_size), atol=5e-7)


def test_torchvision_resize_scales_the_short_side():
    images = np.random.default_rng(0).uniform(size=(1, 30, 50, 3)).astype(np.float32)
    ours = reconstruction.torchvision_resize(jnp.asarray(images), 20)
    np.testing.assert_allclose(np.asarray(ours), torch_resize(images, 20, 33), atol=5e-7)


def test_pixel_correlation_matches_numpy():
    a, b = np.random.default_rng(0).normal(size=(2, 3, 9, 7, 3)).astype(np.float32)
    b = a + b
    expected = [np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1] for i in range(3)]
    np.testing.assert_allclose(np.asarray(reconstruction.pixel_correlation(a, b)), expected, atol=1e-6)


def test_gray_and_ssim_match_scikit_image():
    rgb = photos(2, 48, 41).astype(np.float32) / 255
    recon = photos(2, 48, 41, seed=1).astype(np.float32) / 255
    gray, recon_gray = skimage_color.rgb2gray(rgb), skimage_color.rgb2gray(recon)
    np.testing.assert_allclose(np.asarray(reconstruction.rgb_to_gray(rgb)), gray, atol=1e-6)
    expected = [skimage_metrics.structural_similarity(recon_gray[i], gray[i], gaussian_weights=True, sigma=1.5,
                                                      use_sample_covariance=False, data_range=1.0)
                for i in range(2)]
    ours = reconstruction.structural_similarity(jnp.asarray(recon_gray), jnp.asarray(gray))
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)


def test_two_way_identification_matches_mindeye():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(9, 40))
    pred = real + 1.5 * rng.normal(size=real.shape)  # noisy enough that some comparisons fail
    np.testing.assert_allclose(reconstruction.correlation_matrix(real, pred, chunk=4),
                               np.corrcoef(real, pred)[:9, 9:], atol=1e-12)
    expected = mindeye_two_way(real, pred)
    assert 0.5 < expected < 1.0
    assert reconstruction.two_way_identification(real, pred) == pytest.approx(expected, abs=1e-12)


def test_correlation_distance_matches_scipy():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(5, 30)).astype(np.float32)
    pred = real + rng.normal(size=real.shape).astype(np.float32)
    expected = np.mean([scipy.spatial.distance.correlation(real[i], pred[i]) for i in range(5)])
    assert reconstruction.correlation_distance(real, pred, chunk=2) == pytest.approx(expected, abs=1e-9)


def test_pixcorr_and_ssim_follow_mindeye_pipeline():
    reconstructions, stimuli = photos(3, 64, 48, seed=1), photos(3, 40, 40)
    scores = reconstruction.score(reconstructions, stimuli, batch_size=2)

    def protocol(images):  # [0, 1], 256 px, then 425 px, as MindEye's tensors
        return torch_resize(torch_resize(images.astype(np.float32) / 255, 256, 256), 425, 425)

    recon_425, stimuli_425 = protocol(reconstructions), protocol(stimuli)
    pixcorr = np.mean([np.corrcoef(stimuli_425[i].ravel(), recon_425[i].ravel())[0, 1] for i in range(3)])
    recon_gray, stimuli_gray = skimage_color.rgb2gray(recon_425), skimage_color.rgb2gray(stimuli_425)
    ssim = np.mean([skimage_metrics.structural_similarity(recon_gray[i], stimuli_gray[i], gaussian_weights=True,
                                                          sigma=1.5, use_sample_covariance=False, data_range=1.0)
                    for i in range(3)])
    assert scores["pixcorr"] == pytest.approx(pixcorr, abs=1e-5)
    assert scores["ssim"] == pytest.approx(ssim, abs=1e-5)
    assert set(scores) == {"pixcorr", "ssim"}
    assert set(scores.skipped) == {"alex2", "alex5", "incep", "clip", "effnet", "swav"}
    assert "no alexnet network given" == scores.skipped["alex2"]


def random_model(build, seed: int = 0):
    """``build()``'s model with random NumPy weights (fan-in scaled, batch norms with random statistics),
    filled into its abstract state: JAX's per-shape random initializers take minutes on a loaded CPU."""
    graphdef, state = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = str(path[-2].key), leaf.shape
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, shape), leaf.dtype)
        if name == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.0, shape), leaf.dtype)
        fan_in = np.prod(shape[:-1]) if len(shape) > 1 else 100
        return jnp.asarray(rng.normal(size=shape) / np.sqrt(fan_in), leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


@pytest.fixture(scope="module")
def networks():
    """Random-weight networks: full AlexNet, small ResNet / EfficientNet, a tiny CLIP at 224 px."""
    clip_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=224, patch_size=32, projection_dim=16)
    return reconstruction.FeatureNetworks(
        alexnet=random_model(AlexNet),
        clip=random_model(lambda: CLIPVisionModel(clip_config)),
        efficientnet=random_model(lambda: EfficientNet(EfficientNetConfig(width_mult=0.25, depth_mult=0.3))),
        swav=random_model(lambda: ResNet(ResNetConfig(layers=(1, 1), width=8))),
    )


def test_network_metrics_follow_mindeye_arithmetic(networks):
    reconstructions, stimuli = photos(3, 64, 48, seed=1), photos(3, 40, 40)
    scores = reconstruction.score(reconstructions, stimuli, networks=networks, batch_size=2)
    assert set(scores) == {"pixcorr", "ssim", "alex2", "alex5", "clip", "effnet", "swav"}
    assert set(scores.skipped) == {"incep"}

    def features(model, images, size, mean, std):  # one batch, no padding: what score() must reproduce
        x = torch_resize(torch_resize(images.astype(np.float32) / 255, 256, 256), size, size)
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda s, pixels: nnx.merge(graphdef, s)(pixels))
        return forward(state, jnp.asarray((x - np.array(mean)) / np.array(std), jnp.float32))

    net = reconstruction
    alex_real = features(networks.alexnet, stimuli, 256, net.IMAGENET_MEAN, net.IMAGENET_STD)
    alex_pred = features(networks.alexnet, reconstructions, 256, net.IMAGENET_MEAN, net.IMAGENET_STD)
    for metric, layer in (("alex2", "features.4"), ("alex5", "features.11")):
        expected = mindeye_two_way(np.asarray(alex_real[layer]).reshape(3, -1),
                                   np.asarray(alex_pred[layer]).reshape(3, -1))
        assert scores[metric] == pytest.approx(expected, abs=1e-12)
    clip_real = features(networks.clip, stimuli, 224, net.OPENAI_CLIP_MEAN, net.OPENAI_CLIP_STD).image_embeds
    clip_pred = features(networks.clip, reconstructions, 224, net.OPENAI_CLIP_MEAN, net.OPENAI_CLIP_STD).image_embeds
    assert scores["clip"] == pytest.approx(mindeye_two_way(np.asarray(clip_real), np.asarray(clip_pred)), abs=1e-12)
    for metric, model, size in (("effnet", networks.efficientnet, 255), ("swav", networks.swav, 224)):
        real = np.asarray(features(model, stimuli, size, net.IMAGENET_MEAN, net.IMAGENET_STD))
        pred = np.asarray(features(model, reconstructions, size, net.IMAGENET_MEAN, net.IMAGENET_STD))
        expected = np.mean([scipy.spatial.distance.correlation(real[i], pred[i]) for i in range(3)])
        assert scores[metric] == pytest.approx(expected, abs=1e-5)


def test_perfect_reconstructions_score_perfectly(networks):
    stimuli = photos(3, 40, 40)
    scores = reconstruction.score(stimuli, stimuli, networks=networks)
    for metric in ("pixcorr", "ssim", "alex2", "alex5", "clip"):
        assert scores[metric] == pytest.approx(1.0, abs=1e-6), metric
    for metric in ("effnet", "swav"):
        assert scores[metric] == pytest.approx(0.0, abs=1e-6), metric


@pytest.mark.parametrize("reconstructions,stimuli,message", [
    (np.zeros((2, 8, 8, 3), np.float32), np.zeros((2, 8, 8, 3), np.uint8), "reconstructions: expected uint8"),
    (np.zeros((2, 8, 8), np.uint8), np.zeros((2, 8, 8, 3), np.uint8), "reconstructions: expected uint8"),
    (np.zeros((2, 8, 8, 3), np.uint8), np.zeros((3, 8, 8, 3), np.uint8), "N >= 2"),
    (np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 8, 3), np.uint8), "N >= 2"),
])
def test_bad_input_is_refused(reconstructions, stimuli, message):
    with pytest.raises(ValueError, match=message):
        reconstruction.score(reconstructions, stimuli)
