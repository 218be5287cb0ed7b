"""Shared by the benchmark scripts: machine description, timing, and the dated rows in RESULTS.md."""
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils.runtime import keep_freed_memory  # noqa: E402  (the scripts measure what the entry points run)

keep_freed_memory()
RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")
SPLIT_CONFIG = "config/fmnist_split.yaml"            # the offline near/far benchmark (make benchmark)
BENCHMARK_OUT = os.path.join(ROOT, "benchmark_output")  # its runs, and the feature cache the others reuse


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu} x{os.cpu_count()} cores{gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"Python {platform.python_version()}")


def timed(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs (this VM is noisy)."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the warm-up's kernels finish before the clock starts
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired(fn_a, fn_b, repeats: int = 5, warmup: int = 1):
    """Time a and b alternately (a, b, a, b, ...) so that drift of this shared machine hits both alike.

    Returns (median seconds of a, median seconds of b, median over pairs of t_b / t_a).
    """
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(fn_a, 1, 0))
        tb.append(timed(fn_b, 1, 0))
    return statistics.median(ta), statistics.median(tb), statistics.median(b / a for a, b in zip(ta, tb))


NO_RECORD_ENV = "DLSR_BENCH_NO_RECORD"


def record(title: str, rows: list, notes: str = "") -> None:
    """Print the rows and append them, dated, with machine and command, to bench/RESULTS.md."""
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    lines = [f"\n### {title} ({datetime.datetime.now():%Y-%m-%d %H:%M})\n", f"- machine: {machine()}",
             f"- command: `{command}`"]
    if notes:
        lines.append(f"- {notes}")
    lines += ["", "| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if os.environ.get(NO_RECORD_ENV) != "1":  # bench/gpu_check.py's dry run on a CPU sets it: no row for that
        with open(RESULTS, "a") as f:
            f.write(text)


def run(script: str, *args: str) -> None:
    """Run an entry script of the repository as a user would; stop with its error output if it fails."""
    cmd = [sys.executable, os.path.join(ROOT, script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def backbone_weights(name: str) -> str:
    """Real weights where present; otherwise random ones (speed does not depend on the values)."""
    from models.backbones import WEIGHT_SEARCH_DIRS, backbone
    if name == "efficientnet-lite0":
        return None
    for d in WEIGHT_SEARCH_DIRS:
        for f in backbone(name).weight_files:
            if os.path.isfile(os.path.join(ROOT, d, f)):
                return os.path.join(ROOT, d, f)
    return "random"
