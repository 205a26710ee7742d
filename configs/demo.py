"""The stage-1 demo: configs/nsd.py's pipeline on in-silico NSD, small enough for 2 CPU cores.

    python -m nvl_jax.train                                    # this config, into runs/demo
    python -m nvl_jax.train --config=configs/demo.py:patch=12  # the localization ensemble's others

The dataset is generated on first use at data.root (python -m nvl_jax.data.synthetic), and its
targets are computed with tiny randomly initialised CLIP and VAE models of the real classes (no
download), so the demo runs anywhere in under 10 minutes. Variants: ``patch`` = 10 (the demo's
default), 12 or 14; each is resampled onto the same half-resolution subj01 grid.
"""

from nvl_jax.configs import nsd, parse_arg


def get_config(arg: str | None = None):
    variant = parse_arg(arg, patch=10)
    if variant.patch not in nsd.PATCH_SIZES:
        raise ValueError(f"configs/demo.py: patch must be one of {nsd.PATCH_SIZES}, got {variant.patch}")
    config = nsd.get_config()
    config.total_steps = 2000
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500

    config.data.root = "data/in_silico_nsd"
    config.data.synthetic.seed = 0
    config.data.synthetic.scale = 0.5  # NSD's native grids at half resolution; subj01's is 40 x 52 x 42
    config.data.patch_size = variant.patch

    config.targets.random_init = True
    config.targets.vae = ""
    config.targets.vae_subfolder = ""
    config.targets.clip = ""
    config.targets.image_size = 128  # -> 16 x 16 x 4 latents

    config.model.width = 128
    config.model.depth = 4
    config.model.num_heads = 4
    config.model.head_hidden = 512

    config.optimizer.lr = 2e-3
    config.optimizer.warmup_steps = 50
    config.eval.batch_size = 32
    return config
