"""The stage-2 benchmark: a brain-language train step and brain-prefixed greedy decoding, JAX against PyTorch.

The model is SmolLM2-135M's architecture (30 layers, width 576, 9 query / 3 key-value heads,
MLP 1536, vocabulary 49152, tied embeddings; the demo's LLM) with random weights, and the
``mlp2x_gelu`` projector from the extractor's width. The brain tokens are a random
``[batch, brain_tokens, brain_width]`` array standing for the frozen ViT3D's penultimate hidden
states; the default 33 are the demo's (``configs/demo.py``: 32 active patches of 10^3 on in-silico
subj01's half-resolution grid, plus CLS), width 128 its extractor's. A sample is its brain tokens
followed by a random answer of ``answer_tokens`` tokens, supervised on the answer alone.

- ``train_step_speedup_vs_torch``: one full fine-tuning step (LLM and projector, AdamW) as
  transformers runs it (``LlamaForCausalLM(inputs_embeds=, attention_mask=, labels=)`` with labels
  -100 on the brain tokens, ``nn.Sequential(Linear, GELU, Linear)``, ``torch.optim.AdamW``,
  eager) over ours (``steps.make_train_step``, the trainer's jitted step with donated state, on a
  loss that merges the brain tokens at ``<image>`` and takes ``brain_lm.next_token_loss``).
- ``train_step_matmul_peak_fraction``: our step's matmul FLOPs (counted analytically,
  ``train_step_flops``; XLA's own count is reported next to it) per second over this device's
  dense float32 matmul rate (``train_step.matmul_flops_per_s``).
- ``prefixed_decode_speedup_vs_torch``: new tokens per second of greedy generation after the
  projected brain tokens (prefill included, no early stop): ours (``generate(inputs_embeds=)``,
  KV cache) over transformers' ``generate(inputs_embeds=, do_sample=False)``.

Both sides load one checkpoint (transformers' seeded random init, saved as safetensors) and
compute in float32. Each runs in its own process, as its users run it: ours under
``runtime.keep_freed_memory`` (as ``python -m nvl_jax.train``), PyTorch under glibc's defaults
with ``torch.set_num_threads(os.cpu_count())`` (``--torch_threads``). Figures are medians of
``--repeats`` runs after one untimed warm-up, the two processes taking turns so that a busy
machine slows both alike, each timed run after ``SETTLE_SECONDS`` idle (so that the other side's
threads have stopped spinning). The load average before and after is reported, and the ratios of the
best runs next to those of the medians: on a loaded machine PyTorch's eager threads stall far
more than XLA's. Decoding runs first, then training, so both first losses are those of the same
step-0 weights. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from nvl_jax import runtime
from nvl_jax import sharding as sharding_lib
from nvl_jax.bench.train_step import ADAMW, matmul_flops_per_s
from nvl_jax.models import brain_lm, layers
from nvl_jax.models.brain_lm import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from nvl_jax.models.llama import LlamaConfig, LlamaForCausalLM, RopeConfig

PROJECTOR_FILE = "projector.safetensors"
SETTLE_SECONDS = 1.0  # idle time before each timed run


def llama_config(sizes: dict) -> LlamaConfig:
    """Our config of the benchmarked LLM (SmolLM2-135M's rope theta and norm epsilon, tied, no EOS)."""
    return LlamaConfig(vocab_size=sizes["vocab"], hidden_size=sizes["width"], intermediate_size=sizes["intermediate"],
                       num_layers=sizes["layers"], num_heads=sizes["heads"], num_kv_heads=sizes["kv_heads"],
                       head_dim=sizes["width"] // sizes["heads"], rms_norm_eps=1e-5, rope=RopeConfig(theta=1e5),
                       max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=None,
                       eos_token_ids=(), pad_token_id=0)


def train_step_flops(sizes: dict) -> int:
    """Matmul FLOPs of one train step (norms, softmax, the embedding lookup and AdamW not counted).

    A matmul of ``m x k`` by ``k x n`` is ``2 m k n`` FLOPs forward and twice that backward (input
    and weight gradients), so the step is 3x the forward, except the projector's first layer, whose
    input (the brain tokens) needs no gradient: 2x. Per token of width ``d``: q/k/v/o projections
    ``d (2 heads + 2 kv_heads) head_dim``, SwiGLU ``3 d intermediate``, the tied LM head ``d vocab``
    multiply-adds; per sequence of ``T = brain_tokens + answer_tokens`` and layer, attention's
    ``q k^T`` and ``p v``, ``2 T^2 heads head_dim`` (the full square, which both sides compute).
    """
    d, head_dim = sizes["width"], sizes["width"] // sizes["heads"]
    tokens = sizes["batch"] * (sizes["brain_tokens"] + sizes["answer_tokens"])
    per_token = (d * (2 * sizes["heads"] + 2 * sizes["kv_heads"]) * head_dim + 3 * d * sizes["intermediate"])
    attention = sizes["batch"] * 2 * (sizes["brain_tokens"] + sizes["answer_tokens"]) ** 2 * sizes["heads"] * head_dim
    llm = sizes["layers"] * (tokens * per_token + attention) + tokens * d * sizes["vocab"]
    brain = sizes["batch"] * sizes["brain_tokens"]
    return 2 * (3 * (llm + brain * d * d) + 2 * brain * sizes["brain_width"] * d)


def random_batch(sizes: dict) -> dict[str, np.ndarray]:
    """brain_tokens ``float32 [batch, N, brain_width]`` and answer ``int32 [batch, answer_tokens]``."""
    rng = np.random.default_rng(sizes["seed"])
    return {"brain_tokens": rng.standard_normal((sizes["batch"], sizes["brain_tokens"], sizes["brain_width"]),
                                                np.float32),
            "answer": rng.integers(0, sizes["vocab"], (sizes["batch"], sizes["answer_tokens"]), dtype=np.int32)}


def write_checkpoint(sizes: dict, folder: Path) -> None:
    """Saves transformers' seeded random init of the LLM (``save_pretrained``) and of the projector
    (``PROJECTOR_FILE``: ``0.weight [hidden, brain_width]``, ``0.bias``, ``2.weight``, ``2.bias``)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(sizes["seed"])
    config = llama_config(sizes)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope.theta,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=True,
        # No EOS: both sides generate every requested token.
        bos_token_id=None, eos_token_id=None, pad_token_id=0)
    transformers.LlamaForCausalLM(hf_config).save_pretrained(folder)
    save_file(_torch_projector(sizes).state_dict(), str(folder / PROJECTOR_FILE))


def _torch_projector(sizes: dict):
    import torch

    return torch.nn.Sequential(torch.nn.Linear(sizes["brain_width"], sizes["width"]), torch.nn.GELU(),
                               torch.nn.Linear(sizes["width"], sizes["width"]))


# ---- ours --------------------------------------------------------------------------------------------


class ProjectedLM(nnx.Module):
    """What stage 2 trains when the extractor is frozen: ``projector`` and ``llm`` (``BrainLanguageModel``'s
    names), fed the extractor's penultimate hidden states directly."""

    def __init__(self, projector: brain_lm.Projector, llm: LlamaForCausalLM):
        self.projector = projector
        self.llm = llm


class BrainPrefixTask:
    """What ``steps.make_train_step`` asks of a task (``config.seed``, ``mesh``, ``rules``, ``batch_shardings``,
    ``loss``) for
    a batch of ``brain_tokens [batch, N, brain_width]`` and text ``input_ids``, ``attention_mask``,
    ``labels`` ``[batch, 1 + answer_tokens]``, each row's ``<image>`` placeholder first."""

    def __init__(self, mesh: jax.sharding.Mesh, seed: int):
        self.mesh, self.config = mesh, ml_collections.ConfigDict({"seed": seed})
        self.rules = sharding_lib.DEFAULT_RULES

    def batch_shardings(self) -> dict[str, jax.sharding.NamedSharding]:
        ndims = {"brain_tokens": 3, "input_ids": 2, "attention_mask": 2, "labels": 2}
        return {k: sharding_lib.batch_sharding(self.mesh, n) for k, n in ndims.items()}

    def loss(self, model: ProjectedLM, batch, constants, dropout_key):
        """Stage 2's loss (``tasks.stage2.Task.loss``) after the extractor."""
        embeds = model.llm.embed(brain_lm.text_ids(batch["input_ids"]))
        embeds, mask, labels = brain_lm.merge_brain_tokens(
            embeds, batch["input_ids"], model.projector(batch["brain_tokens"]), batch["attention_mask"],
            batch["labels"])
        loss, count = brain_lm.next_token_loss(model.llm(inputs_embeds=embeds, attention_mask=mask).logits, labels)
        return loss, {"loss": loss, "supervised_tokens": count.astype(jnp.float32)}


def text_batch(answer: np.ndarray) -> dict[str, np.ndarray]:
    """``<image>`` then the answer: input_ids, attention_mask, labels ``[batch, 1 + answer_tokens]``."""
    batch = len(answer)
    input_ids = np.concatenate([np.full((batch, 1), IMAGE_TOKEN_INDEX, np.int32), answer], axis=1)
    labels = np.concatenate([np.full((batch, 1), IGNORE_INDEX, np.int32), answer], axis=1)
    return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids), "labels": labels}


