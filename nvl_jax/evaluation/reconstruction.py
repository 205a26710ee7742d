"""The field's eight image-reconstruction metrics, with MindEye's protocol (``Reconstruction_Metrics.py``).

Every image (reconstructions and stimuli, uint8 ``[N, H, W, 3]``) is scaled to [0, 1] and resized to
256 x 256 first. Then:

| key     | what                                                                   | better |
|---------|------------------------------------------------------------------------|--------|
| pixcorr | resize to 425, Pearson correlation of the flattened RGB, per image     | higher |
| ssim    | resize to 425, ``rgb2gray``, 2-D SSIM (gaussian sigma 1.5, data range 1, population covariance) | higher |
| alex2   | two-way identification on AlexNet ``features.4``, 256 px, ImageNet normalization | higher |
| alex5   | two-way identification on AlexNet ``features.11``, 256 px                | higher |
| incep   | two-way identification on InceptionV3 ``avgpool``, 342 px               | higher |
| clip    | two-way identification on the CLIP ViT-L/14 image embedding, 224 px, CLIP normalization | higher |
| effnet  | mean correlation distance on EfficientNet-B1 ``avgpool``, 255 px        | lower  |
| swav    | mean correlation distance on SwAV-ResNet-50 ``avgpool``, 224 px         | lower  |

Every resize is torchvision's ``Resize`` on tensors as MindEye ran it: bilinear, ``align_corners=False``
and no antialiasing (torchvision < 0.17 defaulted to ``antialias=False`` for tensors; MindEye's logged
warnings show it ran such a version). SSIM is the 2-D SSIM of the grayscale images: MindEye passed
``multichannel=True`` on 2-D grayscale images, which the scikit-image versions that still accepted
that flag read as "the last axis is channels" (a 1-D SSIM down each image column, averaged) and
0.26 silently ignores (a 2-D SSIM); so published numbers depend on the version. This module fixes
the 2-D reading.

Two-way identification: ``r = corrcoef(real, pred)[:N, N:]``; for reconstruction ``j`` the fraction of
the other stimuli ``i`` with ``r[i, j] < r[j, j]``, averaged over ``j``. Correlation distance is
``1 - Pearson r`` of an image's and its reconstruction's features (``scipy.spatial.distance.correlation``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nvl_jax.models.alexnet import AlexNet
from nvl_jax.models.clip import CLIPVisionModel
from nvl_jax.models.clip.image_processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from nvl_jax.models.efficientnet import EfficientNet
from nvl_jax.models.inception import InceptionV3
from nvl_jax.models.resnet import ResNet

log = logging.getLogger(__name__)

PROTOCOL_SIZE = 256
PIXEL_SIZE = 425
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# skimage.color.rgb2gray's luminance weights (ITU-R BT.709).
GRAY_WEIGHTS = (0.2125, 0.7154, 0.0721)
SSIM_SIGMA = 1.5
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)  # scikit-image's truncate=3.5, as ndimage rounds it
SSIM_K1, SSIM_K2 = 0.01, 0.03

# metric -> (network, feature, input size, normalization mean and std, statistic).
METRICS = {
    "alex2": ("alexnet", "features.4", 256, IMAGENET_MEAN, IMAGENET_STD, "two_way"),
    "alex5": ("alexnet", "features.11", 256, IMAGENET_MEAN, IMAGENET_STD, "two_way"),
    "incep": ("inception", "avgpool", 342, IMAGENET_MEAN, IMAGENET_STD, "two_way"),
    "clip": ("clip", "image_embeds", 224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "two_way"),
    "effnet": ("efficientnet", "avgpool", 255, IMAGENET_MEAN, IMAGENET_STD, "correlation_distance"),
    "swav": ("swav", "avgpool", 224, IMAGENET_MEAN, IMAGENET_STD, "correlation_distance"),
}
KEYS = ("pixcorr", "ssim", *METRICS)


@functools.lru_cache(maxsize=32)
def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out_size, in_size]`` weights of torch's bilinear interpolation along one axis
    (``align_corners=False``, no antialiasing: each output reads its two nearest inputs), computed in
    float32 as torch's CPU kernel does, so the weights match it to the last bit."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    # scale * (i + 0.5) - 0.5 with one rounding: torch's kernel fuses the multiply-add.
    centers = (np.arange(out_size, dtype=f32) + f32(0.5)).astype(np.float64)
    source = np.maximum(np.float64(scale) * centers - 0.5, 0.0).astype(f32)
    lower = source.astype(np.int64)
    upper = np.minimum(lower + 1, in_size - 1)
    weight_upper = np.clip(source - lower.astype(f32), f32(0), f32(1))
    matrix = np.zeros((out_size, in_size), f32)
    np.add.at(matrix, (np.arange(out_size), lower), f32(1) - weight_upper)
    np.add.at(matrix, (np.arange(out_size), upper), weight_upper)
    return matrix


def resize(images: jax.Array, height: int, width: int) -> jax.Array:
    """``torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False)`` of
    ``[batch, h, w, channels]`` float images -> ``[batch, height, width, channels]``."""
    rows = jnp.asarray(_bilinear_matrix(images.shape[1], height))
    cols = jnp.asarray(_bilinear_matrix(images.shape[2], width))
    highest = jax.lax.Precision.HIGHEST
    images = jnp.einsum("oh,nhwc->nowc", rows, images, precision=highest)
    return jnp.einsum("pw,nowc->nopc", cols, images, precision=highest)


def torchvision_resize(images: jax.Array, size: int) -> jax.Array:
    """torchvision ``Resize(size)`` on tensors: the short side to ``size``, the long side scaled and
    truncated to an integer; ``[batch, h, w, channels]``."""
    h, w = images.shape[1:3]
    if h <= w:
        return resize(images, size, int(size * w / h))
    return resize(images, int(size * h / w), size)


@jax.jit
def to_protocol_size(images: jax.Array) -> jax.Array:
    """uint8 ``[batch, h, w, 3]`` -> float32 ``[batch, 256, 256, 3]`` in [0, 1]: the protocol's first step."""
    return resize(images.astype(jnp.float32) / 255.0, PROTOCOL_SIZE, PROTOCOL_SIZE)


