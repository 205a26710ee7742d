"""CLIP's image preprocessing in NumPy, equal to transformers' PIL-based ``CLIPImageProcessor``.

The steps: resize the short side to ``size`` with Pillow's bicubic filter,
center-crop, scale to [0, 1], normalize with CLIP's mean and std. The resize
reproduces Pillow's 8-bit resampler (``src/libImaging/Resample.c``) exactly:
per-output-pixel filter taps in float64, normalized and rounded to fixed
point with 22 fractional bits, one pass per axis in the order Pillow picks,
each rounding and clipping to uint8. So the output is bit-for-bit that of the
reference, without PIL or torch, in two matmuls per image.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import math
import os

import numpy as np

from nvl_jax.models import hf_loader

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow's fixed point: 8 bits of result, 2 bits of headroom for the filter's
# negative lobes, the rest fractional.
_PRECISION_BITS = 32 - 8 - 2
_BICUBIC_SUPPORT = 2.0
_PIL_BICUBIC = 3


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (a = -0.5), term by term in its order of operations."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def _filter_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for one axis, as a matrix.

    Returns ``[out_size, in_size]`` float64 holding the integer fixed-point
    weights: output pixel ``i`` is ``matrix[i] @ input`` before rounding.
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = _BICUBIC_SUPPORT * filter_scale
    taps = math.ceil(support) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    # C's (int) cast truncates toward zero.
    start = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - start
    offsets = np.arange(taps)
    valid = offsets[None, :] < count[:, None]
    weight = np.where(valid, _bicubic(((start[:, None] + offsets) - center[:, None] + 0.5) * (1.0 / filter_scale)),
                      0.0)
    # Summed tap by tap, in Pillow's order, so the normalizer matches to the last bit.
    total = np.zeros(out_size)
    for j in range(taps):
        total = total + weight[:, j]
    weight = np.where(total[:, None] != 0.0, weight / np.where(total == 0.0, 1.0, total)[:, None], weight)
    fixed = np.trunc(weight * (1 << _PRECISION_BITS) + np.where(weight < 0, -0.5, 0.5))
    matrix = np.zeros((out_size, in_size))
    rows = np.broadcast_to(np.arange(out_size)[:, None], valid.shape)
    matrix[rows[valid], (start[:, None] + offsets)[valid]] = fixed[valid]
    matrix.flags.writeable = False
    return matrix


def _round_to_uint8(acc: np.ndarray) -> np.ndarray:
    """Pillow's ``clip8``: drop the fractional bits (round half up) and clip to [0, 255]."""
    return np.clip(np.floor((acc + (1 << (_PRECISION_BITS - 1))) * 2.0**-_PRECISION_BITS), 0, 255)


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``PIL.Image.resize((width, height), BICUBIC)`` of a uint8 ``[h, w, 3]`` image -> ``[height, width, 3]``.

    Each pass is a float64 matmul with the fixed-point weights; every product
    and partial sum is an integer below 2**53, so the sums are exact whatever
    the summation order, as in Pillow's int32 loops. A pass is skipped where
    its size is unchanged. Pillow >= 13 runs the vertical pass first when the
    height shrinks by more than twice as many pixels as the width (older
    Pillow never does, so for such images it rounds differently).
    """
    in_height, in_width = image.shape[:2]
    planes = image.transpose(2, 0, 1).astype(np.float64)  # [3, h, w]

    def horizontal(x):
        return x if x.shape[2] == width else _round_to_uint8(x @ _filter_matrix(x.shape[2], width).T)

    def vertical(x):
        return x if x.shape[1] == height else _round_to_uint8(_filter_matrix(x.shape[1], height) @ x)

    if in_height > height and in_height - height > 2 * (in_width - width):
        planes = horizontal(vertical(planes))
    else:
        planes = vertical(horizontal(planes))
    return planes.transpose(1, 2, 0).astype(np.uint8)


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """transformers' ``get_resize_output_image_size(default_to_square=False)``: short side -> ``size``."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _crop_slices(size: int, crop: int) -> tuple[slice, slice]:
    """Source and destination slices along one axis of a centered crop of ``crop`` pixels."""
    start = (size - crop) // 2
    length = min(size - max(start, 0), crop - max(-start, 0))
    return slice(max(start, 0), max(start, 0) + length), slice(max(-start, 0), max(-start, 0) + length)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' ``center_crop`` of ``[h, w, 3]`` to ``[height, width, 3]``: the centered window,
    zero-padded on the sides where the image is smaller."""
    src_rows, dst_rows = _crop_slices(image.shape[0], height)
    src_cols, dst_cols = _crop_slices(image.shape[1], width)
    out = np.zeros((height, width) + image.shape[2:], image.dtype)
    out[dst_rows, dst_cols] = image[src_rows, src_cols]
    return out


def _edge(value, key: str, name: str) -> int:
    """A size field of preprocessor_config.json: an int, or a dict holding ``key``."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and key in value:
        return int(value[key])
    raise ValueError(f"preprocessor_config.json: {name}={value!r}; expected an int or a dict with {key!r}")


