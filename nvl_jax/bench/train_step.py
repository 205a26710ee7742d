"""Speed of one stage-1 train step (BrainEncoder, dual-stream loss, AdamW) in JAX and in PyTorch.

Reports, on this machine's default JAX device and in float32:

- ``matmul_flops_per_s``: the device's dense matmul rate, the best of several
  jitted ``[2048, 2048] x [2048, 2048]`` products;
- ``step_flops``: the train step's matmul FLOPs, counted analytically (formula in
  ``train_step_flops``), and XLA's own count of the compiled step for reference;
- ``flops_per_s`` and ``matmul_peak_fraction``: the jitted step's achieved rate
  (optax AdamW, donated state) over the matmul rate;
- ``speedup_vs_torch``: the PyTorch eager step time (``vit3d_torch``, same weights,
  same batch, ``torch.set_num_threads(os.cpu_count())``) over ours.

Each side runs in its own process, as its users run it: ours under
``runtime.keep_freed_memory`` (which ``python -m nvl_jax.train`` applies: glibc
keeps XLA's ~1 GB per-step scratch buffer mapped instead of faulting it in again
every step), PyTorch under glibc's defaults, its faster setting on this CPU
(``--same_allocator`` runs it under ours, to check). Step times are medians of
``repeats`` runs after one untimed warm-up, the two processes' runs interleaved
so a busy machine slows both alike; each side's kernel seconds and minor page
faults per step are reported too.

Prints one JSON object. Run ``python -m nvl_jax.bench.train_step --help`` for the options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nvl_jax import runtime
from nvl_jax.models.vit3d import BrainEncoder, ViT3DConfig, dual_stream_loss

ADAMW = {"learning_rate": 5e-4, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.01}

def matmul_flops_per_s(size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of the fastest of ``repeats`` jitted ``[size, size] x [size, size]`` float32 matmuls."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def train_step_flops(config: ViT3DConfig, batch: int, n_active: int) -> int:
    """Matmul FLOPs of one train step (elementwise work, softmax and AdamW not counted).

    A matmul of ``m x k`` by ``k x n`` is ``2 m k n`` FLOPs forward and twice that
    backward (input and weight gradients), so a step is 3x the forward, except the
    patch embedding, whose input (the data) needs no gradient: 2x. Per layer, on
    ``batch * (1 + n_active)`` tokens of width ``d``: q/k/v and output projections
    ``4 d^2``, MLP ``2 * mlp_ratio * d^2`` multiply-adds per token, and attention's
    ``q k^T`` and ``p v``, ``2 (1 + n_active) d`` per token. The heads run on the
    CLS token only.
    """
    tokens, width = 1 + n_active, config.width
    layer = batch * tokens * (4 + 2 * config.mlp_ratio) * width**2 + 2 * batch * tokens**2 * width
    heads = batch * config.head_hidden * (2 * width + config.clip_dim + math.prod(config.vae_latent_shape))
    embed = batch * n_active * config.patch_dim * width
    return 2 * (3 * (config.depth * layer + heads) + 2 * embed)


def random_batch(config: ViT3DConfig, batch: int, n_active: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random patches and targets; the first ``n_active`` grid positions in C order."""
    if not 0 < n_active <= config.num_positions:
        raise ValueError(f"n_active {n_active} must be in [1, {config.num_positions}] for grid {config.patch_grid}")
    rng = np.random.default_rng(seed)
    coords = np.stack(np.unravel_index(np.arange(n_active), config.patch_grid), axis=-1).astype(np.int32)
    return {
        "patches": rng.standard_normal((batch, n_active, config.patch_dim), np.float32),
        "coords": coords,
        "clip_target": rng.standard_normal((batch, config.clip_dim), np.float32),
        "vae_target": rng.standard_normal((batch, *config.vae_latent_shape), np.float32),
    }