def _load_ours(sizes: dict, folder: Path) -> ProjectedLM:
    from safetensors.numpy import load_file

    weights = load_file(str(folder / PROJECTOR_FILE))
    projector = brain_lm.Projector(sizes["brain_width"], sizes["width"], rngs=nnx.Rngs(0))
    for layer, prefix in ((projector.linear_1, "0"), (projector.linear_2, "2")):
        layer.kernel[...] = jnp.asarray(weights[f"{prefix}.weight"].T)
        layer.bias[...] = jnp.asarray(weights[f"{prefix}.bias"])
    return ProjectedLM(projector, LlamaForCausalLM.from_pretrained(folder))


def _jax_side(sizes: dict, folder: Path, data: dict[str, np.ndarray]):
    from nvl_jax.training import state as state_lib
    from nvl_jax.training import steps

    layers.set_custom_backward(sizes["custom_backward"])
    model = _load_ours(sizes, folder)
    mesh = sharding_lib.make_mesh(devices=jax.devices()[:1])
    task = BrainPrefixTask(mesh, sizes["seed"])
    tx = optax.adamw(**ADAMW)
    config = model.llm.config
    layout = state_lib.plan(lambda: ProjectedLM(brain_lm.Projector(sizes["brain_width"], sizes["width"],
                                                                   rngs=nnx.Rngs(0)), LlamaForCausalLM(config)),
                            nnx.Param, tx, mesh, sharding_lib.DEFAULT_RULES)

    prefix = np.asarray(model.projector(jnp.asarray(data["brain_tokens"][:sizes["decode_batch"]])))

    def decode():
        out = model.llm.generate(inputs_embeds=prefix, max_new_tokens=sizes["new_tokens"], eos_token_id=())
        return np.asarray(out.sequences).tolist()

    _, params, frozen = nnx.split(model, nnx.Param, ...)
    holder = {"params": jax.device_put(params, layout.param_shardings),
              "frozen": jax.device_put(frozen, layout.frozen_shardings)}
    holder["opt_state"] = state_lib.init_optimizer(tx, holder["params"], layout)
    batch = jax.device_put({"brain_tokens": data["brain_tokens"], **text_batch(data["answer"])},
                           task.batch_shardings())
    step_number = steps.step_counter(0)
    compiled = steps.make_train_step(task, layout, tx).lower(
        holder["params"], holder["opt_state"], holder["frozen"], batch, None, step_number).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost

    def train():
        # The step's arguments are donated: the model above is decoded from before the first step only.
        holder["params"], holder["opt_state"], metrics = compiled(holder["params"], holder["opt_state"],
                                                                  holder["frozen"], batch, None, step_number)
        return float(metrics["loss"])

    return {"decode": decode, "train": train}, {
        "step_flops_xla_cost_analysis": float(cost.get("flops", float("nan"))),
        "matmul_flops_per_s": matmul_flops_per_s(),
        "custom_backward": layers.use_custom_backward(),
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}", "jax_version": jax.__version__}


