"""Evaluate OOD detection with the MSE and MFsim scores of one checkpoint.

    python test_mse_mfsim.py --pretrained_ldm_ckpt ./checkpoint/checkpoint-last.pth \
        --pretrained_ldm_cfg config/Config.yaml --data_path ./data --evaluate --similarity_type MFsim

Both scores are computed in one pass; --similarity_type picks the headline. Works with our
checkpoints and with the authors' release files.
"""
import argparse
import os

from utils.cli import (EVAL_FLAGS, SCORE_FLAGS, add_eval_flags, config_for_checkpoint, parse_with_config,
                       resolve_config, run_entry, stored_or_named)
from utils.evaluation import run_evaluation


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DLSR OOD evaluation with MSE / MFsim.")
    p.add_argument("--pretrained_ldm_ckpt", default="./checkpoint/checkpoint-last.pth", metavar="FILE",
                   help="LFDN checkpoint (default: %(default)s)")
    add_eval_flags(p)
    return p


def main(argv=None) -> None:
    args = parse_with_config(build_parser(), argv, stored_or_named("pretrained_ldm_cfg", "pretrained_ldm_ckpt", "./checkpoint/checkpoint-last.pth"))
    config, config_source = config_for_checkpoint(args.pretrained_ldm_cfg, args.pretrained_ldm_ckpt)
    cfg = resolve_config(config, vars(args), (*EVAL_FLAGS, *SCORE_FLAGS))
    ckpt = args.pretrained_ldm_ckpt
    stem = os.path.splitext(os.path.basename(ckpt))[0]
    run_evaluation(cfg, {"end": ckpt}, args.output_dir or os.path.join(os.path.dirname(ckpt) or ".", f"results-{stem}"),
                   config_source=config_source, skip_missing=args.skip_missing,
                   save_features=args.save_features, plots=not args.no_plots)


if __name__ == "__main__":
    run_entry(main)
