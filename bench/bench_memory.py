"""Memory: peak resident memory of training and of evaluation on the demo config (the real
scripts, each in its own process), and the feature cache's size against N x D x 4 bytes.

    python bench/bench_memory.py
"""
import glob
import os
import subprocess
import sys
import tempfile

import psutil
import torch
from common import ROOT, record


def peak_rss(cmd) -> float:
    """Peak resident set size (MiB) of a command and its children, sampled every 20 ms."""
    proc = psutil.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [proc] + proc.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        try:
            proc.wait(0.02)
        except psutil.TimeoutExpired:
            pass
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return peak / 2 ** 20


def main():
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--opt", f"output_dir={tmp}/ckpt", "--cache_dir", f"{tmp}/cache"]
        train = peak_rss([sys.executable, "main.py", "--config", "config/demo.yaml", *common])
        ev = peak_rss([sys.executable, "test_mse_mfsim.py", "--pretrained_ldm_cfg", "config/demo.yaml",
                       "--pretrained_ldm_ckpt", f"{tmp}/ckpt/checkpoint-last.pth", "--output_dir", f"{tmp}/res",
                       "--no_plots", *common])
        rows = [("training, demo config (main.py), peak RSS", f"{train:.0f} MiB"),
                ("evaluation, demo config (test_mse_mfsim.py, features extracted), peak RSS", f"{ev:.0f} MiB")]
        for path in sorted(glob.glob(f"{tmp}/cache/*.pt")):
            n, d = torch.load(path, weights_only=True)["features"].shape
            size = os.path.getsize(path)
            rows.append((f"cache {os.path.basename(path).split('-')[0]} ({n} x {d})",
                         f"{size / 2 ** 20:.2f} MiB = {size / (n * d * 4):.3f} x N*D*4"))
    record("Memory (demo config)", rows)


if __name__ == "__main__":
    main()
