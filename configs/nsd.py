"""Stage 1 on prepared NSD: the paper's ViT3D (16 layers, width 768) with dual-stream alignment.

    python -m nvl_jax.train --config=configs/nsd.py --config.data.root=/data/nsd_prepared --workdir=runs/nsd
    python -m nvl_jax.train --config=configs/nsd.py:patch=12 --workdir=runs/nsd_p12   # a localization extractor

Variants (``:key=value,...``): ``patch`` = 14 (the paper's extractor), 12 or 10 (the concept
localization ensemble's other two). Fields the paper leaves open (docs/architecture.md says why
each default): heads, MLP ratio, position encoding, optimizer schedule, weight decay, warmup.
"""

import ml_collections

from nvl_jax import sharding
from nvl_jax.configs import parse_arg

PATCH_SIZES = (14, 12, 10)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = parse_arg(arg, patch=14)
    if variant.patch not in PATCH_SIZES:
        raise ValueError(f"configs/nsd.py: patch must be one of {PATCH_SIZES}, got {variant.patch}")
    config = ml_collections.ConfigDict()
    config.task = "stage1"  # nvl_jax/training/tasks/<task>.py: model, batch, loss and evaluation
    config.seed = 0
    # Training length: epochs over the training trials, unless total_steps > 0.
    config.epochs = 30
    config.total_steps = -1
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3

    config.data = ml_collections.ConfigDict()
    config.data.root = "data/nsd_prepared"  # any prepared dataset, real or in-silico
    config.data.synthetic = ml_collections.ConfigDict()  # empty: never generate; see configs/demo.py
    # The common grid every subject is resampled onto: a subject of the dataset (its native grid,
    # X, Y, Z as stored) or an explicit "X,Y,Z". subj01's is 81 x 104 x 83; the paper writes it
    # 83 x 104 x 81, h5py's (Z, Y, X) order.
    config.data.common_grid = "subj01"
    config.data.patch_size = variant.patch
    config.data.batch_size = 32  # global, over all processes
    config.data.mixup = True  # MixUp between repeats of a stimulus, lambda ~ U(0, 1)
    config.data.worker_count = 0  # Grain worker processes; 0 = threads in the main process

    config.targets = ml_collections.ConfigDict()
    config.targets.clip = "openai/clip-vit-large-patch14"
    # The VAE that reconstruction decodes with: Stable unCLIP's own (docs/reconstruction.md).
    config.targets.vae = "stabilityai/stable-diffusion-2-1-unclip-small"
    config.targets.vae_subfolder = "vae"
    config.targets.image_size = 512  # -> 64 x 64 x 4 VAE latents
    config.targets.random_init = False

    config.model = ml_collections.ConfigDict()
    config.model.width = 768
    config.model.depth = 16
    config.model.num_heads = 12
    config.model.mlp_ratio = 4
    config.model.head_hidden = 1024
    config.model.hidden_act = "gelu"
    config.model.layer_norm_eps = 1e-6
    # Not stated by the paper; on in training only. dropout: embeddings and residual branches;
    # attention_dropout: attention probabilities (as HF ViT and CLIP).
    config.model.dropout = 0.0
    config.model.attention_dropout = 0.0
    config.model.compute_dtype = "float32"  # "bfloat16" on accelerators
    # What each block keeps for the backward pass: "none", "full" (recompute the block) or a
    # jax.checkpoint_policies name (nvl_jax.models.layers.REMAT_POLICIES); python -m nvl_jax.plan shows the effect.
    config.model.remat = "none"

    config.loss = ml_collections.ConfigDict()
    config.loss.alpha = 1 / 64  # weight of the VAE-latent term against the CLIP term
    # "squared_norm": the paper's ||.||^2 terms (scaled by 1 / clip_dim); "mean": per-element means,
    # which weigh the VAE term 21x less at 64 x 64 x 4 latents (vit3d.dual_stream_loss).
    config.loss.reduction = "squared_norm"

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.lr = 5e-4
    config.optimizer.warmup_steps = 500
    config.optimizer.final_lr_fraction = 0.01
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.weight_decay = 0.05
    config.optimizer.grad_clip = 1.0

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 64
    config.eval.retrieval_way = 300  # MindEye2's protocol, when there are >= 300 test stimuli
    config.eval.retrieval_draws = 30

    # (data, fsdp, tensor); -1 takes the remaining devices.
    config.mesh_shape = (-1, 1, 1)
    # Logical parameter axis -> mesh axes (nvl_jax/sharding.py explains the names).
    config.sharding_rules = sharding.DEFAULT_RULES
    # Hand-written backward passes of Dense and LayerNorm: "auto" = on for CPU, where they were
    # measured faster, off elsewhere; "on" / "off" force it (off permits forward-mode autodiff).
    config.custom_backward = "auto"
    return config
