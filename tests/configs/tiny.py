"""configs/demo.py shrunk for tests: ``--config=tests/configs/tiny.py:DATA_ROOT``."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "demo_config", Path(__file__).resolve().parents[2] / "configs" / "demo.py")
_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_demo)


def get_config(root: str = "data/tiny"):
    config = _demo.get_config()
    config.data.root = root
    config.data.synthetic.scale = 0.25
    config.data.synthetic.train_stimuli = 40
    config.data.synthetic.test_stimuli = 16
    config.data.synthetic.sessions = 2
    config.data.synthetic.image_size = 64
    config.targets.image_size = 64
    config.data.common_grid = (21, 26, 20)
    config.data.patch_size = 7
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
