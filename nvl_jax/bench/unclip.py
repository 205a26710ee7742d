"""Stable unCLIP speed of the JAX pipeline against diffusers' PyTorch on CPU.

One random unCLIP (fixed seed, a mid-size UNet of Stable unCLIP's layout: linear-projection
transformers, class labels of twice the image-embedding width) is built with diffusers and
transformers classes and saved as a ``StableUnCLIPImg2ImgPipeline`` folder; ours loads that
folder. Then:

- unet: one UNet forward (``[batch, h, w, 4]`` latents, text context, class labels), ours jitted
  against diffusers' ``UNet2DConditionModel`` under ``torch.no_grad``;
- pipeline: the whole sampler (text encoding, image-embedding noising, ``--steps`` denoising
  steps with classifier-free guidance, VAE decoding) from the same injected noise at beta = 1,
  ours against ``StableUnCLIPImg2ImgPipeline(image_embeds=..., latents=...)``.

Warm-up runs are not timed; each figure is the median of ``--repeats`` runs, ours and diffusers'
interleaved so a busy machine slows both alike. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import platform
import statistics
import tempfile
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nvl_jax.bench.unclip", description=__doc__.split("\n\n")[0],
        epilog="Prints one JSON object: unet_speedup_vs_torch, pipeline_speedup_vs_torch, the seconds of each "
               "side, the largest pixel difference between the two pipelines' images, device and versions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--channels", type=int, nargs="+", default=[64, 128, 256, 256], help="UNet block_out_channels")
    p.add_argument("--heads", type=int, nargs="+", default=[2, 4, 8, 8],
                   help="attention heads per block (diffusers' attention_head_dim)")
    p.add_argument("--layers_per_block", type=int, default=1)
    p.add_argument("--text_width", type=int, default=256, help="text encoder width = the UNet's cross_attention_dim")
    p.add_argument("--embed_dim", type=int, default=256, help="CLIP image-embedding width")
    p.add_argument("--latent_size", type=int, default=32, help="latent height and width (pixels / 8)")
    p.add_argument("--batch", type=int, default=1, help="images per batch (guidance doubles the UNet's batch)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps of the pipeline")
    p.add_argument("--guidance", type=float, default=10.0, help="classifier-free guidance scale")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the median is reported)")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the random weights")
    return p.parse_args(argv)


def _import_torch():
    try:
        import diffusers
        import torch
        import transformers
    except ImportError as e:
        raise SystemExit(f"this benchmark compares against PyTorch: install torch, transformers and diffusers ({e})"
                         ) from e
    return torch, transformers, diffusers


def build_pipeline(args: argparse.Namespace, folder: Path):
    """Saves a seeded random ``StableUnCLIPImg2ImgPipeline`` to ``folder``; returns it."""
    torch, transformers, diffusers = _import_torch()
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    from nvl_jax.reconstruction import tiny_random

    torch.manual_seed(args.seed)
    n = len(args.channels)
    vocab = tiny_random.save_tokenizer(folder / "tokenizer")
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=args.text_width, intermediate_size=4 * args.text_width,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
        eos_token_id=vocab[tiny_random.END], bos_token_id=vocab[tiny_random.START],
        pad_token_id=vocab[tiny_random.END]))
    unet = diffusers.UNet2DConditionModel(
        sample_size=args.latent_size, down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1), block_out_channels=tuple(args.channels),
        layers_per_block=args.layers_per_block, cross_attention_dim=args.text_width,
        attention_head_dim=tuple(args.heads), use_linear_projection=True, upcast_attention=True,
        class_embed_type="projection", projection_class_embeddings_input_dim=2 * args.embed_dim)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=16,
                                  sample_size=8 * args.latent_size)
    image_encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, image_size=32,
        patch_size=16, projection_dim=args.embed_dim))
    pipe = diffusers.StableUnCLIPImg2ImgPipeline(
        feature_extractor=transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                          crop_size={"height": 32, "width": 32}),
        image_encoder=image_encoder, image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=args.embed_dim),
        image_noising_scheduler=diffusers.DDPMScheduler(
            **{k: v for k, v in tiny_random.IMAGE_NOISING_SCHEDULER.items() if k != "_class_name"}),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer"), text_encoder=text_encoder,
        unet=unet, vae=vae,
        scheduler=diffusers.PNDMScheduler(**{k: v for k, v in tiny_random.SCHEDULER.items() if k != "_class_name"}))
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
    torch, _, diffusers = _import_torch()
    torch.set_num_threads(os.cpu_count())
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from nvl_jax.reconstruction import SamplingConfig, StableUnCLIP, UnCLIPSampler

    rng = np.random.default_rng(args.seed)
    b, s = args.batch, args.latent_size
    latents = rng.standard_normal((b, s, s, 4)).astype(np.float32)
    image_embeds = rng.standard_normal((b, args.embed_dim)).astype(np.float32)
    embedding_noise = rng.standard_normal((b, args.embed_dim)).astype(np.float32)
    context = rng.standard_normal((2 * b, 77, args.text_width)).astype(np.float32)
    labels = rng.standard_normal((2 * b, 2 * args.embed_dim)).astype(np.float32)
    unet_latents = np.concatenate([latents, latents])

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "unclip"
        pipe = build_pipeline(args, folder)
        ours = StableUnCLIP.from_pretrained(folder)

    graphdef, state = nnx.split(ours.unet)
    unet_forward = jax.jit(lambda state, x, t, c, y: nnx.merge(graphdef, state)(x, t, c, y).sample)
    unet_inputs = [jnp.asarray(x) for x in (unet_latents, np.int32(500), context, labels)]
    torch_unet_inputs = (torch.from_numpy(unet_latents.transpose(0, 3, 1, 2)), torch.tensor(500),
                         torch.from_numpy(context), torch.from_numpy(labels))

    def torch_unet():
        with torch.no_grad():
            return pipe.unet(*torch_unet_inputs[:3], class_labels=torch_unet_inputs[3]).sample

    sampler = UnCLIPSampler(ours)
    config = SamplingConfig(num_inference_steps=args.steps, guidance_scale=args.guidance, beta=1.0)
    prompt = ["the cat"] * b
    own_noise = type(pipe).noise_image_embeddings

    def torch_pipeline():
        # diffusers' own noising, with our noise instead of a draw, so both pipelines compute the same images.
        pipe.noise_image_embeddings = lambda image_embeds, noise_level, noise=None, generator=None: own_noise(
            pipe, image_embeds, noise_level, noise=torch.from_numpy(embedding_noise))
        return pipe(prompt=prompt, image_embeds=torch.from_numpy(image_embeds),
                    latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)), num_inference_steps=args.steps,
                    guidance_scale=args.guidance, output_type="np", height=8 * s, width=8 * s).images

    def jax_pipeline():
        return np.asarray(sampler(latents, image_embeds, latents, embedding_noise, ours.tokenize(prompt),
                                  config=config))

    unet_times = _median_seconds({
        "jax": lambda: unet_forward(state, *unet_inputs).block_until_ready(), "torch": torch_unet}, args.repeats)
    pipeline_times = _median_seconds({"jax": jax_pipeline, "torch": torch_pipeline}, args.repeats)
    max_pixel_diff = float(np.abs(jax_pipeline() - torch_pipeline()).max())
    return {
        "unet_speedup_vs_torch": unet_times["torch"] / unet_times["jax"],
        "pipeline_speedup_vs_torch": pipeline_times["torch"] / pipeline_times["jax"],
        "unet_forward_s_jax": unet_times["jax"], "unet_forward_s_torch": unet_times["torch"],
        "pipeline_s_jax": pipeline_times["jax"], "pipeline_s_torch": pipeline_times["torch"],
        "pipeline_max_pixel_diff": max_pixel_diff,
        "unet_parameters": int(sum(p.numel() for p in pipe.unet.parameters())),
        "config": {k: v for k, v in vars(args).items()},
        "device": f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()}, "
                  f"{os.cpu_count()} cores)",
        "jax_version": jax.__version__, "torch_version": torch.__version__, "diffusers_version": diffusers.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(parse_args(argv))))


if __name__ == "__main__":
    main()
