"""How diffusers' ``UNet2DConditionModel`` safetensors keys map onto :class:`nvl_jax.models.unet.UNet2DConditionModel`.

Module paths match diffusers' except these renames:

- the one-element ``downsamplers.0`` / ``upsamplers.0`` lists become ``downsampler`` / ``upsampler``;
- an attention's ``to_out.0`` becomes ``to_out``;
- the feed-forward's ``ff.net.0.proj`` (GEGLU) and ``ff.net.2`` become ``ff.geglu_proj`` and ``ff.proj_out``.

``proj_in`` / ``proj_out`` of a spatial transformer are Linear layers ``[out, in]`` when the
config says ``use_linear_projection`` (SD 2.x) and 1x1 convs ``[out, in, 1, 1]`` otherwise
(SD 1.x); both are one per-pixel matmul, so both load into the same Dense kernel.
"""

from __future__ import annotations

from nvl_jax.models.hf_loader import KeyMap, conv1x1_as_linear, conv2d, linear

_RENAMES = [
    (r"(.*)\.(down|up)samplers\.0\.conv", r"\1.\2sampler.conv", conv2d),
    (r"(.*\.attn[12])\.to_out\.0", r"\1.to_out", linear),
    (r"(.*\.ff)\.net\.0\.proj", r"\1.geglu_proj", linear),
    (r"(.*\.ff)\.net\.2", r"\1.proj_out", linear),
    (r"(.*\.attentions\.\d+\.proj_(?:in|out))", r"\1", conv1x1_as_linear),
    (r"(.*\.attn[12]\.to_[qkv]|.*\.time_emb_proj|(?:time|class)_embedding\.linear_[12])", r"\1", linear),
]


def _rules():
    for source, target, transform in _RENAMES:
        yield rf"{source}\.weight", rf"{target}.kernel", transform
        yield rf"{source}\.bias", rf"{target}.bias", None
    # GroupNorms (resnets' norm1/norm2, a transformer's norm, conv_norm_out) and
    # LayerNorms (a transformer block's norm1/2/3): weight is the scale.
    yield r"(.*norm[123]?|conv_norm_out)\.weight", r"\1.scale", None
    # Every other weight is a conv: conv_in/out, the resnet convs and shortcuts.
    yield r"(.*)\.weight", r"\1.kernel", conv2d
    yield r"(.*)\.bias", r"\1.bias", None


KEY_MAP = KeyMap(rules=list(_rules()))
