"""Evaluate OOD detection with the MSE and MFsim scores of one checkpoint.

    python test_mse_mfsim.py --pretrained_ldm_ckpt ./checkpoint/checkpoint-last.pth \
        --pretrained_ldm_cfg config/Config.yaml --data_path ./data --evaluate --similarity_type MFsim

Every score is computed in one pass; --similarity_type picks the headline. Works with our
checkpoints and with the authors' release files. Precision: fp32 on CUDA is IEEE fp32 (TF32 off)
for the whole run, AMP's fp16 aside (engine/evaluation.py holds utils.precision.exact_fp32).
"""
import argparse
import os

from cli import EVAL_FLAGS, SCORE_FLAGS, add_eval_flags, parse_with_config, run_entry, scoring_run, stored_or_named
from engine.evaluation import default_output_dir, run_evaluation


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DLSR OOD evaluation with MSE / MFsim.")
    p.add_argument("--pretrained_ldm_ckpt", default="./checkpoint/checkpoint-last.pth", metavar="FILE",
                   help="LFDN checkpoint (default: %(default)s)")
    add_eval_flags(p)
    return p


def main(argv=None) -> None:
    args = parse_with_config(build_parser(), argv, stored_or_named("pretrained_ldm_cfg", "pretrained_ldm_ckpt", "./checkpoint/checkpoint-last.pth"))
    ckpt = args.pretrained_ldm_ckpt
    run = scoring_run({"end": ckpt}, args.pretrained_ldm_cfg, vars(args), (*EVAL_FLAGS, *SCORE_FLAGS))
    stem = os.path.splitext(os.path.basename(ckpt))[0]
    run_evaluation(run, args.output_dir or default_output_dir(ckpt, stem), skip_missing=args.skip_missing,
                   save_features=args.save_features, plots=not args.no_plots)


if __name__ == "__main__":
    run_entry(main)
