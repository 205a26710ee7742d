"""Checkpoint key tables for the CLIP towers.

Both tables read ``CLIPVisionModelWithProjection`` / ``CLIPTextModelWithProjection``
checkpoints and the full ``CLIPModel`` checkpoint alike: all three store the
towers under ``vision_model.*`` / ``text_model.*`` next to ``visual_projection``
and ``text_projection``; each table ignores the other tower and ``logit_scale``.
"""

from __future__ import annotations

from nvl_jax.models.hf_loader import KeyMap, linear


def patch_kernel(w):
    """Patch conv weight ``[width, 3, patch, patch]`` -> Dense kernel ``[patch * patch * 3, width]``.

    Rows follow the (row, column, channel) order in which ``CLIPVisionModel``
    flattens each channels-last patch.
    """
    return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def _layer_norm(key: str, path: str) -> list:
    return [(rf"{key}\.weight", f"{path}.scale", None), (rf"{key}\.bias", f"{path}.bias", None)]


def _encoder(prefix: str) -> list:
    layer = rf"{prefix}encoder\.layers\.(\d+)\."
    dense = r"(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])"
    norm = r"(layer_norm[12])"
    return [
        (layer + dense + r"\.weight", r"layers.\1.\2.kernel", linear),
        (layer + dense + r"\.bias", r"layers.\1.\2.bias", None),
        (layer + norm + r"\.weight", r"layers.\1.\2.scale", None),
        (layer + norm + r"\.bias", r"layers.\1.\2.bias", None),
    ]


# Non-persistent buffers that older checkpoints still carry.
_BUFFERS = r".*\.position_ids"

VISION_KEY_MAP = KeyMap(
    rules=[
        (r"vision_model\.embeddings\.class_embedding", "class_embedding", None),
        (r"vision_model\.embeddings\.patch_embedding\.weight", "patch_embedding.kernel", patch_kernel),
        (r"vision_model\.embeddings\.position_embedding\.weight", "position_embedding.embedding", None),
        *_layer_norm(r"vision_model\.pre_layrnorm", "pre_layrnorm"),
        *_encoder(r"vision_model\."),
        *_layer_norm(r"vision_model\.post_layernorm", "post_layernorm"),
        (r"visual_projection\.weight", "visual_projection.kernel", linear),
    ],
    ignore=[r"text_model\..*", r"text_projection\.weight", r"logit_scale", _BUFFERS],
)

# transformers 5 saves a bare CLIPTextModel without the ``text_model.`` prefix that older
# versions (and the published Stable Diffusion text encoders) wrote; both load.
_TEXT = r"(?:text_model\.)?"

TEXT_KEY_MAP = KeyMap(
    rules=[
        (_TEXT + r"embeddings\.token_embedding\.weight", "token_embedding.embedding", None),
        (_TEXT + r"embeddings\.position_embedding\.weight", "position_embedding.embedding", None),
        *_encoder(_TEXT),
        *_layer_norm(_TEXT + r"final_layer_norm", "final_layer_norm"),
        (r"text_projection\.weight", "text_projection.kernel", linear),
    ],
    ignore=[r"vision_model\..*", r"visual_projection\.weight", r"logit_scale", _BUFFERS],
)
