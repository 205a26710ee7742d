"""The stage-1 demo: configs/nsd.py's pipeline on in-silico NSD, small enough for 2 CPU cores.

    python -m nvl_jax.train            # this config, into runs/demo

The dataset is generated on first use at data.root (python -m nvl_jax.data.synthetic), and its
targets are computed with tiny randomly initialised CLIP and VAE models of the real classes (no
download), so the demo runs anywhere in under 10 minutes.
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("nsd_config", Path(__file__).with_name("nsd.py"))
_nsd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_nsd)


def get_config():
    config = _nsd.get_config()
    config.total_steps = 2000
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500

    config.data.root = "data/in_silico_nsd"
    config.data.synthetic.seed = 0
    config.data.synthetic.scale = 0.5  # NSD's native grids at half resolution
    config.data.common_grid = (42, 52, 41)  # subj01's grid at the same scale
    config.data.patch_size = 10

    config.targets.random_init = True
    config.targets.image_size = 128  # -> 16 x 16 x 4 latents

    config.model.width = 128
    config.model.depth = 4
    config.model.num_heads = 4
    config.model.head_hidden = 512

    config.optimizer.lr = 2e-3
    config.optimizer.warmup_steps = 50
    config.eval.batch_size = 32
    return config
