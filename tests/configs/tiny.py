"""configs/demo.py shrunk for tests: ``--config=tests/configs/tiny.py:root=DATA_ROOT``."""

from nvl_jax.configs import demo, parse_arg


def get_config(arg: str | None = None):
    variant = parse_arg(arg, root="data/tiny", patch=7)
    config = demo.get_config()
    config.data.root = variant.root
    config.data.synthetic.scale = 0.25
    config.data.synthetic.train_stimuli = 40
    config.data.synthetic.test_stimuli = 16
    config.data.synthetic.sessions = 2
    config.data.synthetic.image_size = 64
    config.targets.image_size = 64
    config.data.patch_size = variant.patch  # on subj01's 20 x 26 x 21 grid at this scale
    config.data.batch_size = 8
    config.model.width = 32
    config.model.depth = 2
    config.model.num_heads = 2
    config.model.head_hidden = 64
    config.total_steps = 6
    config.log_every_steps = 1
    config.checkpoint_every_steps = 3
    config.optimizer.warmup_steps = 2
    config.eval.batch_size = 16
    return config
