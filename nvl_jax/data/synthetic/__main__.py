"""python -m nvl_jax.data.synthetic --out DIR: writes an in-silico NSD and prints a summary."""

from __future__ import annotations

import argparse
import time

from nvl_jax.data.format import PreparedDataset
from nvl_jax.data.synthetic.generate import DEFAULT_SUBJECTS, SyntheticConfig, generate, summarize


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(
        prog="python -m nvl_jax.data.synthetic",
        description="Writes an in-silico Natural Scenes Dataset in the prepared-dataset format "
                    "(docs/data_format.md): procedural scenes with scene graphs and captions, NSD's native "
                    "grids with seeded head positions and nsdgeneral-like masks from the MNI152 template, and "
                    "single-trial betas from the encoding model of docs/synthetic.md. The same seed writes "
                    "byte-identical files.")
    parser.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a prepared dataset already in --out")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of every random draw (default: %(default)s)")
    parser.add_argument("--scale", type=float, default=defaults.scale,
                        help="grid scale: 1.0 = NSD's native 1.8 mm grids (13k-16k nsdgeneral voxels); "
                             "voxels are 1.8 / scale mm (default: %(default)s)")
    parser.add_argument("--subjects", default=",".join(DEFAULT_SUBJECTS),
                        help="comma-separated NSD subjects (subj01 .. subj08), each on its own NSD grid "
                             "(default: %(default)s)")
    parser.add_argument("--train_stimuli", type=int, default=defaults.train_stimuli,
                        help="training stimuli per subject, each subject its own (default: %(default)s)")
    parser.add_argument("--test_stimuli", type=int, default=defaults.test_stimuli,
                        help="test stimuli, shared: every subject sees them all (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=defaults.repeats,
                        help="presentations of each stimulus (default: %(default)s)")
    parser.add_argument("--sessions", type=int, default=defaults.sessions,
                        help="sessions per subject, one betas file each (default: %(default)s)")
    parser.add_argument("--snr", type=float, default=defaults.snr,
                        help="per voxel: signal std across stimuli / single-trial noise std, NSD's ncsnr "
                             "(default: %(default)s)")
    parser.add_argument("--image_size", type=int, default=defaults.image_size,
                        help="stimulus side in pixels, a multiple of 16 (default: %(default)s)")
    parser.add_argument("--dilation", type=int, default=defaults.dilation,
                        help="voxels by which the stored voxel mask extends nsdgeneral (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    config = SyntheticConfig(seed=args.seed, scale=args.scale, subjects=tuple(args.subjects.split(",")),
                             train_stimuli=args.train_stimuli, test_stimuli=args.test_stimuli,
                             repeats=args.repeats, sessions=args.sessions, snr=args.snr,
                             image_size=args.image_size, dilation=args.dilation)
    start = time.perf_counter()
    out = generate(args.out, config, overwrite=args.overwrite, progress=not args.quiet)
    seconds = time.perf_counter() - start
    size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    print(summarize(PreparedDataset.open(out)))
    print(f"written in {seconds:.1f} s, {size_mb:.0f} MB")


if __name__ == "__main__":
    main()
