"""Stage 1 on prepared NSD: the paper's ViT3D (16 layers, width 768) with dual-stream alignment.

    python -m nvl_jax.train --config=configs/nsd.py --config.data.root=/data/nsd_prepared --workdir=runs/nsd

Fields the paper leaves open (docs/architecture.md says why each default): heads, MLP ratio,
position encoding, optimizer schedule, weight decay, warmup.
"""

import ml_collections

from nvl_jax import sharding


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
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
    config.data.common_grid = (83, 104, 81)  # subj01's grid as the paper writes it
    config.data.patch_size = 14  # 12 and 10 are used for concept localization
    config.data.batch_size = 32  # global, over all processes
    config.data.mixup = True  # MixUp between repeats of a stimulus, lambda ~ U(0, 1)
    config.data.worker_count = 0  # Grain worker processes; 0 = threads in the main process

    config.targets = ml_collections.ConfigDict()
    config.targets.clip = "openai/clip-vit-large-patch14"
    config.targets.vae = "stabilityai/sd-vae-ft-mse"
    config.targets.vae_subfolder = ""
    config.targets.image_size = 512  # -> 64 x 64 x 4 VAE latents
    config.targets.random_init = False

    config.model = ml_collections.ConfigDict()
    config.model.width = 768
    config.model.depth = 16
    config.model.num_heads = 12
    config.model.mlp_ratio = 4
    config.model.head_hidden = 1024
    config.model.compute_dtype = "float32"  # "bfloat16" on accelerators

    config.loss = ml_collections.ConfigDict()
    config.loss.alpha = 1 / 64  # weight of the VAE-latent MSE against the CLIP MSE

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
    return config
