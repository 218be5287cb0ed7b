"""Score new images: one row per file with its MSE and MFsim scores and an OOD verdict at a
threshold calibrated on in-distribution images.

    python predict.py --checkpoint checkpoint/checkpoint-last.pth --images new_images/ --output predictions.csv

The config comes from the checkpoint (ours store it); the authors' release checkpoints need
--config. The threshold accepts a fraction --tpr of the calibration set (default: the config's ID
test set); it is computed once and kept beside the feature cache.
"""
import argparse

from errors import UserError
from utils.checkpoint import config_of, load_checkpoint, stored_config
from utils.cli import (SCORE_FLAGS, add_common_flags, add_config_flags, flag_values, parse_with_config,
                       resolve_config, run_entry, yaml_in_use)
from utils.config import DEFAULT_CONFIG, Config, config_from_dict
from utils.prediction import DEFAULT_TPR, collect_files, run_prediction
from utils.scores import SCORE_TYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Score image files with a DLSR checkpoint; write per-file OOD verdicts.")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="a checkpoint of ours, or the authors' (then give --config)")
    p.add_argument("--images", nargs="+", required=True, metavar="PATH",
                   help="image files, folders (searched recursively) or @list.txt (one path per line)")
    p.add_argument("--output", default="predictions.csv", metavar="FILE", help="the CSV (default: %(default)s); a .json goes beside it")
    p.add_argument("--config", metavar="FILE", help="config to use instead of the one stored in the checkpoint")
    add_common_flags(p)
    p.add_argument("--calibration", metavar="SPEC", help="ID set the thresholds are calibrated on "
                   "(default: the config's eval.dataset)")
    p.add_argument("--tpr", type=float, default=DEFAULT_TPR, metavar="FRACTION",
                   help="fraction of calibration images accepted (default: %(default)s)")
    p.add_argument("--score", choices=SCORE_TYPES, help="score that decides is_ood (default: the config's "
                   "eval.similarity_type)")
    add_config_flags(p, SCORE_FLAGS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """--help shows the values of the config in use: --config, else the one stored in --checkpoint."""
    return parse_with_config(build_parser(), argv, config_in_use)


def config_in_use(argv):
    """(the config this run will use, where it comes from): --config, else the checkpoint's own."""
    given = flag_values(argv, config=None, checkpoint=None)
    if given.config:
        return yaml_in_use(given.config)
    stored = stored_config(given.checkpoint)
    if stored is not None:  # None: no --checkpoint, or one without a config (the run says what is wrong)
        try:
            return config_from_dict(stored, source=given.checkpoint), given.checkpoint
        except UserError:  # an invalid stored config: loading the checkpoint reports it
            pass
    return Config(), "built-in"


def main(argv=None) -> None:
    args = parse_args(argv)
    if not 0 < args.tpr < 1:
        raise UserError(f"--tpr must be between 0 and 1 (exclusive), got {args.tpr}")
    ckpt = load_checkpoint(args.checkpoint)
    cfg = resolve_config(config_of(ckpt, args.config, f"--config {DEFAULT_CONFIG} (or the config it was trained with)"),
                         vars(args), SCORE_FLAGS)
    lists = []
    files = collect_files(args.images, lists)
    run_prediction(cfg, ckpt, files, args.output, tpr=args.tpr,
                   score=args.score or cfg.eval.similarity_type, calibration_set=args.calibration or cfg.eval.dataset,
                   config_source=args.config or args.checkpoint, inputs=[*lists, *([args.config] if args.config else [])])


if __name__ == "__main__":
    run_entry(main)
