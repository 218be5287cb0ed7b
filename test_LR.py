"""Evaluate OOD detection with LR (likelihood regret): score(first checkpoint) - score(end checkpoint).

    python test_LR.py --pretrained_ldm_ckpt_first ./checkpoint/checkpoint-0.pth \
        --pretrained_ldm_ckpt_end ./checkpoint/checkpoint-last.pth \
        --pretrained_ldm_cfg config/Config.yaml --data_path ./data --evaluate --similarity_type MFsim

Reports LR for both score types, and the first and end scores LR is made of. Higher = more OOD,
as for every score here; an AUROC below 50 means the score points the other way on that set.
"""
import argparse
import os

from utils.cli import (EVAL_FLAGS, SCORE_FLAGS, add_eval_flags, config_for_checkpoint, parse_with_config,
                       resolve_config, run_entry, stored_or_named)
from utils.evaluation import run_evaluation


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DLSR OOD evaluation with LR (first vs end checkpoint).")
    p.add_argument("--pretrained_ldm_ckpt_first", default="./checkpoint/checkpoint-0.pth", metavar="FILE",
                   help="the early checkpoint (default: %(default)s)")
    p.add_argument("--pretrained_ldm_ckpt_end", default="./checkpoint/checkpoint-last.pth", metavar="FILE",
                   help="the final checkpoint (default: %(default)s)")
    add_eval_flags(p)
    return p


def main(argv=None) -> None:
    args = parse_with_config(build_parser(), argv, stored_or_named("pretrained_ldm_cfg", "pretrained_ldm_ckpt_end", "./checkpoint/checkpoint-last.pth"))
    config, config_source = config_for_checkpoint(args.pretrained_ldm_cfg, args.pretrained_ldm_ckpt_end)
    cfg = resolve_config(config, vars(args), (*EVAL_FLAGS, *SCORE_FLAGS))
    end = args.pretrained_ldm_ckpt_end
    run_evaluation(cfg, {"first": args.pretrained_ldm_ckpt_first, "end": end},
                   args.output_dir or os.path.join(os.path.dirname(end) or ".", "results-LR"),
                   config_source=config_source, skip_missing=args.skip_missing,
                   save_features=args.save_features, plots=not args.no_plots)


if __name__ == "__main__":
    run_entry(main)
