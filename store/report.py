"""Evaluation results: their types (SetResult, EvalResult), and the outputs results.md / .json / .csv, per-sample scores, optional features, plots.

scores/NAME.npy is a structured array with one float64 field per score (e.g. ``MFsim``, ``MSE``,
or ``LR_MFsim``, ``first_MFsim``, ``end_MFsim`` ...), one row per image in dataset order:
``np.load("scores/SVHN.npy")["MFsim"]``. Metrics can be recomputed from these files alone.
"""
import csv
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from errors import UserError
from store.atomic import atomic_file, atomic_write_text, temp_name
from scoring.metrics import OPENOOD_COLUMNS, openood_metrics
from store.rundir import cause, check_writable, file_stem, foreign_files, lock_beside, replace_folder

log = logging.getLogger("dlsr")
ID_NAME = "ID"  # the ID test set's name among the scored sets
GROUPS = ("near", "far")  # OOD sets tagged with a group get a mean row per group


@dataclass
class SetResult:
    name: str
    spec: str
    n: int = 0
    scores: Dict[str, np.ndarray] = field(default_factory=dict)   # score field -> (n,)
    features: Optional[np.ndarray] = None                          # (n, D) standardised, with --save_features
    features_from: str = "missing"                                 # extracted | cache | missing
    seconds: float = 0.0

    @property
    def images_per_s(self) -> Optional[float]:
        return self.n / self.seconds if self.seconds > 0 else None


@dataclass
class EvalResult:
    headline: str                       # the score field shown first, e.g. "MFsim" or "LR_MFsim"
    fields: List[str]                   # every score field, in display order
    sets: Dict[str, SetResult]          # ID first, then the OOD sets in config order
    metrics: Dict[str, Dict[str, Optional[dict]]]  # field -> OOD name -> metrics (None: missing)
    meta: dict


METRICS = ("AUROC", "FPR95", "AUPR_In", "AUPR_Out")
LABELS = {"AUROC": "AUROC", "FPR95": "FPR95", "AUPR_In": "AUPR-In", "AUPR_Out": "AUPR-Out"}


def mean_row(rows: Dict[str, Optional[dict]]) -> Optional[dict]:
    """The mean of each metric over ``rows``; None where a member is missing (None): a mean over fewer
    sets than the benchmark has is no mean of the benchmark, so it is left empty, never shown."""
    if not rows or any(m is None for m in rows.values()):
        return None
    return {k: float(np.mean([m[k] for m in rows.values()])) for k in METRICS}


def incomplete(rows: Dict[str, Optional[dict]]) -> List[str]:
    """The sets of ``rows`` that are missing."""
    return [name for name, m in rows.items() if m is None]


def summary_rows(rows: Dict[str, Optional[dict]], groups: Dict[str, str]) -> List[tuple]:
    """[(label, metrics)]: "near mean" and "far mean" over each group's sets (when the run has groups),
    then "mean" over every set; metrics None where a member of the mean is missing."""
    out = []
    for group in GROUPS:
        members = {n: m for n, m in rows.items() if groups.get(n) == group}
        if members:
            out.append((f"{group} mean", mean_row(members)))
    return out + [("mean", mean_row(rows))]


def openood_fields(result: EvalResult) -> List[str]:
    """The fields that get OpenOOD's table: the headline and each baseline, when the OOD sets are
    grouped into near and far (OpenOOD's nearood / farood rows)."""
    groups = set(result.meta.get("groups", {}).values())
    if not {"near", "far"} <= groups:
        return []
    return [result.headline, *result.meta.get("baselines", [])]


def openood_file(field: str, headline: str) -> str:
    return "openood.csv" if field == headline else f"openood_{file_stem(field)}.csv"


