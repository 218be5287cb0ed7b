"""The opt-in fast CPU path against exact fp32, side by side: images/s of the backbone (b4 @ 224
and the demo's Lite0 @ 64) in fp32, fp32 channels-last, bf16 autocast and bf16 channels-last, timed
alternately, with the largest difference each makes to the standardised features; then, for each
setting that this CPU runs natively, the AUROC change on the `make benchmark` split.

    python bench/bench_precision.py [--no_auroc]

bf16 is measured only where the CPU has native bf16 (avx512_bf16 / amx_bf16); elsewhere it is
emulated, slow, and never used by the scripts, and this script says so instead of timing it.
"""
import argparse
import json
import os
import subprocess
import sys

import torch
from common import BENCHMARK_OUT, ROOT, SPLIT_CONFIG, paired, record

from models.features import MultiLayerFeatures, standardize
from utils.features import native_bf16


def calibrated(name: str, size: int) -> MultiLayerFeatures:
    weights = None if name == "efficientnet-lite0" else "random"
    f = MultiLayerFeatures(name, weights=weights)
    if weights == "random":  # BatchNorm statistics from noise, so activations are O(1) as with real weights
        f.backbone.train()
        for m in f.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        with torch.no_grad():
            f.backbone(torch.randn(8, 3, size, size))
        f.backbone.eval()
    return f


def settings():
    out = [("fp32 channels-last", "fp32", True)]
    if native_bf16():
        out += [("bf16 autocast", "bf16", False), ("bf16 channels-last", "bf16", True)]
    return out


def speed_rows(name: str, size: int, batch: int, repeats: int) -> list:
    torch.manual_seed(0)
    f = calibrated(name, size)
    x = torch.randn(batch, 3, size, size)

    def run(precision: str, channels_last: bool):
        f.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        xi = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return standardize(f(xi).float(), f.indices)

    reference = run("fp32", False)
    rows = []
    for label, precision, cl in settings():
        diff = (run(precision, cl) - reference).abs().max().item()
        t_fp32, t_fast, ratio = paired(lambda: run("fp32", False), lambda: run(precision, cl), repeats)
        rows += [(f"{name} @ {size}: fp32 images/s", f"{batch / t_fp32:.1f}"),
                 (f"{name} @ {size}: {label} images/s", f"{batch / t_fast:.1f}"),
                 (f"{name} @ {size}: {label} speed-up over fp32 (median of pairs)", f"{1 / ratio:.2f}x"),
                 (f"{name} @ {size}: {label} largest standardised-feature difference", f"{diff:.3g}")]
    return rows


def auroc_rows(config: str, ckpt: str) -> list:
    """AUROC of each setting minus fp32's, per set and score, on the benchmark split."""
    def evaluate(tag: str, *flags: str) -> dict:
        out = os.path.join(BENCHMARK_OUT, f"precision-{tag}")
        cmd = [sys.executable, os.path.join(ROOT, "test_mse_mfsim.py"), "--pretrained_ldm_ckpt", ckpt,
               "--pretrained_ldm_cfg", config, "--cache_dir", os.path.join(BENCHMARK_OUT, "feature_cache"),
               "--output_dir", out, "--no_plots", *flags]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        with open(os.path.join(out, "results.json")) as f:
            return json.load(f)["metrics"]

    base = evaluate("fp32")
    rows = []
    for label, precision, cl in settings():
        got = evaluate(label.replace(" ", "-"), "--precision", precision, *(["--channels_last"] if cl else []))
        worst = max((abs(got[f][s]["AUROC"] - base[f][s]["AUROC"]) * 100, f, s)
                    for f in base for s in base[f] if base[f][s] is not None)
        rows.append((f"benchmark split: {label}, largest AUROC change vs fp32 (points)",
                     f"{worst[0]:.3f} ({worst[1]}, {worst[2]})"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no_auroc", action="store_true", help="skip the AUROC comparison (needs make benchmark first)")
    args = p.parse_args()
    rows = [("native bf16 on this CPU", "yes" if native_bf16() else "no (bf16 not measured: emulated, never used)")]
    rows += speed_rows("efficientnet-b4", 224, 8, args.repeats)
    rows += speed_rows("efficientnet-lite0", 64, 128, args.repeats)
    ckpt = os.path.join(BENCHMARK_OUT, "seed-0", "checkpoint", "checkpoint-last.pth")
    if not args.no_auroc and os.path.isfile(ckpt):
        rows += auroc_rows(SPLIT_CONFIG, ckpt)
    record("Fast CPU path vs exact fp32 (bench/bench_precision.py)", rows, "device cpu")


if __name__ == "__main__":
    main()
