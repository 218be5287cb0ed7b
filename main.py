"""Train the LFDN on in-distribution images.

    python main.py --config config/Config.yaml --data_path ./data
    torchrun --nproc_per_node=N main.py --config config/Config.yaml --data_path ./data

Writes checkpoint-0.pth, checkpoint-<25k>.pth and checkpoint-last.pth, log.txt and config.yaml to
--output_dir (default ./checkpoint, where the evaluation commands of the README look).
"""
import argparse

from utils.cli import add_common_flags, resolve_config, run_entry, setup_logging
from utils.distributed import distributed_context
from utils.training import train

TRAIN_FLAGS = {
    "dataset": "train.dataset", "subset": "train.subset", "batch_size": "train.batch_size",
    "epochs": "train.epochs", "accum_iter": "train.accum_iter", "lr": "train.lr", "blr": "train.blr",
    "min_lr": "train.min_lr", "weight_decay": "train.weight_decay", "warmup_epochs": "train.warmup_epochs",
    "seed": "train.seed", "save_every": "train.save_every", "output_dir": "output_dir", "log_dir": "log_dir",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the LFDN (DLSR) on ID features.")
    p.add_argument("--config", default="config/Config.yaml", help="experiment YAML (default: %(default)s)")
    add_common_flags(p)
    p.add_argument("--dataset", help="ID training set spec, e.g. cifar10, fashion-mnist, folder:PATH")
    p.add_argument("--subset", type=int, help="train on a fixed seeded subset of this many images")
    p.add_argument("--batch_size", type=int, help="per process")
    p.add_argument("--epochs", type=int)
    p.add_argument("--accum_iter", type=int, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, help="absolute learning rate (default: the config's)")
    p.add_argument("--blr", type=float, help="base lr, used when lr is null: lr = blr * total batch / 256")
    p.add_argument("--min_lr", type=float, help="floor of the cosine schedule")
    p.add_argument("--cosine_lr", action="store_true", help="half-cosine decay after warm-up")
    p.add_argument("--warmup_epochs", type=int)
    p.add_argument("--weight_decay", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--save_every", type=int, help="also keep checkpoint-<epoch>.pth every this many epochs")
    p.add_argument("--output_dir", help="checkpoints (default: ./checkpoint)")
    p.add_argument("--log_dir", help="log.txt, config.yaml, TensorBoard (default: output_dir)")
    p.add_argument("--no_cache", action="store_true",
                   help="run the backbone on every image every epoch, as the release (slow; for comparison)")
    p.add_argument("--resume", help="continue a run from one of its checkpoints")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in an output folder that holds another run's checkpoints (they are deleted)")
    p.add_argument("--pre_ckpt_path", help="start from these LFDN weights (ours or a release checkpoint)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = resolve_config(args.config, args, TRAIN_FLAGS)
    if args.cosine_lr:
        cfg.train.cosine_lr = True
    if args.no_cache:
        cfg.train.cache_features = False
    with distributed_context(cfg.device) as ctx:
        setup_logging(ctx.is_main)
        train(cfg, ctx, resume=args.resume, init_from=args.pre_ckpt_path, overwrite=args.overwrite)


if __name__ == "__main__":
    run_entry(main)
