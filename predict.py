"""Score new images: one row per file with its scores and an OOD verdict at a threshold calibrated
on in-distribution images.

    python predict.py --checkpoint checkpoint/checkpoint-last.pth --images new_images/ --output predictions.csv

The run's definition comes from the checkpoint (ours store their config; the authors' release files
take --config, else config/Config.yaml). The threshold accepts a fraction --tpr of the calibration
set (default: the config's ID test set); it is computed once and kept beside the feature cache.
``--output -`` writes the CSV to standard output. Precision: IEEE fp32 on CUDA for the whole run,
AMP's fp16 aside (engine/prediction.py holds utils.precision.exact_fp32).
"""
import argparse

from cli import (SCORE_FLAGS, add_common_flags, add_config_flags, parse_with_config, run_entry, scoring_run,
                 stored_or_named)
from engine.prediction import DEFAULT_TPR, collect_files, run_prediction
from errors import UserError
from scoring.scores import score_types


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Score image files with a DLSR checkpoint; write per-file OOD verdicts.")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="a checkpoint of ours, or the authors'")
    p.add_argument("--images", nargs="+", required=True, metavar="PATH",
                   help="image files, folders (searched recursively) or @list.txt (one path per line)")
    p.add_argument("--output", default="predictions.csv", metavar="FILE",
                   help="the CSV (default: %(default)s); a .json goes beside it; - writes the CSV to standard output")
    p.add_argument("--config", metavar="FILE", help="the settings to score with (default: the config stored in the "
                   "checkpoint; config/Config.yaml for the authors' files); what the run is comes from the checkpoint")
    add_common_flags(p)
    p.add_argument("--calibration", metavar="SPEC", help="ID set the thresholds are calibrated on "
                   "(default: the config's eval.dataset)")
    p.add_argument("--tpr", type=float, default=DEFAULT_TPR, metavar="FRACTION",
                   help="fraction of calibration images accepted (default: %(default)s)")
    p.add_argument("--score", choices=score_types(), help="score that decides is_ood (default: the config's "
                   "eval.similarity_type)")
    add_config_flags(p, SCORE_FLAGS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """--help shows the values of the config in use: --config, else the one stored in --checkpoint."""
    return parse_with_config(build_parser(), argv, stored_or_named("config", "checkpoint", None))


def main(argv=None) -> None:
    args = parse_args(argv)
    if not 0 < args.tpr < 1:
        raise UserError(f"--tpr must be between 0 and 1 (exclusive), got {args.tpr}")
    run = scoring_run({"end": args.checkpoint}, args.config, vars(args), SCORE_FLAGS)
    lists = []
    files = collect_files(args.images, lists)
    run_prediction(run, files, args.output, tpr=args.tpr, score=args.score or run.cfg.eval.similarity_type,
                   calibration_set=args.calibration or run.cfg.eval.dataset,
                   inputs=[*lists, *([args.config] if args.config else [])])


if __name__ == "__main__":
    run_entry(main)
