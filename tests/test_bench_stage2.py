"""The stage-2 benchmark runs end to end at toy sizes, and its two sides compute the same thing: the same
step-0 loss and the same greedy tokens from the same checkpoint (nothing here is timed)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from nvl_jax.bench import stage2

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = {"layers": 2, "width": 64, "heads": 4, "kv_heads": 2, "intermediate": 96, "vocab": 256, "brain_tokens": 5,
        "brain_width": 32, "answer_tokens": 8, "batch": 2, "decode_batch": 2, "new_tokens": 4}


def test_bench_stage2_prints_the_json_report_and_both_sides_agree():
    flags = [f"--{k}={v}" for k, v in TINY.items()] + ["--repeats=1"]
    # One host device, as a user running the script has: the 8 virtual test devices are not inherited.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-m", "nvl_jax.bench.stage2", *flags], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("train_step_speedup_vs_torch", "train_step_matmul_peak_fraction", "prefixed_decode_speedup_vs_torch",
                "train_step_speedup_vs_torch_best", "prefixed_decode_speedup_vs_torch_best",
                "step_seconds_jax", "step_seconds_torch", "decode_tokens_per_s_jax", "decode_tokens_per_s_torch",
                "matmul_flops_per_s", "step_flops_xla_cost_analysis", "load_average_before", "device",
                "jax_version", "torch_version"):
        assert key in report, key
    assert report["sizes"]["brain_tokens"] == TINY["brain_tokens"]
    assert report["train_step_speedup_vs_torch"] > 0 and report["prefixed_decode_speedup_vs_torch"] > 0
    # Same weights, same batch: transformers' loss (labels -100 on the brain tokens) equals ours.
    assert report["first_step_loss_jax"] == pytest.approx(report["first_step_loss_torch"], rel=1e-5)
    assert report["decode_tokens_agree"] == 1.0
    # The analytic count is of matmuls only; XLA's adds the elementwise work, so it is a little larger.
    assert 0.8 < report["step_flops"] / report["step_flops_xla_cost_analysis"] <= 1.0


def test_decode_batch_larger_than_the_batch_is_refused():
    with pytest.raises(SystemExit):
        stage2.parse_args(["--batch=2", "--decode_batch=4"])
