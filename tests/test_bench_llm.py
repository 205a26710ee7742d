"""The LLM benchmark script runs end to end at toy sizes (a smoke test: nothing here is timed)."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_llm_prints_the_json_report():
    flags = ["--layers", "1", "--width", "64", "--heads", "4", "--kv_heads", "2", "--intermediate", "96",
             "--vocab", "256", "--prompt_len", "8", "--new_tokens", "4", "--batch_sizes", "1", "2",
             "--repeats", "1", "--shard_size", "50KB"]
    # One host device, as a user running the script has: the 8 virtual test devices are not inherited.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-m", "nvl_jax.bench.llm", *flags], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("decode_speedup_vs_torch", "decode_speedup_vs_torch_b1", "decode_speedup_vs_torch_b2",
                "load_peak_memory_over_size", "decode_tokens_per_s_jax_b1", "decode_tokens_per_s_torch_b2",
                "prefill_tokens_per_s_jax_b2", "prefill_tokens_per_s_torch_b1", "device", "jax_version",
                "torch_version"):
        assert key in report, key
    assert report["decode_speedup_vs_torch"] == min(report["decode_speedup_vs_torch_b1"],
                                                    report["decode_speedup_vs_torch_b2"])
    assert report["checkpoint_shards"] > 1
    assert report["load_peak_memory_over_size"] > 0
