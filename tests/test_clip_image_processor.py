"""CLIP preprocessing against transformers' PIL-based ``CLIPImageProcessor``, bit for bit.

Without torchvision, transformers' ``CLIPImageProcessor()`` is ``CLIPImageProcessorPil``,
the reference here. Random uint8 noise is the hardest input for a resampler and a
normalizer: every rounding difference shows.
"""

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil

from nvl_jax.models.clip import image_processor as cip

SIZES = {
    "nsd_425": (425, 425),
    "already_224": (224, 224),
    "one_side_224": (224, 300),
    "landscape": (300, 400),
    "portrait": (500, 333),
    # Taller than 2:1: Pillow >= 13 runs the vertical pass first.
    "tall_portrait": (1000, 250),
    "wide_landscape": (250, 1000),
    "upsample": (64, 64),
    "tiny_upsample": (20, 30),
    "odd": (97, 131),
    "off_by_one": (223, 225),
}


def _image(rng, height, width):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _reference(processor, images):
    """The reference's pixel values, moved to channels-last."""
    return processor(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def reference():
    return CLIPImageProcessorPil()


@pytest.mark.parametrize("height,width", SIZES.values(), ids=SIZES.keys())
def test_matches_transformers_exactly(reference, height, width):
    image = _image(np.random.default_rng(height * 1000 + width), height, width)
    ours = cip.preprocess(image)
    assert ours.shape == (1, 224, 224, 3) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, _reference(reference, image))


def test_matches_transformers_at_random_sizes_and_settings():
    """Random image sizes, short sides and crops: up- and down-scaling, crops larger than the image."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        height, width, size, crop_height, crop_width = (int(v) for v in rng.integers(3, 300, 5))
        reference = CLIPImageProcessorPil(size={"shortest_edge": size},
                                          crop_size={"height": crop_height, "width": crop_width})
        ours = cip.CLIPImageProcessor(size=size, crop_size=(crop_height, crop_width))
        image = _image(rng, height, width)
        np.testing.assert_array_equal(ours(image), _reference(reference, image),
                                      err_msg=f"{height}x{width}, size {size}, crop {crop_height}x{crop_width}")


def test_resize_is_pillows_bicubic():
    image = _image(np.random.default_rng(3), 91, 57)
    expected = np.asarray(Image.fromarray(image).resize((40, 130), Image.Resampling.BICUBIC, reducing_gap=None))
    np.testing.assert_array_equal(cip.resize_bicubic(image, 130, 40), expected)


def test_batch_array_and_list_of_sizes(reference):
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (3, 250, 180, 3), dtype=np.uint8)
    np.testing.assert_array_equal(cip.preprocess(batch), _reference(reference, list(batch)))
    mixed = [_image(rng, 425, 425), _image(rng, 120, 300), _image(rng, 333, 500)]
    ours = cip.preprocess(mixed)
    assert ours.shape == (3, 224, 224, 3)
    np.testing.assert_array_equal(ours, _reference(reference, mixed))


def test_from_pretrained_reads_preprocessor_config(tmp_path):
    """Non-default size, crop, mean and std; the crop is larger than the resized
    short side, so the reference's zero padding is exercised too."""
    saved = CLIPImageProcessorPil(size={"shortest_edge": 100}, crop_size={"height": 128, "width": 90},
                                  image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    saved.save_pretrained(tmp_path)
    ours = cip.CLIPImageProcessor.from_pretrained(tmp_path)
    assert ours == cip.CLIPImageProcessor(size=100, crop_size=(128, 90), image_mean=(0.5, 0.4, 0.3),
                                          image_std=(0.2, 0.25, 0.3))
    image = _image(np.random.default_rng(2), 151, 77)
    np.testing.assert_array_equal(ours(image), _reference(saved, image))


def test_from_config_accepts_int_sizes_and_rejects_other_pipelines():
    assert cip.CLIPImageProcessor.from_config({"size": 256, "crop_size": 240}) == cip.CLIPImageProcessor(
        size=256, crop_size=(240, 240))
    with pytest.raises(ValueError, match="do_center_crop"):
        cip.CLIPImageProcessor.from_config({"do_center_crop": False})
    with pytest.raises(ValueError, match="only bicubic"):
        cip.CLIPImageProcessor.from_config({"resample": 2})


def test_rejects_float_images():
    with pytest.raises(ValueError, match="expected uint8"):
        cip.preprocess(np.zeros((64, 64, 3), np.float32))
