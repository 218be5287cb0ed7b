"""How the cost grows with the work, on this machine:

- baselines: kNN (k = 1, 50) and Mahalanobis fitted on 50,000 and scoring 70,000 random 720-d
  vectors (CIFAR-10's training set against its test set and six OOD sets): seconds and peak RSS
  (target: at most 2 minutes and 2 GiB on 2 cores);
- predict.py over 1,000 and 10,000 small image files (a tiny checkpoint trained here first):
  seconds per file and peak RSS (targets: the 10,000-file run within 1.2x of the 1,000-file run
  in both);
- training: seconds per epoch at 6,000 and 60,000 cached vectors with the demo's LFDN (should
  grow linearly: 10x the vectors, about 10x the time);
- checkpoint: the time to write checkpoint-last.pth of the paper's 86.7M LFDN (weights, EMA,
  AdamW moments) against the time of its training epoch, per 1,000 cached vectors (the
  preemption budget ``train.save_overhead`` decides from such figures how often it is written).

    python bench/bench_scale.py [--parts baselines,predict,training]

Each part runs in a child process, so its peak RSS (ru_maxrss) is its own; results are dated rows
in bench/RESULTS.md.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from common import ROOT, record

PARTS = ("baselines", "predict", "training", "checkpoint")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child_baselines() -> dict:
    from scoring.baselines import Baselines
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(50_000, 720, generator=g), torch.randn(70_000, 720, generator=g)
    before = peak_rss_mib()
    start = time.perf_counter()
    fitted = Baselines(train, ["knn", "mahalanobis"], [1, 50])
    fit_s = time.perf_counter() - start
    scores = fitted.scores(test)
    total = time.perf_counter() - start
    assert all(len(v) == 70_000 and np.isfinite(v).all() for v in scores.values())
    return {"fit_s": fit_s, "total_s": total, "rss_before_mib": before, "peak_rss_mib": peak_rss_mib()}


def child_training(n: int) -> dict:
    from experiment.config import load_config
    from utils.distributed import DistContext
    from engine.factory import build_extractor
    from engine.training import train
    cfg = load_config(os.path.join(ROOT, "config", "demo.yaml"))
    cfg.device, cfg.train.epochs, cfg.train.save_every = "cpu", 2, 100
    cfg.output_dir = tempfile.mkdtemp(prefix="bench-scale-train-")
    extractor = build_extractor(cfg)
    z = torch.randn(n, extractor.feature_dim, generator=torch.Generator().manual_seed(0))
    train(cfg, DistContext(0, 1, 0, torch.device("cpu")), features=z, extractor=extractor)
    with open(os.path.join(cfg.output_dir, "log.txt")) as f:
        epochs = [json.loads(line) for line in f]
    return {"epoch_s": epochs[-1]["seconds"], "steps": epochs[-1]["steps"], "peak_rss_mib": peak_rss_mib()}


def child_checkpoint() -> dict:
    """Seconds to write the release config's checkpoint, and seconds per training step of batch 256."""
    from models.diffusion import GaussianDiffusion
    from models.features import BackboneId
    from store.checkpoint import make_payload, save_checkpoint
    from experiment.config import load_config
    from utils.distributed import DistContext
    from engine.training import training_model
    cfg = load_config(os.path.join(ROOT, "config", "Config.yaml"))
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    model, ema, optimizer, scaler = training_model(cfg, ctx, 720, None)
    diffusion, b = GaussianDiffusion(), cfg.train.batch_size
    steps = 3
    start = time.perf_counter()
    for _ in range(steps):  # the trainer's step: loss, backward, AdamW, EMA
        z0 = torch.randn(b, 720)
        loss = diffusion.training_loss(model, z0, torch.randint(0, 100, (b,)), torch.randn(b, 720))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)
    step_s = (time.perf_counter() - start) / steps
    backbone = BackboneId("efficientnet-b4", "0" * 16, 224, 720, [0, 1, 2, 3, 4], [24, 56, 112, 272, 720])
    payload = make_payload(model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                           scaler=scaler.state_dict(), epoch=0, config={}, backbone=backbone, run_id="bench")
    with tempfile.TemporaryDirectory(prefix="bench-save-") as d:
        times = []
        for i in range(3):
            t0 = time.perf_counter()
            save_checkpoint(payload, os.path.join(d, "checkpoint-last.pth"))
            times.append(time.perf_counter() - t0)
        size = os.path.getsize(os.path.join(d, "checkpoint-last.pth"))
    return {"save_s": sorted(times)[1], "bytes": size, "step_s": step_s, "batch": b,
            "params": sum(p.numel() for p in model.parameters())}