def openood_csv(result: EvalResult, field: str) -> str:
    """OpenOOD's evaluator table of one score: the near sets in order, ``nearood`` (their mean), the
    far sets in order, ``farood``; columns FPR@95, AUROC, AUPR_IN, AUPR_OUT in percent, by OpenOOD's
    own metric definitions (``openood_metrics``), computed from the saved scores."""
    groups, id_scores = result.meta.get("groups", {}), result.sets[ID_NAME].scores[field]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["", *OPENOOD_COLUMNS])
    for group, mean_name in (("near", "nearood"), ("far", "farood")):
        rows, missing = [], False
        for name, s in result.sets.items():
            if name == ID_NAME or groups.get(name) != group:
                continue
            if s.features_from == "missing":  # kept, marked: the benchmark has this set
                missing = True
                w.writerow([name, *(MISSING for _ in OPENOOD_COLUMNS)])
                continue
            m = openood_metrics(id_scores, s.scores[field])
            rows.append([100 * m[c] for c in OPENOOD_COLUMNS])
            w.writerow([name, *(f"{v:.4f}" for v in rows[-1])])
        if missing:  # a mean over fewer sets than the group has is not the group's mean
            w.writerow([mean_name, *("" for _ in OPENOOD_COLUMNS)])
        elif rows:
            w.writerow([mean_name, *(f"{v:.4f}" for v in np.mean(rows, axis=0))])
    return buf.getvalue()


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def format_markdown(result: EvalResult) -> str:
    meta, sets = result.meta, result.sets
    ids = sets[ID_NAME]
    ckpts = ", ".join(f"{role} = {c['path']} ({c['kind']}, epoch {c['epoch']})" for role, c in meta["checkpoints"].items())
    out = io.StringIO()
    out.write("# DLSR out-of-distribution detection\n\n")
    out.write(f"ID test set: {meta['id_dataset']} ({ids.n} images). Checkpoints: {ckpts}.\n")
    out.write(f"Backbone {meta['backbone']} at {meta['input_size']} px; k = {meta['subset_timesteps_num']}, "
              f"eta = {meta['eta']}, indexing {meta['indexing']}; MFsim layers: {meta['mfsim_layers']}; "
              f"FPR95 convention: {meta['fpr95']}; seed {meta['seed']}; {meta['device']} x{meta['processes']}, "
              f"{meta['precision']}.\n")
    variant = ([f"{meta['noise_draws']} noise draws averaged"] if meta.get("noise_draws", 1) > 1 else []) + \
        (["layer-normalised errors over all layers"] if meta.get("layer_norm") else [])
    if variant:
        out.write(f"Score variant (not the release's): {', '.join(variant)}.\n")
    out.write("All metrics in percent, OOD is the positive class; higher score = more OOD.\n")
    if meta.get("groups"):
        out.write("Groups: " + "; ".join(f"{g}: {', '.join(n for n, gg in meta['groups'].items() if gg == g)}"
                                         for g in GROUPS if g in meta["groups"].values()) + ".\n")
    for f in result.fields:
        rows = result.metrics[f]
        tag = "  (headline)" if f == result.headline else \
            "  (baseline on the same features, not DLSR)" if f in meta.get("baselines", []) else ""
        out.write(f"\n## {f}{tag}\n\n")
        out.write("| OOD set | images | " + " | ".join(LABELS[m] for m in METRICS) + " |\n")
        out.write("|---|---:|" + "---:|" * len(METRICS) + "\n")
        for name, m in rows.items():
            if m is None:
                out.write(f"| {name} | missing | " + " | ".join("-" for _ in METRICS) + " |\n")
            else:
                out.write(f"| {name} | {sets[name].n} | " + " | ".join(_pct(m[k]) for k in METRICS) + " |\n")
        for label, mean in summary_rows(rows, meta.get("groups", {})):
            note = "" if mean is not None else f"incomplete ({', '.join(incomplete(_members(rows, label, meta)))} missing)"
            out.write(f"| **{label}** | {note} | " + " | ".join(_pct(mean[k] if mean else None) for k in METRICS)
                      + " |\n")
    out.write("\n## Throughput\n\n| set | images | features | images/s |\n|---|---:|---|---:|\n")
    for name, s in sets.items():
        ips = "-" if s.images_per_s is None else f"{s.images_per_s:.1f}"
        out.write(f"| {name} | {s.n if s.features_from != 'missing' else 'missing'} | {s.features_from} | {ips} |\n")
    return out.getvalue()


def results_json(result: EvalResult) -> dict:
    return {
        "headline": result.headline,
        "meta": result.meta,
        "sets": {name: {"spec": s.spec, "images": s.n, "features": s.features_from,
                        "seconds": s.seconds, "images_per_s": s.images_per_s} for name, s in result.sets.items()},
        # Metrics as fractions in [0, 1] (the table shows them x100).
        "metrics": {f: {**rows, **dict(summary_rows(rows, result.meta.get("groups", {})))}
                    for f, rows in result.metrics.items()},
    }


def _members(rows: Dict[str, Optional[dict]], label: str, meta: dict) -> Dict[str, Optional[dict]]:
    """The rows a summary row ("near mean", "far mean", "mean") is the mean of."""
    group = label.removesuffix(" mean")
    return rows if label == "mean" else {n: m for n, m in rows.items() if meta.get("groups", {}).get(n) == group}


MISSING, INCOMPLETE = "missing", "incomplete"


