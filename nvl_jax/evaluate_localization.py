"""Localization accuracy on in-silico NSD: ``python -m nvl_jax.evaluate_localization --workdir RUN[,RUN2,RUN3]
--out DIR`` writes DIR/localization_eval.json.

For every subject and each of the 11 concepts (5 shapes, 6 colours): the AUROC of each run's map
and of the ensemble's against the true concept voxels that the generator saved
(ground_truth/<subject>_concept_voxels.nii.gz, docs/synthetic.md); the wrong-concept baseline (the
same truth scored with the other concepts' maps); and the ablation check (zero the top 1, 5, 10 %
localized voxels in the betas, re-run the extractors, compare the drop in the concept's score and
retrieval with zeroing as many random voxels). docs/localization.md describes the protocol.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nvl_jax.evaluate_localization", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True,
                        help="stage-1 run folder(s) trained on an in-silico NSD, comma-separated, 1 to 3 with "
                             "distinct patch sizes")
    parser.add_argument("--method", default="token", choices=("token", "gradcam"),
                        help="token: each patch weighted by its own gradient; gradcam: the paper's mean gradient over "
                             "patches (docs/localization.md compares them) (default: %(default)s)")
    parser.add_argument("--out", required=True, help="output folder (created) for localization_eval.json")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random voxels of the ablation baseline")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from nvl_jax.localization import evaluation, load_extractors

    results = evaluation.evaluate(load_extractors(args.workdir, args.method), seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "localization_eval.json").write_text(json.dumps(results, indent=1) + "\n")
    runs = [k for k in results if k.startswith("p")]
    print(f"mean AUROC: ensemble {results['ensemble']['mean_auroc']:.3f}, "
          + ", ".join(f"{k} {results[k]['mean_auroc']:.3f}" for k in runs)
          + f"; wrong concept {results['wrong_concept']['mean_auroc']:.3f}")
    for key, value in results["ablation"].items():
        if isinstance(value, dict):
            print(f"ablation {key}: concept score drop {value['concept_score_drop']:.4f} "
                  f"(random {value['random_voxels_concept_score_drop']:.4f}), retrieval drop "
                  f"{value['retrieval_drop']:.3f} (random {value['random_voxels_retrieval_drop']:.3f})")
    print(f"wrote {out / 'localization_eval.json'}")
    return results


if __name__ == "__main__":
    main()