def run_child(*args: str) -> dict:
    """Run this script as a child for one part; its JSON answer, with its peak RSS."""
    proc = subprocess.run([sys.executable, __file__, "--child", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def timed_process(cmd: list) -> tuple:
    """(wall seconds, peak RSS MiB) of a command, from the kernel's accounting of that child alone."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed: {proc.stderr.read()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def predict_rows(workdir: str) -> list:
    """A tiny checkpoint (digits, Lite0 at 32 px), then predict.py over 1,000 and 10,000 PNG files."""
    from PIL import Image
    import yaml
    cfg = {"data_path": os.path.join(workdir, "data"), "output_dir": os.path.join(workdir, "ckpt"),
           "cache_dir": os.path.join(workdir, "cache"), "device": "cpu", "download": False, "num_workers": 0,
           "backbone": {"name": "efficientnet-lite0", "input_size": 32},
           "lfdn": {"model_channels": 64, "time_embed_dim": 32, "bottleneck_channels": 64, "num_res_blocks": 2},
           "train": {"dataset": "digits", "subset": 256, "batch_size": 32, "epochs": 1, "lr": 1e-3},
           "eval": {"dataset": "digits", "ood": {"gauss": "noise:gaussian:16"}}}
    config = os.path.join(workdir, "tiny.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    subprocess.run([sys.executable, "main.py", "--config", config], cwd=ROOT, check=True, capture_output=True)
    rng = np.random.default_rng(0)
    folders = {}
    for n in (1_000, 10_000):
        folder = os.path.join(workdir, f"images-{n}")
        os.makedirs(folder)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(os.path.join(folder, f"{i:05d}.png"))
        folders[n] = folder
    ckpt = os.path.join(cfg["output_dir"], "checkpoint-last.pth")

    def predict(n: int, tag: str):
        return timed_process([sys.executable, "predict.py", "--checkpoint", ckpt, "--images", folders[n],
                              "--output", os.path.join(workdir, f"p-{n}-{tag}.csv")])

    predict(1_000, "calibrate")  # computes and keeps the calibration record: not part of the comparison
    (t1, r1), (t10, r10) = predict(1_000, "a"), predict(10_000, "a")
    return [("predict.py, 1,000 files: seconds per file (wall / files)", f"{t1 / 1_000 * 1e3:.2f} ms"),
            ("predict.py, 10,000 files: seconds per file (wall / files)", f"{t10 / 10_000 * 1e3:.2f} ms"),
            ("predict.py, seconds per file, 10,000 / 1,000", f"{(t10 / 10_000) / (t1 / 1_000):.2f} (target <= 1.2)"),
            ("predict.py, marginal seconds per file (10,000 - 1,000 files)", f"{(t10 - t1) / 9_000 * 1e3:.2f} ms"),
            ("predict.py, peak RSS 1,000 / 10,000 files", f"{r1:.0f} / {r10:.0f} MiB"),
            ("predict.py, peak RSS 10,000 / 1,000", f"{r10 / r1:.2f} (target <= 1.2)")]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        part = args.child[0]
        out = child_baselines() if part == "baselines" else child_checkpoint() if part == "checkpoint" \
            else child_training(int(args.child[1]))
        print(json.dumps(out))
        return
    rows = []
    parts = [x for x in args.parts.split(",") if x]
    if "baselines" in parts:
        b = run_child("baselines")
        rows += [("baselines 50,000 x 70,000 x 720 (kNN k = 1, 50 + Mahalanobis): fit / total seconds",
                  f"{b['fit_s']:.1f} / {b['total_s']:.1f} (target <= 120)"),
                 ("baselines: peak RSS (RSS with the vectors, before fitting)",
                  f"{b['peak_rss_mib']:.0f} MiB ({b['rss_before_mib']:.0f} MiB) (target <= 2048)")]
    if "predict" in parts:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as workdir:
            rows += predict_rows(workdir)
    if "training" in parts:
        small, large = run_child("training", "6000"), run_child("training", "60000")
        rows += [("training, demo LFDN, 6,000 cached vectors: seconds per epoch", f"{small['epoch_s']:.2f}"),
                 ("training, demo LFDN, 60,000 cached vectors: seconds per epoch", f"{large['epoch_s']:.2f}"),
                 ("training, per-epoch time 60,000 / 6,000 (linear: 10 x the steps)",
                  f"{large['epoch_s'] / small['epoch_s']:.2f} ({large['steps']} / {small['steps']} steps)")]
    if "checkpoint" in parts:
        c = run_child("checkpoint")
        per_1000 = c["step_s"] * 1000 / c["batch"]
        rows += [(f"checkpoint-last.pth of the {c['params'] / 1e6:.1f}M LFDN: size, write seconds",
                  f"{c['bytes'] / 2 ** 30:.2f} GiB, {c['save_s']:.2f} s (median of 3)"),
                 ("its training: seconds per 1,000 cached vectors (batch 256)", f"{per_1000:.2f}"),
                 ("write / epoch at 6,000 vectors (the near split)", f"{c['save_s'] / (6 * per_1000):.1%}"),
                 ("write / epoch at 50,000 vectors (CIFAR-10)", f"{c['save_s'] / (50 * per_1000):.1%}")]
    record("How the cost grows with the work (bench/bench_scale.py)", rows,
           "2 threads; each part in its own process")


if __name__ == "__main__":
    main()