# ---- PyTorch -----------------------------------------------------------------------------------------


def _torch_side(sizes: dict, folder: Path, data: dict[str, np.ndarray]):
    import torch
    import transformers
    from safetensors.torch import load_file

    torch.set_num_threads(sizes["torch_threads"])
    llm = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    projector = _torch_projector(sizes)
    projector.load_state_dict(load_file(str(folder / PROJECTOR_FILE)))
    optimizer = torch.optim.AdamW([*llm.parameters(), *projector.parameters()], lr=ADAMW["learning_rate"],
                                  betas=(ADAMW["b1"], ADAMW["b2"]), eps=ADAMW["eps"],
                                  weight_decay=ADAMW["weight_decay"])
    brain = torch.from_numpy(data["brain_tokens"])
    answer = torch.from_numpy(data["answer"]).long()
    labels = torch.cat([torch.full(brain.shape[:2], IGNORE_INDEX), answer], dim=1)
    mask = torch.ones_like(labels)
    with torch.no_grad():
        prefix = projector(brain[:sizes["decode_batch"]])

    def decode():
        llm.eval()
        with torch.inference_mode():
            out = llm.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                               do_sample=False, use_cache=True, max_new_tokens=sizes["new_tokens"],
                               min_new_tokens=sizes["new_tokens"], pad_token_id=0)
        return out.tolist()

    def train():
        llm.train()
        optimizer.zero_grad(set_to_none=True)
        embeds = torch.cat([projector(brain), llm.get_input_embeddings()(answer)], dim=1)
        loss = llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    return {"decode": decode, "train": train}, {
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "attention_implementation": llm.config._attn_implementation}


