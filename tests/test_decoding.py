"""The whole stage-1 pipeline decodes: the demo retrieves held-out stimuli well above chance.

configs/demo.py (its model, optimizer and in-silico NSD at half resolution, single-trial SNR
0.4), on two subjects with 200 training stimuli each instead of four with 400, and 600 steps
instead of 2000. The demo's own figure (over 10x chance) is in the README; here it reaches about
6x chance (brain -> image top-1 0.12 of 50) and the asserted margins leave room for any CPU's
rounding.
"""

import json

from nvl_jax.data import synthetic, targets
from nvl_jax.training import loop

from test_training import ROOT, _load_config


def test_demo_retrieves_held_out_stimuli_above_chance(tmp_path):
    root = tmp_path / "data"
    synthetic.generate(root, synthetic.SyntheticConfig(subjects=("subj01", "subj02"), train_stimuli=200,
                                                       test_stimuli=50, sessions=2, image_size=64), progress=False)
    targets.cache_targets(root, image_size=64, batch_size=64, random_init=True)
    config = _load_config(ROOT / "configs" / "demo.py")
    config.data.root = str(root)
    config.targets.image_size = 64
    config.total_steps = config.checkpoint_every_steps = 600
    loop.train(config, tmp_path / "run")

    multi = json.loads((tmp_path / "run" / "eval.json").read_text())["multi_trial"]
    assert multi["n_test"] == 50 and multi["chance_top1"] == 1 / 50
    assert multi["brain_to_image_top1"] >= 3 * multi["chance_top1"], multi
    assert multi["image_to_brain_top1"] >= 3 * multi["chance_top1"], multi
    assert multi["two_way_identification"] >= 0.7, multi