def pixel_correlation(a: jax.Array, b: jax.Array) -> jax.Array:
    """Pearson correlation of each pair of flattened images ``[batch, ...]`` -> ``[batch]``."""
    a = a.reshape(len(a), -1)
    b = b.reshape(len(b), -1)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(1) / jnp.sqrt((a * a).sum(1) * (b * b).sum(1))


def rgb_to_gray(images: jax.Array) -> jax.Array:
    """``skimage.color.rgb2gray``: ``[..., 3]`` -> ``[...]``."""
    return images @ jnp.asarray(GRAY_WEIGHTS, images.dtype)


def _gaussian_filter_valid(images: jax.Array) -> jax.Array:
    """Separable gaussian blur of ``[batch, h, w]`` keeping only the pixels whose whole window lies in
    the image: ``[batch, h - 2r, w - 2r]``, what scikit-image's SSIM keeps after cropping ``r``."""
    taps = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1)
    kernel = np.exp(-0.5 * taps**2 / SSIM_SIGMA**2)
    kernel = jnp.asarray(kernel / kernel.sum(), images.dtype)
    size = len(taps)
    h, w = images.shape[1] - size + 1, images.shape[2] - size + 1
    rows = sum(kernel[i] * images[:, i:i + h, :] for i in range(size))
    return sum(kernel[i] * rows[:, :, i:i + w] for i in range(size))


def structural_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
    """2-D SSIM of grayscale ``[batch, h, w]`` images in [0, 1] -> ``[batch]``, as scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1)``."""
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mean_a, mean_b = _gaussian_filter_valid(a), _gaussian_filter_valid(b)
    var_a = _gaussian_filter_valid(a * a) - mean_a**2
    var_b = _gaussian_filter_valid(b * b) - mean_b**2
    covariance = _gaussian_filter_valid(a * b) - mean_a * mean_b
    similarity = ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)
                  / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)))
    return similarity.mean(axis=(1, 2))


@jax.jit
def _low_level(reconstructions: jax.Array, stimuli: jax.Array) -> tuple[jax.Array, jax.Array]:
    """PixCorr and SSIM ``[batch]`` of 256 px float images ``[batch, 256, 256, 3]``."""
    reconstructions = torchvision_resize(reconstructions, PIXEL_SIZE)
    stimuli = torchvision_resize(stimuli, PIXEL_SIZE)
    return (pixel_correlation(reconstructions, stimuli),
            structural_similarity(rgb_to_gray(reconstructions), rgb_to_gray(stimuli)))