# ---- the two processes -------------------------------------------------------------------------------

_REPLY = "@@stage2 "  # marks the worker's protocol lines among whatever else the libraries print


def _worker(side: str, sizes: dict, folder: str, keep_memory: bool) -> None:
    """One side's process: loads the checkpoint, then per ``decode`` or ``train`` line on stdin runs that
    and replies (one line) its result, wall and kernel seconds and minor page faults."""
    kept = runtime.keep_freed_memory() if keep_memory else False  # before any JAX or PyTorch thread exists
    data = random_batch(sizes)
    runs, info = (_jax_side if side == "jax" else _torch_side)(sizes, Path(folder), data)
    print(_REPLY + json.dumps({**info, "keeps_freed_memory": kept}), flush=True)
    for line in sys.stdin:
        run = runs[line.strip()]
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        result = run()
        seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        print(_REPLY + json.dumps({"result": result, "seconds": seconds, "system": after.ru_stime - before.ru_stime,
                                   "faults": after.ru_minflt - before.ru_minflt}), flush=True)


class _Side:
    """A running ``_worker`` process."""

    def __init__(self, side: str, sizes: dict, folder: Path, keep_memory: bool):
        self.side = side
        command = [sys.executable, "-m", "nvl_jax.bench.stage2", "--worker", side, "--sizes", json.dumps(sizes),
                   "--checkpoint", str(folder)]
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

    def run(self, what: str) -> dict:
        self.process.stdin.write(what + "\n")
        self.process.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def _taking_turns(sides: dict[str, _Side], what: str, repeats: int) -> dict[str, dict]:
    """One untimed warm-up per side, then ``repeats`` rounds running each side once.

    Per side: the warm-up's result, the median and best wall seconds, and the mean kernel seconds
    and minor page faults per run.
    """
    first = {name: side.run(what)["result"] for name, side in sides.items()}
    replies = {name: [] for name in sides}
    for _ in range(repeats):
        for name, side in sides.items():
            # The other side's thread pool may still be spinning for work it will not get: let it sleep.
            time.sleep(SETTLE_SECONDS)
            replies[name].append(side.run(what))
    return {name: {"first": first[name], "seconds": statistics.median(r["seconds"] for r in runs),
                   "best": min(r["seconds"] for r in runs),
                   "system": statistics.fmean(r["system"] for r in runs),
                   "faults": statistics.fmean(r["faults"] for r in runs)}
            for name, runs in replies.items()}


