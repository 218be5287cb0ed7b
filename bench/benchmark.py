"""The offline near/far benchmark: train DLSR with several seeds on config/fmnist_split.yaml,
evaluate MSE, MFsim, LR and the same-feature baselines (kNN, Mahalanobis) with each, and write one
table with mean +- std over the seeds in every cell.

    python bench/benchmark.py [--config config/fmnist_split.yaml] [--seeds 0 1 2] [--out benchmark_output]

Runs the real scripts (main.py, test_mse_mfsim.py, test_LR.py) once per seed; the feature cache
is shared, so the backbone runs once. Writes <out>/benchmark.md, .json and .csv and appends the
table, dated, to bench/RESULTS.md.
"""
import argparse
import csv
import io
import json
import os
import time

import numpy as np
from common import BENCHMARK_OUT, ROOT, SPLIT_CONFIG, record, run

ROWS_ORDER = ("near mean", "far mean", "mean")
METRICS = ("AUROC", "FPR95")


def collect(results: list) -> dict:
    """{field: {row: {metric: [value per seed]}}} from the seeds' results.json files."""
    table = {}
    for res in results:
        for field, rows in res["metrics"].items():
            for row, m in rows.items():
                if m is None:
                    continue
                for metric in METRICS:
                    table.setdefault(field, {}).setdefault(row, {}).setdefault(metric, []).append(100 * m[metric])
    return table


def cell(values: list) -> str:
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}"


def markdown(table: dict, fields: list, baselines: list, seeds: list) -> str:
    out = io.StringIO()
    out.write(f"AUROC and FPR95 in percent, mean ± std over training seeds {', '.join(map(str, seeds))} "
              f"(std over seeds; the baselines use no training, so their std is 0).\n")
    for field in fields:
        rows = table[field]
        tag = " (baseline on the same features)" if field in baselines else ""
        out.write(f"\n#### {field}{tag}\n\n| set | AUROC | FPR95 |\n|---|---:|---:|\n")
        names = [r for r in rows if r not in ROWS_ORDER] + [r for r in ROWS_ORDER if r in rows]
        for r in names:
            label = f"**{r}**" if r in ROWS_ORDER else r
            out.write(f"| {label} | {cell(rows[r]['AUROC'])} | {cell(rows[r]['FPR95'])} |\n")
    return out.getvalue()


def csv_rows(table: dict, fields) -> list:
    """benchmark.csv: a header, then per score and set the mean and the (population) std over the seeds."""
    rows = [["score", "set", "AUROC_mean", "AUROC_std", "FPR95_mean", "FPR95_std"]]
    for field in fields:
        for r, m in table[field].items():
            rows.append([field, r, f"{np.mean(m['AUROC']):.4f}", f"{np.std(m['AUROC']):.4f}",
                         f"{np.mean(m['FPR95']):.4f}", f"{np.std(m['FPR95']):.4f}"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=SPLIT_CONFIG)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=BENCHMARK_OUT)
    args = p.parse_args()
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds {' '.join(map(str, args.seeds))}: a seed given twice would count one run twice in the "
                f"mean and the spread")
    out = os.path.join(ROOT, args.out)
    cache = os.path.join(out, "feature_cache")
    start = time.perf_counter()
    results = []
    for seed in args.seeds:
        run_dir = os.path.join(out, f"seed-{seed}")
        ckpt = os.path.join(run_dir, "checkpoint")
        common = ["--cache_dir", cache]
        run("main.py", "--config", args.config, "--seed", str(seed), "--output_dir", ckpt, "--overwrite", *common)
        ev = ["--pretrained_ldm_cfg", args.config, "--seed", str(seed), "--no_plots", *common]
        run("test_mse_mfsim.py", "--pretrained_ldm_ckpt", os.path.join(ckpt, "checkpoint-last.pth"),
            "--output_dir", os.path.join(run_dir, "results-mse-mfsim"), *ev)
        run("test_LR.py", "--pretrained_ldm_ckpt_first", os.path.join(ckpt, "checkpoint-0.pth"),
            "--pretrained_ldm_ckpt_end", os.path.join(ckpt, "checkpoint-last.pth"), "--baselines", "",
            "--output_dir", os.path.join(run_dir, "results-LR"), *ev)
        merged = {}
        for sub in ("results-mse-mfsim", "results-LR"):
            with open(os.path.join(run_dir, sub, "results.json")) as f:
                merged.setdefault("metrics", {}).update(json.load(f)["metrics"])
        results.append(merged)
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    with open(os.path.join(out, f"seed-{args.seeds[0]}", "results-mse-mfsim", "results.json")) as f:  # this run's
        baselines = json.load(f)["meta"]["baselines"]
    fields = ["MFsim", "MSE", "LR_MFsim", "LR_MSE", *baselines]
    table = collect(results)
    md = markdown(table, fields, baselines, args.seeds)
    with open(os.path.join(out, "benchmark.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "benchmark.json"), "w") as f:
        json.dump({"config": args.config, "seeds": args.seeds, "percent": table}, f, indent=2)
    with open(os.path.join(out, "benchmark.csv"), "w", newline="") as f:
        csv.writer(f).writerows(csv_rows(table, fields))
    rows = [("config", f"{args.config}, seeds {args.seeds}"), ("wall time, s", f"{time.perf_counter() - start:.0f}")]
    for field in fields:
        for r in ("shirt", "near mean", "far mean", "mean"):
            if r in table[field]:
                rows.append((f"{field} AUROC, {r}", cell(table[field][r]["AUROC"])))
    record("Near/far benchmark (make benchmark)", rows, "AUROC in percent, mean ± std over seeds; "
           f"full table in {args.out}/benchmark.md")
    print(md)


if __name__ == "__main__":
    main()
