"""Does scale close DLSR's gap to a 1-NN on the near split? Near AUROC (shirt against Fashion-MNIST
classes 0-4; MFsim and MSE) for larger LFDNs, longer training and 224 px inputs, beside kNN (k = 1,
50) and Mahalanobis on the same features, one training seed (0), with each row's wall time.

    python bench/scale_study.py [--out scale_output] [--only 64:1440x4:20,224:512x2:20]

Settings are SIZE:WIDTHxDEPTH:EPOCHS: input size 64 (the benchmark's) or 224 (Lite0 at 224 px,
the analogue of the paper's 32 -> 224 upsampling); LFDN width x depth 512 x 2 (the benchmark's),
1440 x 4, 1440 x 16 (the paper's 86.7M-size network, 1440 wide, 720-d time embedding); 20 or 50
epochs (the paper trains 150; see the printout for what fitted). Runs the real scripts, one
output folder per (size, network); a 50-epoch row continues the 20-epoch run with --resume (the
learning rate is constant, so this equals a 50-epoch run). Everything is resumable: a finished
row is kept in <out>/rows.json, an interrupted training continues from its checkpoint-last.pth.
Writes <out>/scale.md and a dated table in bench/RESULTS.md.
"""
import argparse
import json
import os
import sys
import time

from common import BENCHMARK_OUT, ROOT, SPLIT_CONFIG, record, run

NETWORKS = {"512x2": (512, 256, 2), "1440x4": (1440, 720, 4), "1440x16": (1440, 720, 16)}
# In the order they are run: the cheap and informative first, the longest last.
DEFAULT = ["64:512x2:20", "64:512x2:50", "64:1440x4:20", "64:1440x16:20", "224:512x2:20", "224:1440x4:20",
           "64:1440x4:50", "224:1440x16:20", "224:512x2:50", "64:1440x16:50", "224:1440x4:50"]
METHODS = ("MFsim", "MSE", "kNN_k1", "kNN_k50", "Mahalanobis")


def trained_epochs(ckpt_dir: str) -> int:
    """Epochs finished by the run in ``ckpt_dir`` (0 if none), read from its log."""
    log = os.path.join(ckpt_dir, "log.txt")
    if not os.path.isfile(log):
        return 0
    with open(log) as f:
        return 1 + max((json.loads(line)["epoch"] for line in f if line.strip()), default=-1)


def check_setting(setting: str):
    """Why ``setting`` is not SIZE:WIDTHxDEPTH:EPOCHS with a known network (None if it is)."""
    parts = setting.split(":")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[2].isdigit() or int(parts[0]) < 1 or int(parts[2]) < 1:
        return "expected SIZE:WIDTHxDEPTH:EPOCHS, e.g. 64:512x2:20"
    if parts[1] not in NETWORKS:
        return f"unknown network {parts[1]!r}; one of {', '.join(NETWORKS)}"
    return None


def row(setting: str, out: str, cache: str) -> dict:
    size, net, epochs = setting.split(":")
    width, temb, depth = NETWORKS[net]
    ckpt_dir = os.path.join(out, f"{size}px-{net}")
    common = ["--cache_dir", cache, "--opt", f"backbone.input_size={size}"]
    lfdn = ["--opt", f"lfdn.model_channels={width}", "--opt", f"lfdn.bottleneck_channels={width}",
            "--opt", f"lfdn.time_embed_dim={temb}", "--opt", f"lfdn.num_res_blocks={depth}"]
    last = os.path.join(ckpt_dir, "checkpoint-last.pth")
    start = time.perf_counter()
    done = trained_epochs(ckpt_dir)
    if done > int(epochs):
        sys.exit(f"{ckpt_dir} has trained {done} epochs already; its {epochs}-epoch row needs its own run "
                 f"(order the settings by epochs)")
    if done < int(epochs):
        resume = ["--resume", last] if os.path.isfile(last) else ["--overwrite"]
        run("main.py", "--config", SPLIT_CONFIG, "--output_dir", ckpt_dir, "--epochs", epochs, "--seed", "0",
            "--save_every", "1000", *common, *lfdn, *resume)
    train_s = time.perf_counter() - start
    res = os.path.join(out, f"eval-{size}px-{net}-{epochs}")
    run("test_mse_mfsim.py", "--pretrained_ldm_ckpt", last, "--pretrained_ldm_cfg", SPLIT_CONFIG,
        "--ood", "shirt=fashion-mnist@6", "--baselines", "knn,mahalanobis", "--knn_k", "1,50", "--no_plots",
        "--output_dir", res, *common)
    with open(os.path.join(res, "results.json")) as f:
        metrics = json.load(f)["metrics"]
    with open(os.path.join(ckpt_dir, "log.txt")) as f:
        log = [json.loads(line) for line in f if line.strip()]
    return {"setting": setting, "size": int(size), "network": net, "epochs": int(epochs),
            "auroc": {m: 100 * metrics[m]["shirt"]["AUROC"] for m in METHODS},
            "train_seconds_total": sum(r["seconds"] for r in log[:int(epochs)]),
            "wall_seconds_this_call": time.perf_counter() - start, "train_seconds_this_call": train_s,
            "loss": log[int(epochs) - 1]["loss"]}


def markdown(rows: list) -> str:
    out = ["| input | LFDN | epochs | MFsim | MSE | kNN k=1 | kNN k=50 | Mahalanobis | training time |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a = r["auroc"]
        out.append(f"| {r['size']} px | {r['network'].replace('x', ' x ')} | {r['epochs']} | {a['MFsim']:.2f} | "
                   f"{a['MSE']:.2f} | {a['kNN_k1']:.2f} | {a['kNN_k50']:.2f} | {a['Mahalanobis']:.2f} | "
                   f"{r['train_seconds_total'] / 60:.1f} min |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="scale_output")
    p.add_argument("--only", help="comma-separated settings SIZE:WIDTHxDEPTH:EPOCHS (default: all, cheapest first)")
    p.add_argument("--cache_dir", default=os.path.join(BENCHMARK_OUT, "feature_cache"))
    args = p.parse_args()
    out = os.path.join(ROOT, args.out)
    os.makedirs(out, exist_ok=True)
    rows_path = os.path.join(out, "rows.json")
    rows = json.load(open(rows_path)) if os.path.isfile(rows_path) else []
    settings = args.only.split(",") if args.only else DEFAULT
    for setting in settings:
        bad = check_setting(setting)
        if bad:
            p.error(f"--only {setting!r}: {bad}")
    for setting in settings:
        if any(r["setting"] == setting for r in rows):
            continue
        rows.append(row(setting, out, args.cache_dir))
        with open(rows_path, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"{setting}: " + ", ".join(f"{m} {v:.2f}" for m, v in rows[-1]["auroc"].items())
              + f" (training {rows[-1]['train_seconds_total']:.0f} s)", flush=True)
    rows.sort(key=lambda r: (r["size"], list(NETWORKS).index(r["network"]), r["epochs"]))
    text = markdown(rows)
    with open(os.path.join(out, "scale.md"), "w") as f:
        f.write(text)
    record("Paper scale on the near split (bench/scale_study.py)",
           [(f"{r['size']} px, LFDN {r['network']}, {r['epochs']} epochs",
             ", ".join(f"{m} {v:.2f}" for m, v in r["auroc"].items()) + f"; training {r['train_seconds_total']:.0f} s")
            for r in rows], "near AUROC in percent (shirt vs Fashion-MNIST 0-4), training seed 0")
    print(text)


if __name__ == "__main__":
    main()