def results_csv(result: EvalResult) -> str:
    """One row per score and OOD set, then the summary rows; a missing set's cells say "missing", a mean
    with a missing member "incomplete" (never the mean of the sets that are there)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["score", "ood_set", "images", *METRICS])
    for f, rows in result.metrics.items():
        for name, m in rows.items():
            n = result.sets[name].n if result.sets[name].features_from != "missing" else ""
            w.writerow([f, name, n, *([MISSING] * len(METRICS) if m is None else [f"{100 * m[k]:.6f}" for k in METRICS])])
        for label, m in summary_rows(rows, result.meta.get("groups", {})):
            w.writerow([f, label, "", *([INCOMPLETE] * len(METRICS) if m is None else
                                        [f"{100 * m[k]:.6f}" for k in METRICS])])
    return buf.getvalue()


OUTPUT_PREFIXES = ("results.", "scores", "features", "roc_", "hist_", "openood", "choose_k.json")


def check_output_dir(output_dir: str, cache_dir: str) -> Optional[str]:
    """Why the evaluation may not write to ``output_dir`` (None if it may), checked before any work."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        return f"output folder {output_dir!r} is a file, not a folder"
    foreign = foreign_files(output_dir, OUTPUT_PREFIXES)
    if foreign:
        return (f"output folder {output_dir!r} holds files that are not evaluation results ({', '.join(foreign[:3])}); "
                f"results replace the whole folder, so choose an empty or results folder")
    try:
        check_writable(os.path.dirname(os.path.abspath(output_dir)), "the folder of the output folder")
        check_writable(cache_dir, "feature cache folder")
    except UserError as e:
        return str(e)
    return None


def output_lock(output_dir: str):
    """A lock beside the output folder (the folder itself is replaced whole at the end)."""
    return lock_beside(output_dir, f"output folder {output_dir!r}")


def write_outputs(result: EvalResult, output_dir: str, save_features: bool = False, plots: bool = True) -> List[str]:
    """Write every output into a new folder, then put it in place of ``output_dir`` whole, so the
    folder never mixes two runs' files; return the final paths."""
    staging = temp_name(os.path.abspath(output_dir).rstrip("/"))
    try:
        written = _write_all(result, staging, save_features, plots)
        replace_folder(staging, output_dir)
    except OSError as e:
        raise UserError(f"cannot write results to {output_dir!r}: {cause(e)}; the results there before are "
                        f"left as they were") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [os.path.join(output_dir, os.path.relpath(p, staging)) for p in written]


def _write_all(result: EvalResult, output_dir: str, save_features: bool, plots: bool) -> List[str]:
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for name, s in result.sets.items():
        if s.features_from == "missing":
            continue
        arr = np.zeros(s.n, dtype=[(f, "f8") for f in result.fields])
        for f in result.fields:
            arr[f] = s.scores[f]
        path = os.path.join(output_dir, "scores", f"{file_stem(name)}.npy")
        with atomic_file(path) as fh:
            np.save(fh, arr)
        written.append(path)
        if save_features and s.features is not None:
            path = os.path.join(output_dir, "features", f"{file_stem(name)}.npy")
            with atomic_file(path) as fh:
                np.save(fh, s.features)
            written.append(path)
    tables = [("results.md", format_markdown(result)), ("results.json", json.dumps(results_json(result), indent=2)),
              ("results.csv", results_csv(result))]
    for score in openood_fields(result):
        tables.append((openood_file(score, result.headline), openood_csv(result, score)))
    for fname, text in tables:
        path = os.path.join(output_dir, fname)
        atomic_write_text(path, text)
        written.append(path)
    if plots:
        written += write_plots(result, output_dir)
    return written


def write_plots(result: EvalResult, output_dir: str) -> List[str]:
    """ROC curves and score histograms of the headline score, ID vs each OOD set (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no plots")
        return []
    from sklearn.metrics import roc_curve  # here: scikit-learn takes ~2 s to import, and only plots need it

    f = result.headline
    id_s = result.sets[ID_NAME].scores[f]
    oods = [(n, s.scores[f]) for n, s in result.sets.items() if n != ID_NAME and s.features_from != "missing"]
    if not oods:
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, ood in oods:
        fpr, tpr, _ = roc_curve(np.r_[np.zeros(id_s.size), np.ones(ood.size)], np.r_[id_s, ood])
        ax.plot(fpr, tpr, label=f"{name} (AUROC {100 * result.metrics[f][name]['AUROC']:.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate (ID flagged)", ylabel="true positive rate (OOD flagged)", title=f"ROC, {f}")
    ax.legend(fontsize=7, loc="lower right")
    paths.append(os.path.join(output_dir, f"roc_{file_stem(f)}.png"))
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    cols = min(3, len(oods))
    rows = -(-len(oods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (name, ood) in zip(axes.flat, oods):
        bins = np.histogram_bin_edges(np.r_[id_s, ood], bins=60)
        ax.hist(id_s, bins=bins, alpha=0.6, density=True, label=f"ID ({result.meta['id_dataset']})")
        ax.hist(ood, bins=bins, alpha=0.6, density=True, label=name)
        ax.set(title=f"{f}: ID vs {name}", xlabel="score (higher = more OOD)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(oods):]:
        ax.axis("off")
    paths.append(os.path.join(output_dir, f"hist_{file_stem(f)}.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