def jax_train_step(model: BrainEncoder):
    """``(step, state)``: a jitted AdamW step ``step(state, batch) -> (state, loss)`` with donated state."""
    optimizer = nnx.Optimizer(model, optax.adamw(**ADAMW), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            output = model(batch["patches"], batch["coords"])
            return dual_stream_loss(output, batch["clip_target"], batch["vae_target"])[0]

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    return jax.jit(step, donate_argnums=0), state


def _torch_side(model: BrainEncoder, config: ViT3DConfig, batch: dict[str, np.ndarray]):
    """The PyTorch twin with ``model``'s weights and a closure running one of its train steps."""
    import torch

    from nvl_jax.bench import vit3d_torch

    torch.set_num_threads(os.cpu_count())
    torch_model = vit3d_torch.load_from_nnx(vit3d_torch.BrainEncoder(config), model).train()
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=ADAMW["learning_rate"],
                                  betas=(ADAMW["b1"], ADAMW["b2"]), eps=ADAMW["eps"],
                                  weight_decay=ADAMW["weight_decay"])
    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    tensors["coords"] = tensors["coords"].long()

    def step():
        return float(vit3d_torch.train_step(torch_model, optimizer, tensors["patches"], tensors["coords"],
                                            tensors["clip_target"], tensors["vae_target"]))

    return step, {"torch_version": torch.__version__}


def _jax_side(model: BrainEncoder, config: ViT3DConfig, batch: dict[str, np.ndarray]):
    """Our jitted step, compiled, and a closure running it; with XLA's FLOP count and the matmul rate."""
    step, state = jax_train_step(model)
    device_batch = jax.device_put(batch)
    compiled = step.lower(state, device_batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    holder = {"state": state}

    def run():
        holder["state"], loss = compiled(holder["state"], device_batch)
        return float(loss)

    return run, {"step_flops_xla_cost_analysis": float(cost.get("flops", float("nan"))),
                 "matmul_flops_per_s": matmul_flops_per_s(),
                 "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
                 "jax_version": jax.__version__}


_REPLY = "@@bench "  # marks the worker's protocol lines among whatever else the libraries print


def _worker(side: str, sizes: dict, keep_memory: bool) -> None:
    """One side's process: builds the model and its step, then runs a step per ``run`` line on stdin.

    The allocator setting comes first, before any JAX or PyTorch thread exists.
    Replies (one line each): the setup info, then per run its result, wall and
    kernel seconds and minor page faults (``getrusage``: every thread of the process).
    """
    kept = runtime.keep_freed_memory() if keep_memory else False
    config = dataclasses.replace(ViT3DConfig.paper(sizes["patch_size"]), width=sizes["width"],
                                 depth=sizes["layers"], num_heads=sizes["heads"])
    data = random_batch(config, sizes["batch"], sizes["n_active"], sizes["seed"])
    model = BrainEncoder(config, rngs=nnx.Rngs(sizes["seed"]))  # same seed, same weights on both sides
    run, info = (_jax_side if side == "jax" else _torch_side)(model, config, data)
    print(_REPLY + json.dumps({**info, "keeps_freed_memory": kept}), flush=True)
    for _ in sys.stdin:
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        result = run()
        seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        print(_REPLY + json.dumps({"result": result, "seconds": seconds, "system": after.ru_stime - before.ru_stime,
                                   "faults": after.ru_minflt - before.ru_minflt}), flush=True)


class _Side:
    """A running ``_worker`` process."""

    def __init__(self, side: str, sizes: dict, keep_memory: bool):
        self.side = side
        command = [sys.executable, "-m", "nvl_jax.bench.train_step", "--worker", side, "--sizes", json.dumps(sizes)]
        if keep_memory:
            command.append("--keep_memory")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._reply()

    def _reply(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY):])
        raise RuntimeError(f"the benchmark worker {self.side} exited with {self.process.wait()} "
                           "(its error is printed above)")

    def run(self) -> dict:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def _interleaved_runs(sides: dict[str, _Side], repeats: int) -> dict[str, dict]:
    """One untimed warm-up per side, then ``repeats`` rounds running each side once.

    Per side: its first (warm-up) result, the wall times, and the mean kernel
    seconds and minor page faults per run.
    """
    stats = {name: {"first": side.run()["result"], "times": [], "system": 0.0, "faults": 0.0}
             for name, side in sides.items()}
    for _ in range(repeats):
        for name, side in sides.items():
            reply = side.run()
            stats[name]["times"].append(reply["seconds"])
            stats[name]["system"] += reply["system"] / repeats
            stats[name]["faults"] += reply["faults"] / repeats
    return stats


