"""Caches the stage-1 training targets of every stimulus in a prepared dataset.

- CLIP image embedding: ``CLIPVisionModel(...).image_embeds`` of the stimulus
  preprocessed as CLIPImageProcessor does (ViT-L/14: ``[768]``);
- VAE latent: the posterior mean of the Stable Diffusion VAE at ``image_size``
  pixels, times ``scaling_factor`` (512 px: ``[64, 64, 4]``).

    python -m nvl_jax.data.targets --data DIR --clip openai/clip-vit-large-patch14 \
        --vae stabilityai/stable-diffusion-2-1-unclip-small --vae_subfolder vae
    python -m nvl_jax.data.targets --data DIR --random_init     # tiny random stand-ins, no download

Computed once in batches with the model zoo's Flax models and written to
``DIR/targets/`` (docs/data_format.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from nvl_jax.data import format as data_format
from nvl_jax.models import clip, vae
from nvl_jax.models.clip import image_processor as clip_image_processor


def tiny_random_models(seed: int = 0) -> tuple[clip.CLIPVisionModel, vae.AutoencoderKL]:
    """Random-weight stand-ins of the same classes, small enough for a laptop.

    The CLIP tower keeps ViT-L/14's 768-wide projection and the VAE its 8x
    downsampling and 4 latent channels, so target shapes match the real ones.
    The tower sees 64-pixel images as 4 x 4 patches: a trained CLIP's embedding
    follows what is where in the scene, and so does a random tower on a grid
    that coarse, while one on a finer grid follows more pixel detail that no
    voxel encodes. Ridge regression from the in-silico encoding model's own
    features retrieves 93% of the demo's 100 test stimuli from this tower's
    embedding (python -m nvl_jax.data.synthetic.decodability, docs/synthetic.md).
    """
    clip_config = clip.CLIPVisionConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=64, patch_size=16, projection_dim=768)
    vae_config = vae.AutoencoderKLConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1,
                                         norm_num_groups=8, sample_size=128)
    return (clip.CLIPVisionModel(clip_config, rngs=nnx.Rngs(seed)),
            vae.AutoencoderKL(vae_config, rngs=nnx.Rngs(seed + 1)))


def _jitted(model, fn):
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, x: fn(nnx.merge(graphdef, s), x))
    return lambda x: run(state, x)


def compute(dataset: data_format.PreparedDataset, clip_model: clip.CLIPVisionModel,
            vae_model: vae.AutoencoderKL, *, image_size: int, batch_size: int = 16
            ) -> tuple[np.ndarray, np.ndarray]:
    """``(clip_image_embeds float32 [n_stimuli, proj], vae_latents float32 [n_stimuli, s/8, s/8, 4])``.

    Prints the speed: stimuli/s over all batches, and over those after the first, which compiles.
    """
    images = dataset.images()
    clip_size = clip_model.config.image_size  # ViT-L/14: 224, as its CLIPImageProcessor resizes and crops
    embed = _jitted(clip_model, lambda m, x: m(x).image_embeds)
    encode = _jitted(vae_model, lambda m, x: m.scale_latents(m.encode(x).mean))
    clip_out, vae_out = [], []
    started = time.perf_counter()
    for start in tqdm(range(0, len(images), batch_size), desc="targets", unit="batch"):
        batch = np.asarray(images[start:start + batch_size])
        n = len(batch)
        batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])  # one shape, one compile
        pixel_values = clip_image_processor.preprocess(batch, clip_size, clip_size)
        clip_out.append(np.asarray(embed(jnp.asarray(pixel_values)))[:n])
        pixels = jax.image.resize(jnp.asarray(batch, jnp.float32) / 127.5 - 1.0,
                                  (batch_size, image_size, image_size, 3), method="bicubic")
        vae_out.append(np.asarray(encode(jnp.clip(pixels, -1.0, 1.0)))[:n])
        if start == 0:
            first_batch = time.perf_counter()
    finished = time.perf_counter()
    rest = len(images) - min(batch_size, len(images))
    after_first = f", {rest / (finished - first_batch):.1f} after the first batch" if rest else ""
    print(f"targets: {len(images)} stimuli in {finished - started:.1f} s: {len(images) / (finished - started):.1f} "
          f"stimuli/s{after_first} (the first batch compiles the models: {first_batch - started:.1f} s)")
    return np.concatenate(clip_out).astype(np.float32), np.concatenate(vae_out).astype(np.float32)


def cache_targets(root: str | Path, *, clip_name: str | None = None, vae_name: str | None = None,
                  vae_subfolder: str | None = None, image_size: int = 512, batch_size: int = 16,
                  random_init: bool = False, seed: int = 0) -> data_format.Targets:
    """Computes and writes the targets of the dataset at ``root``; returns them."""
    dataset = data_format.PreparedDataset.open(root, check_values=False)
    if random_init:
        clip_model, vae_model = tiny_random_models(seed)
        names = {"clip": f"random-init tiny CLIPVisionModel (seed {seed})",
                 "vae": f"random-init tiny AutoencoderKL (seed {seed + 1})"}
        print("targets: no pretrained weights requested; using tiny RANDOM-initialised CLIP and VAE "
              "of the real classes (fine for the demo, meaningless for research).")
    else:
        if not clip_name or not vae_name:
            raise ValueError("pass --clip and --vae checkpoints, or --random_init for the demo stand-ins")
        clip_model = clip.CLIPVisionModel.from_pretrained(clip_name)
        vae_model = vae.AutoencoderKL.from_pretrained(vae_name, subfolder=vae_subfolder)
        names = {"clip": clip_name, "vae": vae_name + (f"/{vae_subfolder}" if vae_subfolder else "")}
    clip_embeds, vae_latents = compute(dataset, clip_model, vae_model, image_size=image_size, batch_size=batch_size)
    info = {**names, "random_init": random_init, "image_size": image_size,
            "vae_scaling_factor": vae_model.config.scaling_factor,
            "vae_latents": "posterior mean x scaling_factor", "clip_image_embeds": "CLIPVisionModel image_embeds"}
    data_format.write_targets(root, clip_embeds, vae_latents, info)
    print(f"targets: wrote clip_image_embeds {clip_embeds.shape} and vae_latents {vae_latents.shape} "
          f"to {Path(root) / 'targets'}")
    return data_format.PreparedDataset.open(root, check_values=False).targets()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nvl_jax.data.targets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared dataset folder")
    parser.add_argument("--clip", help="CLIP checkpoint (hub name or folder), e.g. openai/clip-vit-large-patch14")
    parser.add_argument("--vae", help="VAE checkpoint, e.g. stabilityai/stable-diffusion-2-1-unclip-small (with --vae_subfolder vae), the VAE reconstruction decodes with")
    parser.add_argument("--vae_subfolder", help="e.g. vae, for a pipeline repo")
    parser.add_argument("--image_size", type=int, default=512, help="pixels the VAE sees (512 -> 64x64 latents)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--random_init", action="store_true", help="tiny random stand-in models (demo, tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random stand-ins")
    args = parser.parse_args(argv)
    cache_targets(args.data, clip_name=args.clip, vae_name=args.vae, vae_subfolder=args.vae_subfolder,
                  image_size=args.image_size, batch_size=args.batch_size, random_init=args.random_init,
                  seed=args.seed)


if __name__ == "__main__":
    main()