def _standardized(rows: np.ndarray) -> np.ndarray:
    """Rows in float64 with zero mean and unit norm, so dot products are Pearson correlations."""
    rows = rows.astype(np.float64)
    rows = rows - rows.mean(axis=1, keepdims=True)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def correlation_matrix(real: np.ndarray, pred: np.ndarray, chunk: int = 256) -> np.ndarray:
    """``np.corrcoef(real, pred)[:N, N:]`` for ``[N, features]`` arrays, in float64, ``chunk`` rows at a
    time so two float64 copies of large feature maps never coexist."""
    out = np.empty((len(real), len(pred)))
    for i in range(0, len(real), chunk):
        left = _standardized(real[i:i + chunk])
        for j in range(0, len(pred), chunk):
            out[i:i + chunk, j:j + chunk] = left @ _standardized(pred[j:j + chunk]).T
    return out


def two_way_identification(real: np.ndarray, pred: np.ndarray) -> float:
    """MindEye's two-way identification of ``pred [N, features]`` (reconstructions) against
    ``real [N, features]`` (their stimuli): per reconstruction ``j``, the fraction of the other N - 1
    stimuli ``i`` whose features correlate with it less than its own stimulus's do, averaged."""
    if len(real) != len(pred) or len(real) < 2:
        raise ValueError(f"two-way identification needs N >= 2 matched rows, got {len(real)} and {len(pred)}")
    r = correlation_matrix(real, pred)
    # r[i, j] < r[j, j]: each column j against its diagonal entry (numpy broadcasts diag along rows).
    return float(np.mean(np.sum(r < np.diag(r), axis=0)) / (len(real) - 1))


def correlation_distance(real: np.ndarray, pred: np.ndarray, chunk: int = 256) -> float:
    """Mean over images of ``1 - Pearson(real[i], pred[i])`` (``scipy.spatial.distance.correlation``)."""
    distances = [1.0 - np.sum(_standardized(real[i:i + chunk]) * _standardized(pred[i:i + chunk]), axis=1)
                 for i in range(0, len(real), chunk)]
    return float(np.concatenate(distances).mean())


@dataclasses.dataclass(frozen=True)
class FeatureNetworks:
    """The networks the metrics read; ``None`` skips the metrics that need it.

    ``clip`` is a CLIP vision tower with projection (ViT-L/14 for the field's numbers); the others
    are this package's torchvision-layout ports (``swav`` a ResNet-50 with SwAV's weights).
    """

    alexnet: AlexNet | None = None
    inception: InceptionV3 | None = None
    clip: CLIPVisionModel | None = None
    efficientnet: EfficientNet | None = None
    swav: ResNet | None = None

    @classmethod
    def from_pretrained(cls, *, alexnet: str | os.PathLike | None = None, inception: str | os.PathLike | None = None,
                        clip: str | os.PathLike | None = None, efficientnet: str | os.PathLike | None = None,
                        swav: str | os.PathLike | None = None) -> FeatureNetworks:
        """Loads the networks whose checkpoint folders are given (``convert_feature_nets`` writes the
        torchvision / SwAV ones; ``clip`` is a Hugging Face CLIP folder or hub name)."""
        return cls(
            alexnet=AlexNet.from_pretrained(alexnet) if alexnet else None,
            inception=InceptionV3.from_pretrained(inception) if inception else None,
            clip=CLIPVisionModel.from_pretrained(clip) if clip else None,
            efficientnet=EfficientNet.from_pretrained(efficientnet) if efficientnet else None,
            swav=ResNet.from_pretrained(swav) if swav else None,
        )


class ReconstructionScores(dict):
    """``{metric: value}`` for the metrics computed; ``skipped`` maps each other metric to the reason."""

    def __init__(self, scores: dict[str, float], skipped: dict[str, str]):
        super().__init__(scores)
        self.skipped = skipped