def measure(layers: int = 8, width: int = 512, heads: int = 8, n_active: int = 288, patch_size: int = 14,
            batch: int = 8, repeats: int = 5, compare_torch: bool = True, seed: int = 0,
            same_allocator: bool = False) -> dict:
    """Times the stage-1 train step at this size; returns the report described in the module docstring.

    Each side runs in its own process: JAX as ``nvl_jax.train`` runs it (``runtime.keep_freed_memory``),
    PyTorch with glibc's default allocator, or under ours as well with ``same_allocator``.
    """
    sizes = {"layers": layers, "width": width, "heads": heads, "n_active": n_active, "patch_size": patch_size,
             "batch": batch, "seed": seed}
    sides = {"jax": _Side("jax", sizes, keep_memory=True)}
    try:
        if compare_torch:
            sides["torch"] = _Side("torch", sizes, keep_memory=same_allocator)
        stats = _interleaved_runs(sides, repeats)
    finally:
        for side in sides.values():
            side.close()
    config = dataclasses.replace(ViT3DConfig.paper(patch_size), width=width, depth=layers, num_heads=heads)
    flops = train_step_flops(config, batch, n_active)
    jax_info = sides["jax"].info
    report = {**sizes, "tokens": n_active + 1, "repeats": repeats,
              "matmul_flops_per_s": jax_info["matmul_flops_per_s"], "step_flops": flops,
              "step_flops_xla_cost_analysis": jax_info["step_flops_xla_cost_analysis"]}
    if compare_torch:
        report["torch_version"] = sides["torch"].info["torch_version"]
    for side, s in stats.items():
        seconds = statistics.median(s["times"])
        report.update({
            f"step_seconds_{side}": seconds,
            f"step_seconds_{side}_best": min(s["times"]),
            f"flops_per_s_{side}": flops / seconds,
            f"samples_per_s_{side}": batch / seconds,
            f"first_step_loss_{side}": s["first"],
            f"system_seconds_per_step_{side}": s["system"],
            f"page_faults_per_step_{side}": s["faults"],
            f"keeps_freed_memory_{side}": sides[side].info["keeps_freed_memory"],
        })
    report["flops_per_s"] = report["flops_per_s_jax"]
    report["matmul_peak_fraction"] = report["flops_per_s_jax"] / report["matmul_flops_per_s"]
    if compare_torch:
        report["speedup_vs_torch"] = report["step_seconds_torch"] / report["step_seconds_jax"]
    report.update({"device": jax_info["device"], "cpu_count": os.cpu_count(),
                   "processor": platform.processor() or platform.machine(), "jax_version": jax_info["jax_version"]})
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nvl_jax.bench.train_step", description=__doc__.split("\n\n")[0],
        epilog="Prints one JSON object: matmul_peak_fraction, speedup_vs_torch, step times, FLOP/s, samples/s.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="transformer layers")
    p.add_argument("--width", type=int, default=512, help="hidden size")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--n_active", type=int, default=288, help="active patches (tokens = n_active + 1)")
    p.add_argument("--patch_size", type=int, default=14, help="patch edge P (patch_dim = P**3)")
    p.add_argument("--batch", type=int, default=8, help="samples per step")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per side (the median is reported)")
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch baseline")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch")
    p.add_argument("--same_allocator", action="store_true",
                   help="run PyTorch under nvl_jax's allocator setting too (it is slower there on CPU)")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--sizes", help=argparse.SUPPRESS)
    p.add_argument("--keep_memory", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        _worker(args.worker, json.loads(args.sizes), args.keep_memory)
        return
    print(json.dumps(measure(layers=args.layers, width=args.width, heads=args.heads, n_active=args.n_active,
                             patch_size=args.patch_size, batch=args.batch, repeats=args.repeats,
                             compare_torch=not args.no_torch, seed=args.seed,
                             same_allocator=args.same_allocator), indent=1))


if __name__ == "__main__":
    main()
