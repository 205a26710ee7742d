"""Reconstructs the stimuli of a split from a stage-1 run with Stable unCLIP, and scores them.

    python -m nvl_jax.reconstruct --workdir RUN --unclip stabilityai/stable-diffusion-2-1-unclip-small \\
        --split test [--beta 0.93] [--steps 20] [--guidance 10] [--limit N] [--prompts FILE.jsonl] --out DIR
    python -m nvl_jax.reconstruct --workdir runs/demo --unclip tiny-random --limit 8 --out recon/demo

For every record of the split, multi-trial (repeats averaged) and single-trial (first
presentation), per subject: the run's ViT3D predicts the VAE latent z_v and the CLIP embedding z_c,
and Stable unCLIP denoises from z_v at strength beta, conditioned on z_c and on the record's prompt
(the brain-LLM's Stable Diffusion prompt from --prompts, else the empty prompt). Writes:

    DIR/<mode>/beta<b>/<subject>_<stimulus>.png   one reconstruction per record (and DIR/<mode>/blurry/ with --blurry)
    DIR/grid_<mode>.png                           stimulus | reconstruction at each beta (| blurry), first rows
    DIR/reconstructions.npz                       <mode>_subject, <mode>_stimulus, <mode>_beta<b> (uint8), ...
    DIR/metrics.json                              the reconstruction metrics per mode and beta
    DIR/metrics_vs_beta.png                       with several --beta values: each metric against beta

--unclip tiny-random writes a tiny random unCLIP to DIR/tiny_random_unclip (offline demo; its
reconstructions do not resemble the stimuli). docs/reconstruction.md explains the settings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import re

import numpy as np

TEST_MODES = ("multi_trial", "single_trial")


def parse_betas(text: str) -> list[float]:
    """``"0.6,0.75,1"`` -> ``[0.6, 0.75, 1.0]``."""
    try:
        betas = [float(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--beta {text!r}: expected numbers separated by commas, e.g. 0.6,0.75,0.9,0.98,1.0") from None
    if not betas or len(set(betas)) != len(betas):
        raise ValueError(f"--beta {text!r}: expected one or more distinct values")
    return betas


def read_prompts(path: str | Path, names: list[str]) -> dict[tuple[str, str, int], str]:
    """``(mode, subject name, stimulus) -> prompt`` from the caption command's JSON lines
    (``{"stimulus", "subject", "mode", "task", "caption"}``)."""
    prompts = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = (row["mode"], row["subject"], int(row["stimulus"]))
            caption = row["caption"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}, line {number}: expected a JSON object with mode, subject, stimulus and "
                             f"caption ({type(e).__name__}: {e})") from None
        if key[1] not in names:
            raise ValueError(f"{path}, line {number}: subject {key[1]!r} is not one of the run's {names}")
        if key in prompts:
            raise ValueError(f"{path}, line {number}: a second prompt for {key}; keep one task per file")
        prompts[key] = caption
    return prompts


METRIC_NETWORKS = ("alexnet", "inception", "clip", "efficientnet", "swav")


def parse_metric_networks(text: str | None) -> dict[str, str]:
    """``"alexnet=DIR,clip=openai/clip-vit-large-patch14"`` -> ``{"alexnet": "DIR", "clip": ...}``."""
    networks = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, _, path = item.partition("=")
        if name.strip() not in METRIC_NETWORKS or not path.strip():
            raise ValueError(f"--metric_networks item {item!r}: expected NAME=FOLDER with NAME one of "
                             f"{list(METRIC_NETWORKS)}")
        networks[name.strip()] = path.strip()
    return networks


def tiny_random_seed(info: dict) -> int:
    """The seed of the tiny random models the run's targets came from (``targets.json``)."""
    match = re.search(r"\(seed (\d+)\)", str(info.get("vae", "")))
    if not info.get("random_init") or match is None:
        raise ValueError(f"--unclip tiny-random decodes with the tiny random VAE the in-silico targets are made with, "
                         f"but this run's VAE targets came from {info.get('vae')!r}: pass that model's unCLIP "
                         "pipeline instead")
    return int(match.group(1)) - 1  # tiny_random_models(seed) seeds its VAE with seed + 1


def record_noise(count: int, latent_shape: tuple[int, ...], embedding_dim: int, seed: int):
    """Standard normal ``[count, *latent_shape]`` and ``[count, embedding_dim]``, one stream per record,
    so a record's noise does not depend on --limit, the batch size or beta."""
    latents, embeddings = [], []
    for index in range(count):
        rng = np.random.default_rng((seed, index))
        latents.append(rng.standard_normal(latent_shape, np.float32))
        embeddings.append(rng.standard_normal(embedding_dim, np.float32))
    return np.stack(latents), np.stack(embeddings)


def _batched(fn, arrays: list[np.ndarray | None], batch_size: int) -> np.ndarray:
    """``fn(*batch)`` over fixed-size batches (the last one padded by repeating its final row)."""
    count = len(arrays[0])
    out = []
    for start in range(0, count, batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), count - 1)
        out.append(np.asarray(fn(*(None if a is None else a[rows] for a in arrays)))[:min(batch_size, count - start)])
    return np.concatenate(out)