@dataclasses.dataclass(frozen=True)
class CLIPImageProcessor:
    """Resize short side to ``size``, center-crop ``crop_size``, rescale, normalize."""

    size: int = 224
    crop_size: tuple[int, int] = (224, 224)
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255

    @classmethod
    def from_config(cls, d: dict) -> CLIPImageProcessor:
        """From the fields of a ``preprocessor_config.json``; absent ones keep CLIP's defaults."""
        disabled = [k for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize") if d.get(k) is False]
        if disabled:
            raise ValueError(f"preprocessor config turns off {disabled}; this processor always resizes, "
                             "crops, rescales and normalizes")
        if d.get("resample", _PIL_BICUBIC) != _PIL_BICUBIC:
            raise ValueError(f"only bicubic resampling ({_PIL_BICUBIC}) is implemented, config asks for "
                             f"{d['resample']}")
        fields = {}
        if "size" in d:
            fields["size"] = _edge(d["size"], "shortest_edge", "size")
        if "crop_size" in d:
            crop = d["crop_size"]
            fields["crop_size"] = (_edge(crop, "height", "crop_size"), _edge(crop, "width", "crop_size"))
        for key in ("image_mean", "image_std"):
            if key in d:
                fields[key] = tuple(float(v) for v in d[key])
        if "rescale_factor" in d:
            fields["rescale_factor"] = float(d["rescale_factor"])
        return cls(**fields)

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, subfolder: str | None = None) -> CLIPImageProcessor:
        """From a checkpoint's ``preprocessor_config.json``."""
        folder = hf_loader.resolve(path_or_name, subfolder)
        return cls.from_config(hf_loader.read_config(folder, "preprocessor_config.json"))

    def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """uint8 ``[height, width, 3]``, ``[batch, height, width, 3]`` or a list of differently sized
        ``[height, width, 3]`` -> float32 ``[batch, crop_height, crop_width, 3]``."""
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        mean = np.asarray(self.image_mean, np.float32)
        std = np.asarray(self.image_std, np.float32)
        out = []
        for image in images:
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"expected uint8 [height, width, 3] images, got {image.dtype} {list(image.shape)}")
            image = resize_bicubic(image, *short_side_size(image.shape[0], image.shape[1], self.size))
            image = center_crop(image, *self.crop_size)
            # The reference's arithmetic: scale in float64, then normalize in float32.
            pixels = (image.astype(np.float64) * self.rescale_factor).astype(np.float32)
            out.append((pixels - mean) / std)
        return np.stack(out)


def preprocess(images: np.ndarray | Sequence[np.ndarray], size: int = 224, crop_size: int = 224, *,
               image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
               image_std: Sequence[float] = OPENAI_CLIP_STD) -> np.ndarray:
    """CLIP pixel values float32 ``[batch, crop_size, crop_size, 3]`` from uint8 image(s); see
    :class:`CLIPImageProcessor`."""
    processor = CLIPImageProcessor(size=size, crop_size=(crop_size, crop_size), image_mean=tuple(image_mean),
                                   image_std=tuple(image_std))
    return processor(images)