def _features_fn(network: str, model: nnx.Module):
    """A jitted ``[batch, 256, 256, 3]`` float images -> ``{feature: [batch, features]}`` for ``network``."""
    graphdef, state = nnx.split(model)
    specs = {feature: (size, mean, std) for net, feature, size, mean, std, _ in METRICS.values() if net == network}
    size, mean, std = next(iter(specs.values()))

    @jax.jit
    def features(state, images):
        pixels = (torchvision_resize(images, size) - jnp.asarray(mean)) / jnp.asarray(std)
        outputs = nnx.merge(graphdef, state)(pixels)
        if network == "clip":
            outputs = {"image_embeds": outputs.image_embeds}
        elif network != "alexnet":
            outputs = {"avgpool": outputs}
        return {name: outputs[name].reshape(len(images), -1) for name in specs}

    return lambda images: features(state, images)


def _check_images(images, name: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name}: expected uint8 [N, height, width, 3] images, got {images.dtype} "
                         f"{list(images.shape)}")
    return images


def _batches(images: np.ndarray, batch_size: int):
    """``images`` in batches of exactly ``batch_size`` (the last padded with black images), so each
    jitted function compiles once."""
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        if len(batch) < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - len(batch), *batch.shape[1:]), batch.dtype)])
        yield jnp.asarray(batch)


def score(reconstructions, stimuli, *, networks: FeatureNetworks | None = None,
          batch_size: int = 32) -> ReconstructionScores:
    """The eight metrics of reconstructions uint8 ``[N, H, W, 3]`` against their stimuli uint8
    ``[N, H', W', 3]`` (row i reconstructs stimulus i; N >= 2; the two may differ in size).

    Returns ``{pixcorr, ssim, alex2, alex5, incep, clip, effnet, swav}`` for the metrics whose network
    is in ``networks``; the result's ``skipped`` names the others and why. Nothing falls back to
    random weights: a network the caller did not give is not scored.
    """
    reconstructions = _check_images(reconstructions, "reconstructions")
    stimuli = _check_images(stimuli, "stimuli")
    if len(reconstructions) != len(stimuli) or len(stimuli) < 2:
        raise ValueError(f"expected N >= 2 reconstructions and as many stimuli, got {len(reconstructions)} "
                         f"and {len(stimuli)}")
    networks = networks or FeatureNetworks()
    n = len(stimuli)
    batch_size = min(batch_size, n)
    available = {net: getattr(networks, net) for net in dict.fromkeys(m[0] for m in METRICS.values())
                 if getattr(networks, net) is not None}
    extractors = {net: _features_fn(net, model) for net, model in available.items()}
    skipped = {metric: f"no {spec[0]} network given" for metric, spec in METRICS.items() if spec[0] not in available}
    if skipped:
        log.warning("reconstruction metrics skipped (no weights given): %s", ", ".join(skipped))

    pixcorr, ssim = [], []
    real, pred = {}, {}
    # float32 matmuls and convs everywhere (no TF32 / bf16 passes on accelerators).
    with jax.default_matmul_precision("float32"):
        for recon_batch, stimulus_batch in zip(_batches(reconstructions, batch_size), _batches(stimuli, batch_size)):
            recon_256, stimulus_256 = to_protocol_size(recon_batch), to_protocol_size(stimulus_batch)
            batch_pixcorr, batch_ssim = _low_level(recon_256, stimulus_256)
            pixcorr.append(np.asarray(batch_pixcorr))
            ssim.append(np.asarray(batch_ssim))
            for net, extract in extractors.items():
                for feature, values in extract(stimulus_256).items():
                    real.setdefault((net, feature), []).append(np.asarray(values))
                for feature, values in extract(recon_256).items():
                    pred.setdefault((net, feature), []).append(np.asarray(values))

    scores = {"pixcorr": float(np.concatenate(pixcorr)[:n].mean()), "ssim": float(np.concatenate(ssim)[:n].mean())}
    for metric, (net, feature, _, _, _, statistic) in METRICS.items():
        if net in available:
            real_features = np.concatenate(real[net, feature])[:n]
            pred_features = np.concatenate(pred[net, feature])[:n]
            statistic_fn = two_way_identification if statistic == "two_way" else correlation_distance
            scores[metric] = statistic_fn(real_features, pred_features)
    return ReconstructionScores(scores, skipped)
