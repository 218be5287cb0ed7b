"""Training: one epoch on cached features vs one epoch as the release runs it (backbone on every
image, every epoch), same config and images; and the projected ratio for a whole run.

    python bench/bench_train.py [--configs release demo] [--images N]

Targets: per-epoch ratio >= 10 for the release config (b4 @ 224 px) on CPU.
"""
import argparse
import os
import tempfile
import time

import torch
from common import ROOT, backbone_weights, paired, record

from experiment.config import load_config, override
from utils.distributed import DistContext
from engine.training import build_trainer

CONFIGS = {"release": ("config/Config.yaml", 256), "demo": ("config/demo.yaml", 2048)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--images", type=int, help="training images (default: 256 release, 2048 demo)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = DistContext(0, 1, 0, device)
    rows = []
    for name in args.configs:
        path, default_n = CONFIGS[name]
        n = args.images or default_n
        with tempfile.TemporaryDirectory() as tmp:
            trainers = {}
            for cached in (True, False):
                cfg = load_config(os.path.join(ROOT, path))
                # Noise images at CIFAR size stand in for the dataset: the cost does not depend on content.
                for key, value in {"train.dataset": f"noise:uniform:{n}", "train.subset": None,
                                   "train.cache_features": cached, "cache_dir": tmp, "output_dir": tmp,
                                   "backbone.weights": backbone_weights(cfg.backbone.name)}.items():
                    override(cfg, key, value)
                start = time.perf_counter()
                trainers[cached] = build_trainer(cfg, ctx)
                if cached:
                    extract = time.perf_counter() - start
            epochs = trainers[True].cfg.train.epochs
            t_cached, t_release, ratio = paired(lambda: trainers[True].train_one_epoch(0),
                                                lambda: trainers[False].train_one_epoch(0), args.repeats)
            c = trainers[True].cfg
            rows += [(f"{name}: config", f"{c.backbone.name} @ {c.backbone.input_size} px, LFDN "
                                         f"{sum(q.numel() for q in trainers[True].model.parameters()) / 1e6:.1f}M, "
                                         f"batch {c.train.batch_size}, {n} images, {epochs} epochs"),
                     (f"{name}: one-off feature extraction, s", f"{extract:.2f}"),
                     (f"{name}: epoch on cached features, s", f"{t_cached:.2f}"),
                     (f"{name}: epoch as the release (backbone every epoch), s", f"{t_release:.2f}"),
                     (f"{name}: per-epoch ratio" + (" (target >= 10)" if name == "release" else ""), f"{ratio:.1f}"),
                     (f"{name}: projected {epochs}-epoch ratio (extraction + {epochs} cached vs {epochs} release)",
                      f"{epochs * t_release / (extract + epochs * t_cached):.1f}")]
    record("Training: cached features vs the release's per-epoch backbone", rows,
           f"device {device}; medians of {args.repeats} alternating epochs")


if __name__ == "__main__":
    main()
