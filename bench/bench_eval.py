"""Evaluation overhead: images/s of the whole scoring pipeline vs the backbone alone.

Pipeline = our evaluation code on in-memory images: decode + resize (DataLoader), batched
normalise, backbone, standardise, DDIM reconstruction (k = 3), MSE + MFsim. Baseline = the
backbone's forward on already prepared tensors of the same size and batch. Target: >= 0.90.

    python bench/bench_eval.py [--images N] [--configs release demo]
"""
import argparse
import os

import numpy as np
import torch
from common import ROOT, backbone_weights, paired, record, timed

from datasets.images import ArrayImages
from models.features import MultiLayerFeatures, standardize
from experiment.config import load_config
from utils.distributed import DistContext
from engine.extraction import decode_batch_size, extract_features, loader_for, mode_of
from engine.scorer import Scorer
from utils.loader import decoded
from engine.factory import build_diffusion, build_lfdn

# config, image shape (CIFAR-10 / Fashion-MNIST), images per timed run, alternating pairs. On this
# shared VM the backbone's own speed drifts by 10-25% over seconds: the demo (2 ms per image) is
# timed in short runs, many pairs. The release runs 256 images, one full reconstruction batch as in
# a real test set (64 images made the LFDN's products 1.5x slower per image).
CONFIGS = {"release": ("config/Config.yaml", (32, 32, 3), 256, 5), "demo": ("config/demo.yaml", (28, 28), 512, 15)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--images", type=int, help="images per timed run (default: 256 release, 512 demo)")
    p.add_argument("--repeats", type=int, help="alternating pairs, the median ratio is reported (default: 5 release, 15 demo)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = DistContext(0, 1, 0, device)
    rows = []
    for name in args.configs:
        path, shape, default_n, default_repeats = CONFIGS[name]
        repeats = args.repeats or default_repeats
        cfg = load_config(os.path.join(ROOT, path))
        n, size, b = args.images or default_n, cfg.backbone.input_size, cfg.extract_batch_size
        extractor = MultiLayerFeatures(cfg.backbone.name, backbone_weights(cfg.backbone.name)).to(device)
        model = build_lfdn(cfg, extractor.feature_dim).to(device).eval()
        diffusion = build_diffusion(cfg)
        images = ArrayImages(name, np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8), size)
        prepared = [extractor.normalize(torch.stack([images[i] for i in range(j, min(j + b, n))]).to(device))
                    for j in range(0, n, b)]

        def backbone_only():
            with torch.no_grad():
                for x in prepared:
                    extractor(x)

        def extract():
            return extract_features(extractor, images, ctx, cfg, mode_of(cfg, ctx), "bench")

        scorer = Scorer(cfg, ctx, extractor, diffusion, {"end": model})

        def reconstruct(extracted):
            raw, keys = extracted
            scorer.scores(standardize(raw, extractor.indices), keys)

        def pipeline():
            reconstruct(extract())

        def decode_only():
            for _ in decoded(loader_for(cfg, ctx, images, decode_batch_size(b))):
                pass

        raw = extract()
        t_backbone, t_pipe, slowdown = paired(backbone_only, pipeline, repeats)
        parts = {"decode + resize": timed(decode_only, 3, 1), "backbone": t_backbone,
                 "reconstruction + scores": timed(lambda: reconstruct(raw), 3, 1)}
        lfdn_m = sum(q.numel() for q in model.parameters()) / 1e6
        setup = (f"{cfg.backbone.name} @ {size} px, LFDN {lfdn_m:.1f}M, extract batch {b}, eval batch {cfg.eval.batch_size}, "
                 f"workers {cfg.workers(ctx.cuda)}, {n} images, {repeats} pairs")
        rows += [(f"{name}: config", setup),
                 (f"{name}: backbone only, images/s", f"{n / t_backbone:.1f}"),
                 (f"{name}: whole pipeline, images/s", f"{n / t_pipe:.1f}"),
                 (f"{name}: pipeline / backbone throughput (target >= 0.90)", f"{1 / slowdown:.3f}"),
                 (f"{name}: parts alone, ms per image", ", ".join(f"{k} {v * 1e3 / n:.3f}" for k, v in parts.items()))]
    record("Evaluation overhead", rows, f"device {device}; median ratio of alternating runs")


if __name__ == "__main__":
    main()
