"""Prepares the Natural Scenes Dataset for nvl_jax (docs/nsd.md): NSD's betas, masks, design and stimuli,
with COCO's captions, into the prepared-dataset format (docs/data_format.md).

    python -m nvl_jax.data.prepare_nsd --nsd_root NSD --coco_annotations COCO --out data/nsd_prepared \\
        --subjects 1,2,5,7 --sessions 37 --workers 4 --verify
    python -m nvl_jax.data.prepare_nsd --out data/nsd_prepared --verify      # check a finished folder only

Betas are z-scored per voxel and session with the statistics of that session's training trials
and stored as float16. A killed run resumes when the same command is run again (finished
sessions are kept); --workers only changes the speed, never the output.
"""

from __future__ import annotations

import argparse
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
import time

from nvl_jax.data.format import DatasetError
from nvl_jax.data.nsd import NSDError, PrepareOptions, format_summary, prepare, verify

_DEFAULTS = PrepareOptions(Path("NSD"), Path("COCO"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nvl_jax.data.prepare_nsd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsd_root", type=Path,
                        help="local mirror of s3://natural-scenes-dataset/ (holds nsddata/, nsddata_betas/, "
                             "nsddata_stimuli/); not needed with --verify alone")
    parser.add_argument("--coco_annotations", type=Path,
                        help="folder with COCO 2017's captions_train2017.json and captions_val2017.json (or its "
                             "annotations/ subfolder); not needed with --verify alone")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: new, empty, or a folder this command started with the same arguments")
    parser.add_argument("--subjects", default=",".join(map(str, _DEFAULTS.subjects)),
                        help="comma-separated NSD subject numbers, 1..8 (default: %(default)s, the paper's)")
    parser.add_argument("--sessions", type=int, default=_DEFAULTS.sessions,
                        help="the first N sessions of every subject (default: %(default)s, as the paper; 40 adds the "
                             "sessions NSD released later)")
    parser.add_argument("--format", choices=("nifti", "hdf5"), default=_DEFAULTS.betas_format,
                        help="which betas files to read: betas_sessionNN.nii.gz or .hdf5 (default: %(default)s)")
    parser.add_argument("--trials_per_session", type=int, default=_DEFAULTS.trials_per_session,
                        help="trials in every session file (default: %(default)s)")
    parser.add_argument("--dilation", type=int, default=_DEFAULTS.dilation,
                        help="voxels by which the stored voxel mask extends nsdgeneral (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="sessions prepared at once, one process each (about 2 GB of memory each with nifti at "
                             "subj01's grid, 0.3 GB with hdf5); the output does not depend on it "
                             "(default: %(default)s)")
    parser.add_argument("--coco_instances", action="store_true",
                        help="also read COCO's object instances (instances_train2017.json, instances_val2017.json "
                             "beside the captions in --coco_annotations) and write stimuli/objects.json, the objects "
                             "the instruction builder (python -m nvl_jax.data.instructions) asks about")
    parser.add_argument("--verify", action="store_true",
                        help="afterwards re-read the output (format validation with the NaN scan, and every file's "
                             "sha256 against checksums.json); exit 1 on any mismatch")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if (args.nsd_root is None) != (args.coco_annotations is None) or (args.nsd_root is None and not args.verify):
        parser.error("--nsd_root and --coco_annotations are required (only --verify alone checks a finished --out)")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    return args


def _options(args: argparse.Namespace) -> PrepareOptions | None:
    """What to prepare; None when only verifying."""
    if args.nsd_root is None:
        return None
    try:
        subjects = tuple(int(s.strip().removeprefix("subj")) for s in args.subjects.split(","))
    except ValueError as e:
        raise ValueError(f"--subjects: expected comma-separated numbers 1..8, got {args.subjects!r}") from e
    return PrepareOptions(args.nsd_root, args.coco_annotations, subjects, args.sessions, args.format,
                          args.trials_per_session, args.dilation, args.coco_instances)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        options = _options(args)
    except ValueError as e:
        raise SystemExit(f"prepare_nsd: error: {e}") from None
    try:
        if options is not None:
            start = time.perf_counter()
            summary = prepare(options, args.out, workers=args.workers, progress=not args.quiet)
            print(format_summary(summary, args.out))
            print(f"done in {time.perf_counter() - start:.0f} s")
        if args.verify:
            ok, report = verify(args.out, progress=not args.quiet)
            print(report)
            if not ok:
                raise SystemExit(1)
    except (NSDError, DatasetError) as e:
        raise SystemExit(f"prepare_nsd: error: {e}") from None
    except BrokenProcessPool as e:
        raise SystemExit(f"prepare_nsd: error: a worker process died ({e}); if it ran out of memory, rerun the same "
                         "command with fewer --workers to resume") from None
    except KeyboardInterrupt:
        raise SystemExit("prepare_nsd: interrupted; run the same command again to resume") from None


if __name__ == "__main__":
    main()
