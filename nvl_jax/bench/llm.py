"""Greedy decoding speed and checkpoint-loading memory of the JAX Llama against transformers on CPU.

One random Llama (fixed seed) is built with transformers and saved as a sharded
safetensors checkpoint; our ``LlamaForCausalLM.from_pretrained`` loads it. Then:

- decode: new tokens per second of ``generate`` (greedy, KV cache, prefill
  included) for ours and for transformers' ``generate(use_cache=True,
  do_sample=False)``, at each batch size, never stopping early on either side;
- prefill: prompt tokens per second of a one-new-token ``generate``;
- load memory: in a fresh process, (peak RSS while loading - RSS just before)
  / bytes of the safetensors files.

Warm-up runs are not timed; each figure is the median of ``--repeats`` runs,
ours and transformers' interleaved so a busy machine slows both alike. Prints
one JSON object. Run ``python -m nvl_jax.bench.llm --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import platform
import statistics
import subprocess
import sys
import tempfile
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nvl_jax.bench.llm", description=__doc__.split("\n\n")[0],
        epilog="Prints one JSON object: decode_speedup_vs_torch (the smaller of the per-batch ratios), "
               "load_peak_memory_over_size, tokens/s per side and batch size, device and versions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--width", type=int, default=512, help="hidden size")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--kv_heads", type=int, default=4, help="key/value heads (grouped-query attention)")
    p.add_argument("--intermediate", type=int, default=1376, help="MLP width")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    p.add_argument("--prompt_len", type=int, default=32, help="prompt tokens per row")
    p.add_argument("--new_tokens", type=int, default=128, help="new tokens per row")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8], help="batch sizes to time")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the median is reported)")
    p.add_argument("--shard_size", default="50MB", help="max_shard_size of the saved checkpoint")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the random weights and prompts")
    p.add_argument("--measure_load", metavar="FOLDER", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _import_torch():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise SystemExit(f"this benchmark compares against PyTorch: install torch and transformers ({e})") from e
    return torch, transformers


def build_checkpoint(args: argparse.Namespace, folder: Path):
    """Saves a seeded random transformers Llama to ``folder`` (sharded); returns the torch model."""
    torch, transformers = _import_torch()
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.prompt_len + args.new_tokens), rms_norm_eps=1e-5,
        # No EOS: both sides generate every requested token with no stopping logic in the way.
        bos_token_id=1, eos_token_id=None, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, max_shard_size=args.shard_size)
    return model


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def _peak_rss_bytes() -> int:
    """Peak RSS since the last reset (VmHWM), falling back to the process-lifetime peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_load(folder: str) -> dict:
    """Loads ``folder`` in this (fresh) process and reports the resident memory it took."""
    import jax
    import psutil
    from flax import nnx

    from nvl_jax.models.llama import LlamaForCausalLM

    jax.devices()  # the runtime's own memory belongs to the baseline
    try:  # resets VmHWM so the peak is the load's alone
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = psutil.Process().memory_info().rss
    model = LlamaForCausalLM.from_pretrained(folder)
    jax.block_until_ready(nnx.state(model))
    return {"rss_before": before, "peak_rss": _peak_rss_bytes()}


def load_memory(folder: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "nvl_jax.bench.llm", "--measure_load", str(folder)],
                            capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"loading {folder} in a subprocess failed:\n{result.stderr}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    size = checkpoint_bytes(folder)
    return {"checkpoint_bytes": size, "load_peak_bytes": measured["peak_rss"] - measured["rss_before"],
            "load_peak_memory_over_size": (measured["peak_rss"] - measured["rss_before"]) / size}


def _median_seconds(fns: dict, repeats: int) -> dict:
    """Median wall time of each callable; one untimed warm-up each, timed runs interleaved."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run(args: argparse.Namespace) -> dict:
    torch, transformers = _import_torch()
    torch.set_num_threads(os.cpu_count())
    import jax
    import numpy as np

    from nvl_jax.models.llama import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        torch_model = build_checkpoint(args, folder)
        memory = load_memory(folder)
        memory["checkpoint_shards"] = len(list(folder.glob("*.safetensors")))
        model = LlamaForCausalLM.from_pretrained(folder)

    speed: dict = {}

    rng = np.random.default_rng(args.seed)
    for batch in args.batch_sizes:
        ids = rng.integers(3, args.vocab, (batch, args.prompt_len), dtype=np.int32)
        torch_ids = torch.from_numpy(ids.astype(np.int64))

        def ours(new_tokens: int, ids=ids):
            out = model.generate(input_ids=ids, max_new_tokens=new_tokens, eos_token_id=())
            assert out.sequences.shape == (len(ids), new_tokens)

        def reference(new_tokens: int, ids=torch_ids):
            with torch.inference_mode():
                out = torch_model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                    max_new_tokens=new_tokens, pad_token_id=0)
            assert out.shape == (len(ids), ids.shape[1] + new_tokens)

        n = args.new_tokens
        t = _median_seconds({"jax_decode": lambda: ours(n), "torch_decode": lambda: reference(n),
                             "jax_prefill": lambda: ours(1), "torch_prefill": lambda: reference(1)}, args.repeats)
        speed[f"decode_speedup_vs_torch_b{batch}"] = t["torch_decode"] / t["jax_decode"]
        speed[f"prefill_speedup_vs_torch_b{batch}"] = t["torch_prefill"] / t["jax_prefill"]
        for side in ("jax", "torch"):
            speed[f"decode_tokens_per_s_{side}_b{batch}"] = batch * n / t[f"{side}_decode"]
            speed[f"prefill_tokens_per_s_{side}_b{batch}"] = batch * args.prompt_len / t[f"{side}_prefill"]

    return {
        "decode_speedup_vs_torch": min(speed[f"decode_speedup_vs_torch_b{b}"] for b in args.batch_sizes),
        "load_peak_memory_over_size": memory.pop("load_peak_memory_over_size"),
        **speed, **memory,
        "device": f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}, "
                  f"{os.cpu_count()} cores)",
        "jax_version": jax.__version__, "torch_version": torch.__version__,
        "transformers_version": transformers.__version__, "torch_threads": torch.get_num_threads(),
        "config": {k: v for k, v in vars(args).items() if k != "measure_load"},
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.measure_load:
        print(json.dumps(measure_load(args.measure_load)))
        return
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
