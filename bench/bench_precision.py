"""The opt-in fast CPU path against exact fp32, side by side.

1. Speed and features: images/s of the backbone (b4 @ 224 and the demo's Lite0 @ 64) in fp32 and
   each fast setting, timed alternately, with the largest difference each makes to the
   standardised features. The fast path (``precision: bf16``) is bf16 autocast, and for b4 also
   nn.SiLU's fused swish; ``channels_last`` adds channels-last convolutions. bf16 is timed only
   where the CPU has native bf16 (avx512_bf16 / amx_bf16); elsewhere it is emulated and slow, and
   only its feature difference is shown. The fused swish alone is timed in fp32 on any CPU.
2. Accuracy: the AUROC of every set and score of the `make benchmark` split (its seed-0
   checkpoint) under each setting, minus fp32's, beside the benchmark's seed-to-seed std. bf16
   runs emulated where the CPU lacks it (``DLSR_MEASURE_EMULATED_BF16=1``, set here for the
   measurement only): the same rounding, only slower. The criterion: no AUROC of DLSR's scores
   (MFsim, MSE) falls by more than 0.1 points; rises within the seed noise are fine.

    python bench/bench_precision.py [--no_auroc] [--no_speed] [--near_only]
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch
from common import BENCHMARK_OUT, ROOT, SPLIT_CONFIG, paired, record

from models.features import MultiLayerFeatures, standardize
from utils.precision import EMULATED_BF16_ENV, native_bf16

DLSR_SCORES = ("MFsim", "MSE")
ALLOWED_FALL = 0.1  # AUROC points
# label: (precision, channels_last, fused swish): the fast path's swish goes with bf16
SETTINGS = {
    "fp32 channels-last": ("fp32", True, False),
    "fp32 fused SiLU": ("fp32", False, True),
    "bf16 (+ SiLU on b4)": ("bf16", False, True),
    "bf16 + channels-last (+ SiLU on b4)": ("bf16", True, True),
}


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


def speed_rows(name: str, size: int, batch: int, repeats: int) -> list:
    torch.manual_seed(0)
    f = calibrated(name, size)
    x = torch.randn(batch, 3, size, size)

    def run(precision: str, channels_last: bool, silu: bool, n: int = batch):
        f.use_fused_swish(silu)
        f.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        xi = x[:n].contiguous(memory_format=torch.channels_last) if channels_last else x[:n]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return standardize(f(xi).float(), f.indices)

    reference = run("fp32", False, False)
    rows = []
    for label, (precision, cl, silu) in SETTINGS.items():
        if silu and not f.has_swish and precision == "fp32":
            continue  # Lite0 has no swish
        emulated = precision == "bf16" and not native_bf16()
        n = 2 if emulated else batch  # emulated bf16 convolutions are slow: the difference on 2 images
        diff = (run(precision, cl, silu, n) - reference[:n]).abs().max().item()
        rows.append((f"{name} @ {size}: {label}, largest standardised-feature difference"
                     f"{' (emulated, 2 images)' if emulated else ''}", f"{diff:.3g}"))
        if emulated:
            rows.append((f"{name} @ {size}: {label}, speed", "not measured: bf16 is emulated on this CPU"))
            continue
        t_fp32, t_fast, ratio = paired(lambda: run("fp32", False, False), lambda: run(precision, cl, silu), repeats)
        rows += [(f"{name} @ {size}: fp32 images/s", f"{batch / t_fp32:.1f}"),
                 (f"{name} @ {size}: {label} images/s", f"{batch / t_fast:.1f}"),
                 (f"{name} @ {size}: {label} speed-up over fp32 (median of pairs)", f"{1 / ratio:.2f}x")]
    return rows


def seed_std() -> dict:
    """{(score, set): std of the AUROC over the benchmark's seeds, in points}, if make benchmark was run."""
    path = os.path.join(BENCHMARK_OUT, "benchmark.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        table = json.load(f)["percent"]
    return {(field, row): float(np.std(m["AUROC"])) for field, rows in table.items() for row, m in rows.items()}


def auroc_rows(config: str, ckpt: str, near_only: bool) -> list:
    """AUROC of each setting minus fp32's, per set and score, on the benchmark split (``near_only``:
    the ID test set and shirt alone, without baselines: what emulated bf16 can finish here)."""
    narrow = ["--ood", "shirt=fashion-mnist@6", "--baselines", ""] if near_only else []

    def evaluate(tag: str, *flags: str, env: dict = None) -> dict:
        out = os.path.join(BENCHMARK_OUT, f"precision-{tag}{'-near' if near_only else ''}")
        cmd = [sys.executable, os.path.join(ROOT, "test_mse_mfsim.py"), "--pretrained_ldm_ckpt", ckpt,
               "--pretrained_ldm_cfg", config, "--cache_dir", os.path.join(BENCHMARK_OUT, "feature_cache"),
               "--output_dir", out, "--no_plots", *narrow, *flags]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        with open(os.path.join(out, "results.json")) as f:
            return json.load(f)["metrics"]

    base, std, rows = evaluate("fp32"), seed_std(), []
    for label, (precision, cl, _) in SETTINGS.items():
        if label == "fp32 fused SiLU":
            continue  # the benchmark's Lite0 has no swish
        if near_only and precision == "bf16" and cl:
            continue  # channels-last alone changes no AUROC (0.000); emulated, this run would take hours
        emulated = precision == "bf16" and not native_bf16()
        got = evaluate(label.split(" (")[0].replace(" ", "-").replace("+", "plus"), "--precision", precision,
                       *(["--channels_last"] if cl else []), env={EMULATED_BF16_ENV: "1"} if emulated else None)
        changes = [((got[f][s]["AUROC"] - base[f][s]["AUROC"]) * 100, f, s)
                   for f in base for s in base[f] if base[f][s] is not None]
        worst_fall = min((c for c in changes if c[1] in DLSR_SCORES), default=(0.0, "-", "-"))
        verdict = "meets" if worst_fall[0] >= -ALLOWED_FALL else "MISSES"
        tag = f"{label}{' (emulated)' if emulated else ''}"
        rows.append((f"benchmark split: {tag}, largest fall of a DLSR AUROC (points)",
                     f"{-min(worst_fall[0], 0):.3f} ({worst_fall[1]}, {worst_fall[2]}): {verdict} the "
                     f"criterion (at most {ALLOWED_FALL})"))
        for change, f, s in sorted(changes, key=lambda c: -abs(c[0]))[:8]:
            noise = std.get((f, s))
            beside = f", seed std {noise:.2f}" if noise is not None and f in DLSR_SCORES else ""
            way = "up" if change > 0 else "down" if change < 0 else "unchanged"
            rows.append((f"benchmark split: {tag}, {f} on {s}", f"{change:+.3f} ({way}{beside})"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no_auroc", action="store_true", help="skip the AUROC comparison (needs make benchmark first)")
    p.add_argument("--no_speed", action="store_true", help="skip the timings")
    p.add_argument("--near_only", action="store_true", help="AUROC on the ID test set and shirt only, without "
                   "baselines, and no emulated bf16 + channels-last (emulated bf16 is slow on CPUs without it)")
    args = p.parse_args()
    rows = [("native bf16 on this CPU", "yes" if native_bf16() else "no (bf16 timings not measured; its accuracy "
                                                                     "is measured emulated)")]
    if not args.no_speed:
        rows += speed_rows("efficientnet-b4", 224, 8, args.repeats)
        rows += speed_rows("efficientnet-lite0", 64, 128, args.repeats)
    ckpt = os.path.join(BENCHMARK_OUT, "seed-0", "checkpoint", "checkpoint-last.pth")
    if not args.no_auroc:
        if os.path.isfile(ckpt):
            rows += auroc_rows(SPLIT_CONFIG, ckpt, args.near_only)
        else:
            rows.append(("benchmark split", f"not measured: {ckpt} is missing (run make benchmark first)"))
    record("Fast CPU path vs exact fp32 (bench/bench_precision.py)", rows, "device cpu")


if __name__ == "__main__":
    main()
