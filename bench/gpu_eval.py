"""One prepared script for a GPU session: where evaluation time goes with b4 at 224 px on CIFAR-size
random images, and the whole pipeline's images/s against the paper's 960 images/s (RTX 4090).
Target: >= 3x that (2880 images/s) on one H100. Runs on CPU too (small N) to check it works.

    python bench/gpu_eval.py [--images 8192] [--batch 256]

Measured separately: CPU decode + resize (DataLoader workers), backbone fp32 / fp16 autocast,
LFDN reconstruction, the whole pipeline (our extraction + reconstruction code, default settings),
and, as alternatives we do not ship, channels-last convolutions and resizing on the GPU, each
with its effect on the features.
"""
import argparse

import numpy as np
import torch
import torch.nn.functional as F
from common import backbone_weights, record, timed

from datasets.images import ArrayImages
from models.features import MultiLayerFeatures, standardize
from experiment.config import Config
from utils.distributed import DistContext
from engine.extraction import extract_features, loader_for, mode_of
from engine.scorer import Scorer
from utils.loader import decoded
from utils.precision import exact_fp32
from engine.factory import build_diffusion, build_lfdn


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    ctx = DistContext(0, 1, 0, device)
    # Precision first: the fp32 rows are IEEE fp32 (TF32 off), as every entry point runs them.
    with exact_fp32(device):
        measure(args, cuda, device, ctx)


def measure(args, cuda, device, ctx) -> None:
    n = args.images or (8192 if cuda else 64)
    b = args.batch if cuda else 16
    cfg = Config()
    cfg.extract_batch_size, cfg.eval.batch_size = b, max(b, 256)
    workers = cfg.workers(cuda)
    images = ArrayImages("cifar-like", np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), 224)
    f = MultiLayerFeatures("efficientnet-b4", backbone_weights("efficientnet-b4")).to(device)
    model = build_lfdn(cfg, 720).to(device).eval()
    diffusion = build_diffusion(cfg)
    rows = [("setup", f"{n} images 32x32 -> 224 px, batch {b}, {workers} decode workers, device {device}")]

    def decode_only():
        for _ in decoded(loader_for(cfg, ctx, images, b)):
            pass
    t = timed(decode_only, 1)
    rows.append(("CPU decode + resize (DataLoader), images/s", f"{n / t:.0f}"))

    x = f.normalize(torch.stack([images[i] for i in range(b)]).to(device))
    for amp in (False, True):
        def fwd():
            with torch.no_grad(), torch.autocast("cuda", torch.float16, enabled=amp and cuda):
                for _ in range(max(1, n // b // 4)):
                    f(x)
        t = timed(fwd, 3)
        rows.append((f"backbone {'fp16 autocast' if amp and cuda else 'fp32'}, prepared tensors, images/s",
                     f"{max(1, n // b // 4) * b / t:.0f}"))
    # Alternative not shipped: channels-last memory format (other convolution kernels, so other
    # rounding). Measure the speed and the effect on the standardised features.
    f_cl = MultiLayerFeatures("efficientnet-b4", backbone_weights("efficientnet-b4")).to(device)
    f_cl = f_cl.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def fwd_cl():
        with torch.no_grad(), torch.autocast("cuda", torch.float16, enabled=cuda):
            for _ in range(max(1, n // b // 4)):
                f_cl(x_cl)
    t = timed(fwd_cl, 3)
    with torch.no_grad(), torch.autocast("cuda", torch.float16, enabled=cuda):
        ref, alt = standardize(f(x).float(), f.indices), standardize(f_cl(x_cl).float(), f.indices)
    rows += [(f"backbone {'fp16 autocast' if cuda else 'fp32'} channels_last (not shipped), images/s",
              f"{max(1, n // b // 4) * b / t:.0f}"),
             ("channels_last vs default: max abs difference of standardised features", f"{(ref - alt).abs().max():.2e}")]

    scorer = Scorer(cfg, ctx, f, diffusion, {"end": model})
    z = standardize(torch.randn(n, 720, device=device), f.indices)
    keys = torch.arange(n)
    for amp in (False, True):
        cfg.amp = amp
        scorer.mode = mode_of(cfg, ctx)
        t = timed(lambda: scorer.scores(z, keys), 3)
        rows.append((f"LFDN reconstruction + scores ({'fp16 autocast' if amp and cuda else 'fp32'}), images/s",
                     f"{n / t:.0f}"))
    for amp in (True, False):
        cfg.amp = amp
        scorer.mode = mode_of(cfg, ctx)

        def pipeline():
            raw, image_keys = extract_features(f, images, ctx, cfg, scorer.mode, "pipeline")
            scorer.scores(standardize(raw, f.indices), image_keys)
        t = timed(pipeline, 2)
        label = "fp16 autocast (default on CUDA)" if amp and cuda else "fp32"
        rows.append((f"whole pipeline {label}, images/s", f"{n / t:.0f}"))
        rows.append((f"whole pipeline {label} vs paper's 960 images/s", f"{n / t / 960:.2f}x"))

    # Alternative not shipped: upload 32x32 uint8 and resize on the device. Bilinear with antialias
    # differs from PIL's resize, so the features change; measure how much and how fast.
    raw32 = torch.from_numpy(images.array[:b]).to(device)
    mean, std = f.mean, f.std

    def gpu_resize():
        y = raw32.permute(0, 3, 1, 2).float().div(255)
        y = F.interpolate(y, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        return (y - mean) / std
    t = timed(gpu_resize, 3)
    with torch.no_grad():
        ref = standardize(f(x), f.indices)
        alt = standardize(f(gpu_resize()), f.indices)
    cos = F.cosine_similarity(ref, alt, dim=-1)
    rows += [("GPU resize (not shipped), images/s", f"{b / t:.0f}"),
             ("GPU resize vs PIL: feature cosine (min / mean)", f"{cos.min():.5f} / {cos.mean():.5f}"),
             ("GPU resize vs PIL: max abs difference of standardised features", f"{(ref - alt).abs().max():.4f}")]
    record("GPU evaluation throughput (b4 @ 224 px)", rows,
           "random backbone weights unless efficientnet-b4-6ed6700e.pth is present; speed does not depend on them")


if __name__ == "__main__":
    main()
