"""How diffusers' ``AutoencoderKL`` safetensors keys map onto :class:`nvl_jax.models.vae.AutoencoderKL`.

Module paths match diffusers' except three renames: the one-element
``downsamplers.0.conv`` / ``upsamplers.0.conv`` lists become ``downsample_conv``
/ ``upsample_conv``, and ``mid_block.attentions.0`` becomes ``mid_block.attention``.

Checkpoints converted before diffusers 0.14 name the attention projections
``query`` / ``key`` / ``value`` / ``proj_attn``, and those converted straight
from the original LDM weights keep them as 1x1 convs ``[C, C, 1, 1]``; both
load, as diffusers' own loader accepts them.
"""

from __future__ import annotations

import re

from nvl_jax.models.hf_loader import KeyMap, conv1x1_as_linear, conv2d

_ATTENTION = r"(encoder|decoder)\.mid_block\.attentions\.0\."

# NNX name -> (current diffusers name, legacy name).
_ATTENTION_PROJECTIONS = {
    "to_q": ("to_q", "query"),
    "to_k": ("to_k", "key"),
    "to_v": ("to_v", "value"),
    "to_out": ("to_out.0", "proj_attn"),
}


def _attention_rules():
    for target, (current, legacy) in _ATTENTION_PROJECTIONS.items():
        name = rf"(?:{re.escape(current)}|{legacy})"
        yield rf"{_ATTENTION}{name}\.weight", rf"\1.mid_block.attention.{target}.kernel", conv1x1_as_linear
        yield rf"{_ATTENTION}{name}\.bias", rf"\1.mid_block.attention.{target}.bias", None
    yield rf"{_ATTENTION}group_norm\.weight", r"\1.mid_block.attention.group_norm.scale", None
    yield rf"{_ATTENTION}group_norm\.bias", r"\1.mid_block.attention.group_norm.bias", None


KEY_MAP = KeyMap(rules=[
    *_attention_rules(),
    (r"(.*)\.(down|up)samplers\.0\.conv\.weight", r"\1.\2sample_conv.kernel", conv2d),
    (r"(.*)\.(down|up)samplers\.0\.conv\.bias", r"\1.\2sample_conv.bias", None),
    (r"(.*(?:norm1|norm2|conv_norm_out))\.weight", r"\1.scale", None),
    # Every other weight is a conv: conv_in/out, the resnet convs and shortcuts, (post_)quant_conv.
    (r"(.*)\.weight", r"\1.kernel", conv2d),
    (r"(.*)\.bias", r"\1.bias", None),
])
