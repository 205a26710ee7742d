"""One UNet forward, ours (jitted) against diffusers' PyTorch ``UNet2DConditionModel``, same weights.

The model is a mid-size random Stable unCLIP UNet: block_out_channels (128, 256, 512, 512),
2 layers per block, 64-wide heads, cross-attention to 77 tokens of width 1024, class labels of
width 1536, a 64x64 latent, batch 2. ``--quick`` shrinks it for a smoke test. Prints one JSON
object: median seconds per forward of each, their ratio, and the largest output difference.

    python -m nvl_jax.bench.unet_forward [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nvl_jax.models.unet import UNet2DConditionModel


def unclip_config(block_out_channels=(128, 256, 512, 512), layers_per_block: int = 2, head_width: int = 64,
                  cross_attention_dim: int = 1024, class_dim: int = 1536) -> dict:
    """diffusers ``UNet2DConditionModel`` kwargs of a Stable unCLIP-shaped UNet of the given widths."""
    return dict(
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (len(block_out_channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(block_out_channels) - 1),
        attention_head_dim=[c // head_width for c in block_out_channels], cross_attention_dim=cross_attention_dim,
        use_linear_projection=True, upcast_attention=True, class_embed_type="projection",
        projection_class_embeddings_input_dim=class_dim, norm_num_groups=32)


def quick_config() -> dict:
    """A tiny unCLIP-shaped UNet for smoke tests."""
    return dict(unclip_config((32, 64), 1, head_width=16, cross_attention_dim=32, class_dim=24), norm_num_groups=8)


def _median_seconds(run, repeats: int) -> float:
    run()  # warm-up (and, for ours, compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(config: dict, batch: int, size: int, tokens: int = 77, repeats: int = 3) -> dict:
    """Median seconds of one forward in diffusers (torch, eval, no grad) and ours (jitted), same weights."""
    import diffusers
    import torch

    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**config).eval()
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((batch, size, size, config.get("in_channels", 4))).astype(np.float32)
    timesteps = rng.integers(0, 1000, batch)
    context = rng.standard_normal((batch, tokens, config["cross_attention_dim"])).astype(np.float32)
    labels = rng.standard_normal((batch, config["projection_class_embeddings_input_dim"])).astype(np.float32)

    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(Path(tmp))
        model = UNet2DConditionModel.from_pretrained(tmp)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, sample, timesteps, context, labels):
        return nnx.merge(graphdef, state)(sample, timesteps, context, labels).sample

    torch_inputs = (torch.from_numpy(np.ascontiguousarray(sample.transpose(0, 3, 1, 2))),
                    torch.from_numpy(timesteps), torch.from_numpy(context))
    torch_labels = torch.from_numpy(labels)
    jax_inputs = [jnp.asarray(x) for x in (sample, timesteps, context, labels)]
    outputs = {}

    def run_torch():
        with torch.inference_mode():
            outputs["torch"] = reference(*torch_inputs, class_labels=torch_labels).sample

    def run_jax():
        outputs["jax"] = forward(state, *jax_inputs).block_until_ready()

    torch_s = _median_seconds(run_torch, repeats)
    jax_s = _median_seconds(run_jax, repeats)
    expected = outputs["torch"].permute(0, 2, 3, 1).numpy()
    return {"torch_s": round(torch_s, 4), "jax_s": round(jax_s, 4), "speedup_vs_torch": round(torch_s / jax_s, 3),
            "max_abs_diff": float(np.abs(np.asarray(outputs["jax"]) - expected).max())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny UNet and a 16x16 latent (smoke test)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards after one warm-up (median)")
    args = parser.parse_args(argv)
    config, size = (quick_config(), 16) if args.quick else (unclip_config(), 64)
    print(json.dumps({"batch": 2, "latent": size, **compare(config, batch=2, size=size, repeats=args.repeats)}))


if __name__ == "__main__":
    main()
