"""Evaluate OOD detection with LR (likelihood regret): score(first checkpoint) - score(end checkpoint).

    python test_LR.py --pretrained_ldm_ckpt_first ./checkpoint/checkpoint-0.pth \
        --pretrained_ldm_ckpt_end ./checkpoint/checkpoint-last.pth \
        --pretrained_ldm_cfg config/Config.yaml --data_path ./data --evaluate --similarity_type MFsim

Reports LR for every score type, and the first and end scores LR is made of. Higher = more OOD,
as for every score here; an AUROC below 50 means the score points the other way on that set.
Precision: as test_mse_mfsim.py (IEEE fp32 on CUDA for the whole run, AMP's fp16 aside).
"""
import argparse

from cli import EVAL_FLAGS, SCORE_FLAGS, add_eval_flags, parse_with_config, run_entry, scoring_run, stored_or_named
from engine.evaluation import default_output_dir, run_evaluation


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
    end = args.pretrained_ldm_ckpt_end
    run = scoring_run({"first": args.pretrained_ldm_ckpt_first, "end": end}, args.pretrained_ldm_cfg, vars(args),
                      (*EVAL_FLAGS, *SCORE_FLAGS))
    run_evaluation(run, args.output_dir or default_output_dir(end, "LR"), skip_missing=args.skip_missing,
                   save_features=args.save_features, plots=not args.no_plots)


if __name__ == "__main__":
    run_entry(main)
