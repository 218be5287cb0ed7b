"""Evaluate OOD detection with the MSE and MFsim scores of one checkpoint.

    python test_mse_mfsim.py --pretrained_ldm_ckpt ./checkpoint/checkpoint-last.pth \
        --pretrained_ldm_cfg config/Config.yaml --data_path ./data --evaluate --similarity_type MFsim

Both scores are computed in one pass; --similarity_type picks the headline. Works with our
checkpoints and with the authors' release files.
"""
import argparse
import os

from utils.cli import add_eval_flags, parse_with_config, run_entry, run_evaluation, yaml_named_by


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DLSR OOD evaluation with MSE / MFsim.")
    p.add_argument("--pretrained_ldm_ckpt", default="./checkpoint/checkpoint-last.pth", metavar="FILE",
                   help="LFDN checkpoint (default: %(default)s)")
    add_eval_flags(p)
    return p


def main(argv=None) -> None:
    args = parse_with_config(build_parser(), argv, yaml_named_by("pretrained_ldm_cfg"))
    ckpt = args.pretrained_ldm_ckpt
    stem = os.path.splitext(os.path.basename(ckpt))[0]
    run_evaluation(args, {"end": ckpt}, os.path.join(os.path.dirname(ckpt) or ".", f"results-{stem}"))


if __name__ == "__main__":
    run_entry(main)
