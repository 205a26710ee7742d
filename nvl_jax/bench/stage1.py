"""The stage-1 benchmark: four ratios in one run on one device, printed as one JSON object.

- ``matmul_peak_fraction``: the ViT3D train step's achieved FLOP/s over this device's measured
  dense-matmul FLOP/s (``nvl_jax.bench.train_step``);
- ``speedup_vs_torch``: the same architecture's train step in PyTorch eager over ours;
- ``pipeline_over_step``: samples/s of the Grain input pipeline (record reading, MixUp, batching)
  on full-size in-silico NSD over samples/s of the train step;
- ``preprocess_speedup_vs_host``: on-device scatter + resample + patchify over the scipy host
  reference (``nvl_jax.bench.preprocess``).

The model is mid-size: 8 layers x width 512, the paper's 288 patches of 14^3 plus CLS,
batch 8. ``--quick`` shrinks everything for a smoke test.

    python -m nvl_jax.bench.stage1 [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from nvl_jax.bench import preprocess, train_step
from nvl_jax.data import format as data_format
from nvl_jax.data import pipeline, synthetic


def pipeline_samples_per_s(root: Path, batch: int, batches: int, repeats: int = 3) -> float:
    """Median samples/s of the training input pipeline over ``batches`` batches, after one warm-up batch."""
    dataset = data_format.PreparedDataset.open(root)
    rates = []
    for seed in range(repeats):
        it = iter(pipeline.train_dataset(root, dataset, global_batch_size=batch, seed=seed, mixup=True))
        next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        rates.append(batch * batches / (time.perf_counter() - start))
    return statistics.median(rates)


def full_size_dataset(root: Path, train_stimuli: int) -> Path:
    """In-silico NSD at NSD's grids (~15k voxels per subject) with random targets of the real shapes.

    Target values do not matter for the input pipeline's speed, so no model computes them.
    """
    synthetic.generate(root, synthetic.SyntheticConfig(scale=1.0, train_stimuli=train_stimuli, test_stimuli=20,
                                                       image_size=64), progress=False)
    n = data_format.PreparedDataset.open(root, check_values=False).n_stimuli
    rng = np.random.default_rng(0)
    data_format.write_targets(root, rng.normal(size=(n, 768)).astype(np.float32),
                              rng.normal(size=(n, 64, 64, 4)).astype(np.float32), {"random": True})
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nvl_jax.bench.stage1", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script, not figures")
    args = parser.parse_args(argv)
    if args.quick:
        model = dict(layers=1, width=64, heads=2, n_active=16, patch_size=6, batch=2, repeats=1)
        prep, data = dict(batch=4, patch_size=14, repeats=1, n_voxels=2000), dict(train_stimuli=8, batches=2)
    else:
        model = dict(layers=8, width=512, heads=8, n_active=288, patch_size=14, batch=8, repeats=5)
        prep, data = dict(batch=32, patch_size=14, repeats=5), dict(train_stimuli=100, batches=20)

    step = train_step.measure(**model)
    host = preprocess.measure(**prep)
    with tempfile.TemporaryDirectory() as tmp:
        root = full_size_dataset(Path(tmp) / "data", data["train_stimuli"])
        pipeline_rate = pipeline_samples_per_s(root, model["batch"], data["batches"])
    report = {
        "matmul_peak_fraction": step["matmul_peak_fraction"],
        "speedup_vs_torch": step["speedup_vs_torch"],
        "pipeline_over_step": pipeline_rate / step["samples_per_s_jax"],
        "preprocess_speedup_vs_host": host["preprocess_speedup_vs_host"],
        "pipeline_samples_per_s": pipeline_rate,
        "train_step": step,
        "preprocess": host,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