def score_by_subject(score, reconstructions: np.ndarray, stimuli: np.ndarray, subjects: np.ndarray,
                     names: list[str]) -> dict:
    """``score`` per subject (two-way identification compares a subject's own records), the mean over
    the subjects with at least two records, and the metrics ``score`` skipped (no network weights given)."""
    per_subject, skipped = {}, {}
    for index, name in enumerate(names):
        rows = np.flatnonzero(subjects == index)
        if len(rows) >= 2:
            scores = score(reconstructions[rows], stimuli[rows])
            skipped = scores.skipped
            per_subject[name] = {"n": int(len(rows)), **scores}
    if not per_subject:
        raise ValueError("every subject has fewer than 2 records: raise --limit")
    keys = [k for k in next(iter(per_subject.values())) if k != "n"]
    mean = {k: float(np.mean([m[k] for m in per_subject.values()])) for k in keys}
    return {**mean, "n": int(sum(m["n"] for m in per_subject.values())), "per_subject": per_subject,
            "skipped": skipped}


def reconstruct_run(workdir: str | Path, *, unclip: str, out: str | Path, split: str = "test",
                    betas: list[float] = (0.93,), steps: int = 20, guidance: float = 10.0, noise_level: int = 0,
                    beta_start: str = "linear_mix", scheduler: str | None = None, limit: int | None = None,
                    prompts: str | Path | None = None, blurry: bool = False, batch_size: int = 8, seed: int = 0,
                    grid_rows: int = 16, metric_networks: dict[str, str] | None = None) -> dict:
    """Writes the reconstructions and metrics of ``workdir``'s newest checkpoint into ``out``; returns metrics.json's dict."""
    from nvl_jax.evaluation import reconstruction as metrics_lib
    from nvl_jax.reconstruction import SamplingConfig, StableUnCLIP, UnCLIPSampler, brain, outputs, to_uint8
    from nvl_jax.reconstruction import tiny_random
    from nvl_jax.training import loop

    networks = metrics_lib.FeatureNetworks.from_pretrained(**metric_networks) if metric_networks else None

    def score(reconstructions, stimuli):
        return metrics_lib.score(reconstructions, stimuli, networks=networks)

    configs = [SamplingConfig(num_inference_steps=steps, guidance_scale=guidance, noise_level=noise_level, beta=b,
                              beta_start=beta_start) for b in betas]
    out = Path(out)
    task, model, step = loop.restore_model(workdir)
    if task.config.task != "stage1":
        raise ValueError(f"{workdir}: a {task.config.task!r} run; reconstruction needs a stage-1 run")
    dataset, mesh = task.dataset, task.mesh
    names = list(dataset.subjects)
    if unclip == tiny_random.NAME:
        info = dataset.targets().info
        unclip = tiny_random.save_tiny_random_unclip(out / "tiny_random_unclip", seed=tiny_random_seed(info),
                                                     image_size=int(info["image_size"]))
    components = StableUnCLIP.from_pretrained(unclip, scheduler=scheduler, mesh=mesh)
    sampler = UnCLIPSampler(components, mesh)
    targets = dataset.targets()
    latent_shape, clip_dim = targets.vae_latents.shape[1:], targets.clip_image_embeds.shape[1]
    if clip_dim != components.embedding_dim or latent_shape[-1] != components.unet.config.in_channels:
        raise ValueError(f"{workdir} predicts CLIP embeddings of {clip_dim} and latents {list(latent_shape)}, but "
                         f"{components.folder} takes embeddings of {components.embedding_dim} and "
                         f"{components.unet.config.in_channels} latent channels")
    by_record = read_prompts(prompts, names) if prompts else None
    divisor = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
    batch_size = -(-batch_size // divisor) * divisor  # the batch splits over the mesh's batch axes

    arrays, metrics, sweep = {}, {"settings": {
        "workdir": str(Path(workdir).resolve()), "checkpoint_step": int(step), "unclip": str(components.folder),
        "split": split, "betas": list(betas), "beta_start": beta_start, "steps": steps, "guidance": guidance,
        "noise_level": noise_level, "scheduler": type(components.scheduler).__name__, "limit": limit,
        "prompts": str(prompts) if prompts else None, "seed": seed, "metric_networks": metric_networks or {}}}, {}
    for mode in TEST_MODES:
        predictions = brain.predict(task, model, split, mode, limit)
        stimuli = np.asarray(dataset.images()[predictions.stimulus])
        prompt_ids = None
        if by_record is not None:
            keys = [(mode, names[s], int(t)) for s, t in zip(predictions.subject, predictions.stimulus)]
            absent = [k for k in keys if k not in by_record]
            if absent:
                raise ValueError(f"{prompts}: no prompt for {len(absent)} records, e.g. {absent[:3]}")
            prompt_ids = components.tokenize([by_record[k] for k in keys])
        latent_noise, embedding_noise = record_noise(len(predictions), latent_shape, clip_dim, seed)
        files = [f"{names[s]}_{int(t):05d}.png" for s, t in zip(predictions.subject, predictions.stimulus)]
        columns, metrics[mode] = [], {}
        arrays[f"{mode}_subject"], arrays[f"{mode}_stimulus"] = predictions.subject, predictions.stimulus
        for beta, config in zip(betas, configs):
            images = to_uint8(_batched(
                lambda z, c, n, e, p, config=config: sampler(z, c, n, e, p, config=config),
                [predictions.vae_latent, predictions.clip_embedding, latent_noise, embedding_noise, prompt_ids],
                batch_size))
            columns.append(images)
            arrays[f"{mode}_beta{beta:g}"] = images
            for name, image in zip(files, images):
                outputs.save_png(image, out / mode / f"beta{beta:g}" / name)
            metrics[mode][f"beta={beta:g}"] = score_by_subject(score, images, stimuli, predictions.subject, names)
            sweep.setdefault(mode, {})[beta] = {k: v for k, v in metrics[mode][f"beta={beta:g}"].items()
                                                if isinstance(v, float)}
        if blurry:
            images = to_uint8(_batched(sampler.decode, [predictions.vae_latent], batch_size))
            columns.append(images)
            arrays[f"{mode}_blurry"] = images
            for name, image in zip(files, images):
                outputs.save_png(image, out / mode / "blurry" / name)
            metrics[mode]["blurry"] = score_by_subject(score, images, stimuli, predictions.subject, names)
        rows = slice(0, grid_rows)
        outputs.save_png(outputs.grid(stimuli[rows], [c[rows] for c in columns]), out / f"grid_{mode}.png")
    np.savez(out / "reconstructions.npz", betas=np.asarray(betas, np.float32), **arrays)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if len(betas) > 1:
        outputs.plot_sweep(list(betas), sweep, out / "metrics_vs_beta.png")
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nvl_jax.reconstruct", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a stage-1 run folder (python -m nvl_jax.train)")
    parser.add_argument("--unclip", required=True,
                        help="a StableUnCLIPImg2ImgPipeline folder or hub name (the paper's: "
                             "stabilityai/stable-diffusion-2-1-unclip-small), or tiny-random for the offline demo")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", default="test", choices=["test", "train"], help="which stimuli")
    parser.add_argument("--beta", default="0.93",
                        help="strength of the noise in the start, 0 < beta <= 1 (1 = pure noise); several "
                             "separated by commas sweep it, e.g. 0.6,0.75,0.9,0.98,1.0")
    parser.add_argument("--beta_start", default="linear_mix", choices=["linear_mix", "img2img"],
                        help="linear_mix: the paper's (1 - beta) z_v + beta noise, all steps; img2img: diffusers' "
                             "add_noise at step steps - int(steps * beta)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=10.0, help="classifier-free guidance scale (<= 1: off)")
    parser.add_argument("--noise_level", type=int, default=0, help="noise added to the CLIP embedding, 0..999")
    parser.add_argument("--scheduler", help="sample with this scheduler class instead of the pipeline's "
                                            "(PNDMScheduler, DDIMScheduler, DPMSolverMultistepScheduler)")
    parser.add_argument("--limit", type=int, help="reconstruct only the first N records of each mode")
    parser.add_argument("--prompts", help="JSON lines from python -m nvl_jax.caption: each record's text prompt "
                                          "(default: the empty prompt)")
    parser.add_argument("--blurry", action="store_true",
                        help="also decode z_v with the VAE alone (MindEye's low-level 'blurry' path)")
    parser.add_argument("--batch_size", type=int, default=8, help="records per sampling batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
    parser.add_argument("--metric_networks",
                        help="weights of the metrics' feature networks, NAME=FOLDER separated by commas, NAME in "
                             f"{', '.join(METRIC_NETWORKS)} (docs/reconstruction_metrics.md); the metrics of networks "
                             "not given are skipped and listed under 'skipped'")
    parser.add_argument("--grid_rows", type=int, default=16, help="records shown in each grid PNG")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    metrics = reconstruct_run(args.workdir, unclip=args.unclip, out=args.out, split=args.split,
                              betas=parse_betas(args.beta), steps=args.steps, guidance=args.guidance,
                              noise_level=args.noise_level, beta_start=args.beta_start, scheduler=args.scheduler,
                              limit=args.limit, prompts=args.prompts, blurry=args.blurry,
                              batch_size=args.batch_size, seed=args.seed, grid_rows=args.grid_rows,
                              metric_networks=parse_metric_networks(args.metric_networks))
    for mode in TEST_MODES:
        for setting, values in metrics[mode].items():
            shown = ", ".join(f"{k} {v:.3f}" for k, v in values.items() if isinstance(v, float))
            print(f"{mode} {setting}: {shown}")
    print(f"wrote {args.out}/metrics.json")
    return metrics


if __name__ == "__main__":
    main()
