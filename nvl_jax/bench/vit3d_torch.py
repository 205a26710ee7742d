"""The stage-1 ``BrainEncoder`` in PyTorch: the project's own twin of the NNX model, the
benchmark's baseline and the other side of the parity tests.

Module and parameter names mirror the NNX model (``vit.blocks.0.attn.qkv.weight``
is ``vit.blocks[0].attn.qkv.kernel`` transposed), so ``load_from_nnx`` copies an
NNX model's weights in by name. The computation is the same: pre-LayerNorm blocks,
one fused q/k/v projection, ``scaled_dot_product_attention``, CLS token first, and
the same ``ViT3DConfig`` knobs (``hidden_act``, ``layer_norm_eps``, ``dropout`` on the
embeddings and residual branches, ``attention_dropout`` on the attention probabilities).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from nvl_jax.models.vit3d import ViT3DConfig

_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def _activation(name: str):
    if name == "gelu" or name in _TANH_GELUS:
        approximate = "tanh" if name in _TANH_GELUS else "none"
        return lambda x: F.gelu(x, approximate=approximate)
    return {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "silu": F.silu, "swish": F.silu,
            "relu": F.relu}[name]


class SelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, attention_dropout: float):
        super().__init__()
        self.num_heads, self.attention_dropout = num_heads, attention_dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attention_dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, features: int, hidden: int, out_features: int, act: str):
        super().__init__()
        self.act = _activation(act)
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    def __init__(self, config: ViT3DConfig):
        super().__init__()
        width, eps = config.width, config.layer_norm_eps
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = SelfAttention(width, config.num_heads, config.attention_dropout)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, config.mlp_ratio * width, width, config.hidden_act)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x)))
        return x + self.dropout(self.mlp(self.norm2(x)))


class ViT3D(nn.Module):
    def __init__(self, config: ViT3DConfig):
        super().__init__()
        self.config = config
        self.patch_embed = nn.Linear(config.patch_dim, config.width)
        self.position_embedding = nn.Embedding(config.num_positions, config.width)
        self.cls_token = nn.Parameter(torch.zeros(config.width))
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([EncoderBlock(config) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)

    def forward(self, patches: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """``patches [batch, n_active, P**3]``, ``coords [n_active, 3]`` -> tokens ``[batch, 1 + n_active, width]``."""
        _, ny, nz = self.config.patch_grid
        positions = (coords[:, 0] * ny + coords[:, 1]) * nz + coords[:, 2]
        x = self.patch_embed(patches) + self.position_embedding(positions)
        x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=1)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class AlignmentHeads(nn.Module):
    def __init__(self, config: ViT3DConfig):
        super().__init__()
        self.latent_shape = config.vae_latent_shape
        self.clip = MLP(config.width, config.head_hidden, config.clip_dim, config.hidden_act)
        self.vae = MLP(config.width, config.head_hidden, math.prod(config.vae_latent_shape), config.hidden_act)

    def forward(self, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clip(cls), self.vae(cls).view(cls.shape[0], *self.latent_shape)


class BrainEncoder(nn.Module):
    """Returns ``(clip_embedding [batch, clip_dim], vae_latent [batch, h, w, c], cls [batch, width])``."""

    def __init__(self, config: ViT3DConfig):
        super().__init__()
        self.vit = ViT3D(config)
        self.heads = AlignmentHeads(config)

    def forward(self, patches: torch.Tensor, coords: torch.Tensor):
        cls = self.vit(patches, coords)[:, 0]
        clip_embedding, vae_latent = self.heads(cls)
        return clip_embedding, vae_latent, cls


def load_from_nnx(torch_model: BrainEncoder, nnx_model) -> BrainEncoder:
    """Copies every parameter of an NNX ``BrainEncoder`` into ``torch_model`` (in place).

    Dense kernels ``[in, out]`` become Linear weights ``[out, in]``; LayerNorm ``scale``
    and the position table's ``embedding`` become ``weight``. Raises if the two
    models do not have exactly the same parameters and shapes.
    """
    renamed = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
    targets = dict(torch_model.named_parameters())
    copied = set()
    with torch.no_grad():
        for path, variable in nnx.to_flat_state(nnx.state(nnx_model, nnx.Param)):
            value = np.array(variable[...], dtype=np.float32)
            name = ".".join(str(p) for p in path[:-1] + (renamed.get(path[-1], path[-1]),))
            if path[-1] == "kernel":
                value = np.ascontiguousarray(value.T)
            if name not in targets or tuple(targets[name].shape) != value.shape:
                raise ValueError(f"NNX parameter {'.'.join(map(str, path))} {value.shape} has no torch "
                                 f"counterpart {name}")
            targets[name].copy_(torch.from_numpy(value))
            copied.add(name)
    if missing := sorted(set(targets) - copied):
        raise ValueError(f"torch parameters without an NNX counterpart: {missing}")
    return torch_model


def dual_stream_loss(clip_embedding, vae_latent, clip_target, vae_target, alpha: float = 1 / 64):
    """``MSE_clip + alpha * MSE_vae``, as ``nvl_jax.models.vit3d.dual_stream_loss``."""
    return F.mse_loss(clip_embedding, clip_target) + alpha * F.mse_loss(vae_latent, vae_target)


def train_step(model: BrainEncoder, optimizer: torch.optim.Optimizer, patches, coords, clip_target, vae_target,
               alpha: float = 1 / 64) -> torch.Tensor:
    """One AdamW step on the dual-stream loss; returns the loss (detached)."""
    optimizer.zero_grad(set_to_none=True)
    clip_embedding, vae_latent, _ = model(patches, coords)
    loss = dual_stream_loss(clip_embedding, vae_latent, clip_target, vae_target, alpha)
    loss.backward()
    optimizer.step()
    return loss.detach()