def measure(sizes: dict, repeats: int) -> dict:
    """Runs both sides on one fresh checkpoint; returns the report described in the module docstring."""
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_checkpoint(sizes, folder)
        sides = {}
        try:
            sides["jax"] = _Side("jax", sizes, folder, keep_memory=True)
            sides["torch"] = _Side("torch", sizes, folder, keep_memory=False)
            decode = _taking_turns(sides, "decode", repeats)
            train = _taking_turns(sides, "train", repeats)
        finally:
            for side in sides.values():
                side.close()
    jax_info, torch_info = sides["jax"].info, sides["torch"].info
    flops = train_step_flops(sizes)
    new_tokens = sizes["decode_batch"] * sizes["new_tokens"]
    ours, theirs = np.asarray(decode["jax"]["first"]), np.asarray(decode["torch"]["first"])
    report = {
        "train_step_speedup_vs_torch": train["torch"]["seconds"] / train["jax"]["seconds"],
        "train_step_matmul_peak_fraction": flops / train["jax"]["seconds"] / jax_info["matmul_flops_per_s"],
        "prefixed_decode_speedup_vs_torch": decode["torch"]["seconds"] / decode["jax"]["seconds"],
        # Best over best: what is left of each ratio when the machine's other load is least in the way.
        "train_step_speedup_vs_torch_best": train["torch"]["best"] / train["jax"]["best"],
        "prefixed_decode_speedup_vs_torch_best": decode["torch"]["best"] / decode["jax"]["best"],
        "step_flops": flops, "step_flops_xla_cost_analysis": jax_info["step_flops_xla_cost_analysis"],
        "matmul_flops_per_s": jax_info["matmul_flops_per_s"],
        # Greedy tokens both sides chose alike, from the same weights and prefix: a check, not a speed.
        "decode_tokens_agree": float((ours == theirs).mean()) if ours.shape == theirs.shape else 0.0,
    }
    for side in ("jax", "torch"):
        step, gen = train[side], decode[side]
        report.update({
            f"step_seconds_{side}": step["seconds"], f"step_seconds_{side}_best": step["best"],
            f"flops_per_s_{side}": flops / step["seconds"], f"first_step_loss_{side}": step["first"],
            f"system_seconds_per_step_{side}": step["system"], f"page_faults_per_step_{side}": step["faults"],
            f"decode_seconds_{side}": gen["seconds"], f"decode_seconds_{side}_best": gen["best"],
            f"decode_tokens_per_s_{side}": new_tokens / gen["seconds"],
            f"keeps_freed_memory_{side}": sides[side].info["keeps_freed_memory"],
        })
    report.update({
        "sizes": sizes, "tokens_per_sample": sizes["brain_tokens"] + sizes["answer_tokens"], "repeats": repeats,
        "custom_backward": jax_info["custom_backward"],
        "torch_attention_implementation": torch_info["attention_implementation"],
        "load_average_before": load_before[0], "load_average_after": os.getloadavg()[0],
        "device": jax_info["device"], "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(), "jax_version": jax_info["jax_version"],
        "torch_version": torch_info["torch_version"], "transformers_version": torch_info["transformers_version"],
        "torch_threads": torch_info["torch_threads"],
    })
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nvl_jax.bench.stage2", description=__doc__.split("\n\n")[0],
        epilog="Prints one JSON object: train_step_speedup_vs_torch, train_step_matmul_peak_fraction, "
               "prefixed_decode_speedup_vs_torch, step seconds, FLOP/s and decode tokens/s per side, the "
               "first losses of both sides, the load average. The defaults are SmolLM2-135M and the demo's "
               "brain tokens.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=30, help="LLM decoder layers")
    p.add_argument("--width", type=int, default=576, help="LLM hidden size")
    p.add_argument("--heads", type=int, default=9, help="LLM attention heads")
    p.add_argument("--kv_heads", type=int, default=3, help="LLM key/value heads")
    p.add_argument("--intermediate", type=int, default=1536, help="LLM MLP width")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary size")
    p.add_argument("--brain_tokens", type=int, default=33,
                   help="brain tokens per sample (the demo's: 32 active patches at patch 10, plus CLS)")
    p.add_argument("--brain_width", type=int, default=128, help="the extractor's width (the projector's input)")
    p.add_argument("--answer_tokens", type=int, default=32, help="supervised answer tokens per sample")
    p.add_argument("--batch", type=int, default=4, help="samples per train step")
    p.add_argument("--decode_batch", type=int, default=4, help="prompts decoded together")
    p.add_argument("--new_tokens", type=int, default=32, help="greedy tokens generated per prompt")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure and side (the median is reported)")
    p.add_argument("--torch_threads", type=int, default=os.cpu_count(),
                   help="PyTorch's intra-op threads (on a loaded machine 1 avoids its threads' stalls)")
    p.add_argument("--custom_backward", choices=layers.CUSTOM_BACKWARD_MODES, default="auto",
                   help="our layers' backward passes: hand-written (auto: on CPU) or autodiff")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--sizes", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--keep_memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker and args.decode_batch > args.batch:
        p.error(f"--decode_batch {args.decode_batch} must be at most --batch {args.batch}: its prompts are the "
                "train batch's first brain tokens")
    if not args.worker and args.width % args.heads:
        p.error(f"--width {args.width} must be a multiple of --heads {args.heads}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        _worker(args.worker, json.loads(args.sizes), args.checkpoint, args.keep_memory)
        return
    sizes = {k: getattr(args, k) for k in ("layers", "width", "heads", "kv_heads", "intermediate", "vocab",
                                           "brain_tokens", "brain_width", "answer_tokens", "batch", "decode_batch",
                                           "new_tokens", "torch_threads", "custom_backward", "seed")}
    print(json.dumps(measure(sizes, args.repeats), indent=1))


if __name__ == "__main__":
    main()
