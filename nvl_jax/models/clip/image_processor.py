"""CLIP's image preprocessing, equal to transformers' PIL-based ``CLIPImageProcessor``.

The steps: resize the short side to ``size`` with Pillow's bicubic filter,
center-crop, scale to [0, 1], normalize with CLIP's mean and std. The resize is
Pillow's own (``reducing_gap=None``, as transformers calls it), so the output is
bit-for-bit that of the reference on any Pillow version; rescaling and
normalizing run on the whole batch at once, with the reference's arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import os

import numpy as np
from PIL import Image

from nvl_jax.models import hf_loader

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_PIL_BICUBIC = int(Image.Resampling.BICUBIC)


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``PIL.Image.resize((width, height), BICUBIC, reducing_gap=None)`` of a uint8 ``[h, w, 3]`` image
    -> ``[height, width, 3]``."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC, reducing_gap=None))


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
        crops = np.empty((len(images), *self.crop_size, 3), np.uint8)
        for i, image in enumerate(images):
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"expected uint8 [height, width, 3] images, got {image.dtype} {list(image.shape)}")
            image = resize_bicubic(image, *short_side_size(image.shape[0], image.shape[1], self.size))
            crops[i] = center_crop(image, *self.crop_size)
        # The reference's arithmetic, on the whole batch: scale in float64, then normalize in float32.
        pixels = np.multiply(crops, self.rescale_factor, dtype=np.float64).astype(np.float32)
        # Rows of whole image rows, with mean and std repeated along them: NumPy's inner loop then
        # runs over width * 3 values, not 3 (a quarter of the time).
        width = self.crop_size[1]
        rows = pixels.reshape(-1, width * 3)
        rows -= np.tile(np.asarray(self.image_mean, np.float32), width)
        rows /= np.tile(np.asarray(self.image_std, np.float32), width)
        return pixels


def preprocess(images: np.ndarray | Sequence[np.ndarray], size: int = 224, crop_size: int = 224, *,
               image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
               image_std: Sequence[float] = OPENAI_CLIP_STD) -> np.ndarray:
    """CLIP pixel values float32 ``[batch, crop_size, crop_size, 3]`` from uint8 image(s); see
    :class:`CLIPImageProcessor`."""
    processor = CLIPImageProcessor(size=size, crop_size=(crop_size, crop_size), image_mean=tuple(image_mean),
                                   image_std=tuple(image_std))
    return processor(images)
