"""Writes this package's Flax models as Hugging Face checkpoint folders that diffusers and transformers read.

Each model's loader has a key table (``hf_loader.KeyMap``: checkpoint key -> NNX path and a
layout transform). Export walks the other way: an NNX path is renamed to its checkpoint key by a
short list of substitutions, the key table is asked where that key would load, and the export is
refused unless it lands back on the same parameter; the tensor is then put back in PyTorch's
layout by the inverse of the table's transform. So an exported folder loads into the same model
through the same strict loader.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
import re

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from nvl_jax.diffusion import conditioning
from nvl_jax.models import clip, hf_loader, unet, vae
from nvl_jax.models.clip import params as clip_params
from nvl_jax.models.clip.params import patch_kernel
from nvl_jax.models.unet import params as unet_params
from nvl_jax.models.vae import modeling as vae_modeling
from nvl_jax.models.vae import params as vae_params

# NNX leaf name -> the checkpoint's.
_LEAVES = ((r"\.kernel$", ".weight"), (r"\.scale$", ".weight"), (r"\.embedding$", ".weight"))


def _inverse_patch_kernel(kernel: np.ndarray) -> np.ndarray:
    """Dense kernel ``[patch * patch * 3, width]`` -> patch conv weight ``[width, 3, patch, patch]``."""
    patch = int(round((kernel.shape[0] // 3) ** 0.5))
    return kernel.reshape(patch, patch, 3, kernel.shape[1]).transpose(3, 2, 0, 1)


# The loader's transforms and their inverses. A 1x1-conv-or-Linear weight goes back as a Linear
# ``[out, in]``, the layout diffusers writes today for VAE attention and linear transformer projections.
_INVERSES = {
    hf_loader.linear: lambda w: w.T,
    hf_loader.conv2d: lambda w: w.transpose(3, 2, 0, 1),
    hf_loader.conv1x1_as_linear: lambda w: w.T,
    patch_kernel: _inverse_patch_kernel,
    None: lambda w: w,
}

UNET_RENAMES = (
    (r"^(.*)\.(down|up)sampler\.conv\.", r"\1.\2samplers.0.conv."),
    (r"^(.*\.attn[12])\.to_out\.", r"\1.to_out.0."),
    (r"^(.*\.ff)\.geglu_proj\.", r"\1.net.0.proj."),
    (r"^(.*\.ff)\.proj_out\.", r"\1.net.2."),
)
VAE_RENAMES = (
    (r"^(.*)\.(down|up)sample_conv\.", r"\1.\2samplers.0.conv."),
    (r"^(encoder|decoder)\.mid_block\.attention\.to_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"^(encoder|decoder)\.mid_block\.attention\.", r"\1.mid_block.attentions.0."),
)
# The published Stable Diffusion text encoders keep transformers' ``text_model.`` prefix.
TEXT_RENAMES = (
    (r"^(token|position)_embedding\.", r"text_model.embeddings.\1_embedding."),
    (r"^layers\.", "text_model.encoder.layers."),
    (r"^final_layer_norm\.", "text_model.final_layer_norm."),
)
VISION_RENAMES = (
    (r"^class_embedding$", "vision_model.embeddings.class_embedding"),
    (r"^(patch|position)_embedding\.", r"vision_model.embeddings.\1_embedding."),
    (r"^layers\.", "vision_model.encoder.layers."),
    (r"^(pre_layrnorm|post_layernorm)\.", r"vision_model.\1."),
)


def checkpoint_tensors(model: nnx.Module, key_map: hf_loader.KeyMap, renames) -> dict[str, np.ndarray]:
    """``{checkpoint key: array in PyTorch's layout}`` of every parameter of ``model``, on the host.

    Raises if a parameter's key would not load back onto that parameter through ``key_map``.
    """
    tensors = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(str(p) for p in path)
        key = name
        for pattern, replacement in (*renames, *_LEAVES):
            key = re.sub(pattern, replacement, key)
        target = key_map.target(key)
        if target is None or target[0] != name:
            raise ValueError(f"{type(model).__name__}.{name}: exported as {key!r}, which the loader maps to "
                             f"{None if target is None else target[0]!r}")
        tensors[key] = np.ascontiguousarray(_INVERSES[target[1]](np.asarray(variable[...], np.float32)))
    return tensors


def _write(folder: Path, tensors: dict, weights_name: str, config: dict, config_name: str = "config.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / weights_name), metadata={"format": "pt"})
    (folder / config_name).write_text(json.dumps(config, indent=2))
    return folder


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"


def save_unet(model: unet.UNet2DConditionModel, folder: str | Path) -> Path:
    """A diffusers ``UNet2DConditionModel`` folder."""
    config = {"_class_name": "UNet2DConditionModel", **dataclasses.asdict(model.config)}
    return _write(Path(folder), checkpoint_tensors(model, unet_params.KEY_MAP, UNET_RENAMES), DIFFUSERS_WEIGHTS,
                  config)


def save_vae(model: vae.AutoencoderKL, folder: str | Path) -> Path:
    """A diffusers ``AutoencoderKL`` folder."""
    c = model.config
    n = len(c.block_out_channels)
    config = {"_class_name": "AutoencoderKL", **dataclasses.asdict(c),
              "down_block_types": [vae_modeling.DOWN_BLOCK] * n, "up_block_types": [vae_modeling.UP_BLOCK] * n}
    return _write(Path(folder), checkpoint_tensors(model, vae_params.KEY_MAP, VAE_RENAMES), DIFFUSERS_WEIGHTS,
                  config)


def save_text_encoder(model: clip.CLIPTextModel, folder: str | Path, *, pad_token_id: int = 1,
                      bos_token_id: int = 0) -> Path:
    """A transformers ``CLIPTextModel`` folder (the text tower must be built ``with_projection=False``)."""
    if model.text_projection is not None:
        raise ValueError("save_text_encoder writes a CLIPTextModel, which has no projection; "
                         "build the tower with with_projection=False")
    config = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
              **dataclasses.asdict(model.config), "pad_token_id": pad_token_id, "bos_token_id": bos_token_id}
    return _write(Path(folder), checkpoint_tensors(model, clip_params.TEXT_KEY_MAP, TEXT_RENAMES),
                  TRANSFORMERS_WEIGHTS, config)


def save_image_encoder(model: clip.CLIPVisionModel, folder: str | Path) -> Path:
    """A transformers ``CLIPVisionModelWithProjection`` folder."""
    config = {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
              **dataclasses.asdict(model.config)}
    return _write(Path(folder), checkpoint_tensors(model, clip_params.VISION_KEY_MAP, VISION_RENAMES),
                  TRANSFORMERS_WEIGHTS, config)


def save_image_normalizer(model: conditioning.StableUnCLIPImageNormalizer, folder: str | Path) -> Path:
    """A diffusers ``StableUnCLIPImageNormalizer`` folder."""
    config = {"_class_name": "StableUnCLIPImageNormalizer", "embedding_dim": model.config.embedding_dim}
    return _write(Path(folder), checkpoint_tensors(model, conditioning.KEY_MAP, ()), DIFFUSERS_WEIGHTS, config)
