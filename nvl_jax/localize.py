"""Where does a concept live in a subject's brain? ``python -m nvl_jax.localize --workdir RUN[,RUN2,RUN3]
--subject subj01 --concept circle --out DIR``.

GradCAM on the penultimate layer of each stage-1 run's ViT3D, scored by the cosine of the CLIP
head's output with the concept target (docs/localization.md), taken back to the subject's native
voxels and averaged over the runs (the paper's ensemble: patch 14, 12 and 10). Writes to DIR:

  <subject>_<concept>.nii.gz            the ensemble map, 0..1, on the subject's native grid and affine
  <subject>_<concept>_<run>.nii.gz      each run's own map (run = p14, p12, p10)
  <subject>_<concept>_slices.png        axial slices of the ensemble and each run over the voxel mask
  <subject>_<concept>_glass_brain.png   nilearn's glass brain of the ensemble map
"""

from __future__ import annotations

import argparse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nvl_jax.localize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True,
                        help="stage-1 run folder(s), comma-separated, 1 to 3 with distinct patch sizes")
    parser.add_argument("--subject", required=True, help="a subject of the runs' dataset, e.g. subj01")
    parser.add_argument("--concept", required=True, help='the keyword, e.g. "circle" or "dog"')
    parser.add_argument("--stimuli", default="test",
                        help="test (the subject's test stimuli), all (every stimulus it saw), showing (test stimuli "
                             "whose scene graph shows the concept; in-silico only) or comma-separated stimulus ids "
                             "(default: %(default)s)")
    parser.add_argument("--repeats", default="mean", choices=("mean", "each"),
                        help="mean: one map per stimulus from its repeat-averaged betas; each: one map per trial "
                             "(default: %(default)s)")
    parser.add_argument("--method", default="token", choices=("token", "gradcam"),
                        help="token: each patch weighted by its own gradient; gradcam: the paper's mean gradient over "
                             "patches (docs/localization.md compares them) (default: %(default)s)")
    parser.add_argument("--out", required=True, help="output folder (created)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from nvl_jax.localization import figures, localize_concept

    result = localize_concept(args.workdir, args.subject, args.concept, args.stimuli, args.repeats, method=args.method)
    scores = ", ".join(f"{name} {value:.3f}" for name, value in result.score.items())
    print(f'"{args.concept}" in {args.subject}: {len(result.stimuli)} stimuli, concept score (cosine) {scores}')
    for path in figures.write_outputs(result, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
