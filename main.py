"""Train the LFDN on in-distribution images.

    python main.py --config config/Config.yaml --data_path ./data
    torchrun --nproc_per_node=N main.py --config config/Config.yaml --data_path ./data

Writes checkpoint-0.pth, checkpoint-<25k>.pth and checkpoint-last.pth, log.txt and config.yaml to
--output_dir (./checkpoint in the shipped configs, where the evaluation commands of the README look).
"""
import argparse

from utils.cli import (TRAIN_FLAGS, add_common_flags, add_config_flags, parse_with_config, resolve_config, run_entry,
                       yaml_named_by)
from utils.config import DEFAULT_CONFIG
from utils.distributed import distributed_context
from utils.progress import setup_logging
from utils.training import train

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the LFDN (DLSR) on ID features.")
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE", help="experiment YAML (default: %(default)s)")
    add_common_flags(p)
    add_config_flags(p, TRAIN_FLAGS)
    p.add_argument("--resume", metavar="FILE", help="continue a run from one of its checkpoints")
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
    with distributed_context(cfg.device) as ctx:
        setup_logging(ctx.is_main)
        train(cfg, ctx, resume=args.resume, init_from=args.pre_ckpt_path, overwrite=args.overwrite)


if __name__ == "__main__":
    run_entry(main)
