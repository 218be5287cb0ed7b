"""Train the LFDN on in-distribution images.

    python main.py --config config/Config.yaml --data_path ./data
    torchrun --nproc_per_node=N main.py --config config/Config.yaml --data_path ./data

Writes checkpoint-0.pth, checkpoint-<25k>.pth and checkpoint-last.pth, log.txt and config.yaml to
--output_dir (./checkpoint in the shipped configs, where the evaluation commands of the README look).
--resume FILE continues a run in its checkpoint's folder; --resume auto continues the output
folder's run if it holds one and starts a new one if it holds none.
"""
import argparse

from cli import (TRAIN_FLAGS, add_common_flags, add_config_flags, parse_with_config, resolve_config, run_entry,
                 yaml_named_by)
from engine.training import train
from experiment.config import DEFAULT_CONFIG
from utils.distributed import distributed_context
from utils.precision import exact_fp32


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the LFDN (DLSR) on ID features.")
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE", help="experiment YAML (default: %(default)s)")
    add_common_flags(p)
    add_config_flags(p, TRAIN_FLAGS)
    p.add_argument("--resume", metavar="FILE|auto", help="continue a run from one of its checkpoints (in that "
                   "checkpoint's folder, unless --output_dir names another); auto: the output folder's run if it "
                   "holds one, else a new run")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in an output folder that holds another run's checkpoints (they are deleted)")
    p.add_argument("--pre_ckpt_path", metavar="FILE", help="start from these LFDN weights (ours or a release checkpoint)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """--help shows the values of the --config file."""
    return parse_with_config(build_parser(), argv, yaml_named_by("config"))


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = resolve_config(args.config, vars(args), TRAIN_FLAGS)
    output_dir_given = args.output_dir is not None or any(o.strip().startswith("output_dir=") for o in args.opt)
    # Precision: fp32 on CUDA is IEEE fp32 (TF32 off) for the whole run; AMP's fp16 work is unaffected.
    with distributed_context(cfg.device) as ctx, exact_fp32(ctx.device):
        train(cfg, ctx, resume=args.resume, init_from=args.pre_ckpt_path, overwrite=args.overwrite,
              output_dir_given=output_dir_given)


if __name__ == "__main__":
    run_entry(main)
