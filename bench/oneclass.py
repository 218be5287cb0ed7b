"""The one-class benchmark on Fashion-MNIST, the protocol of the anomaly-detection literature: each
class c in turn is ID, trained on its 6,000 training images, and tested on its 1,000 test images
(ID) against the 9,000 test images of the other classes (OOD).

    python bench/oneclass.py [--classes 6,8] [--output_dir oneclass_output] [--config config/fmnist_split.yaml]

Methods, all on the same standardised features: DLSR's MFsim and MSE (the LFDN and training
settings of --config, trained once per class, seed --seed), kNN with k = 1 and k = 2 (DN2's k)
and Mahalanobis, fitted on the class's training features. The backbone runs once over the 70,000
images (cached in the config's feature cache); each class's DLSR result is kept in
<output_dir>/class-<c>.json, so a stopped run continues where it was (the baselines, which need no
training, are recomputed every time). Writes oneclass.json (AUROC
in percent per class and method, and the mean), oneclass.md and oneclass.csv.
"""
import argparse
import csv
import hashlib
import io
import json
import os
import time
from typing import Dict, List, Sequence

import numpy as np
import torch

from common import ROOT, SPLIT_CONFIG, record

from datasets import build_dataset  # noqa: E402
from scoring.baselines import Baselines  # noqa: E402
from errors import UserError  # noqa: E402
from cli import run_entry  # noqa: E402
from experiment.config import config_to_dict, load_config  # noqa: E402
from utils.distributed import DistContext  # noqa: E402
from engine.scorer import Scorer  # noqa: E402
from engine.extraction import features_for  # noqa: E402
from scoring.metrics import ood_metrics  # noqa: E402
from engine.factory import build_extractor  # noqa: E402
from engine.training import train  # noqa: E402

DATASET = "fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
METHODS = ("MFsim", "MSE", "kNN_k1", "kNN_k2", "Mahalanobis")
KNN_K = (1, 2)


def oneclass_split(train_labels: np.ndarray, test_labels: np.ndarray, c: int):
    """(indices of the training images of class c, bool mask of the test images that are ID = class c)."""
    return np.flatnonzero(train_labels == c), test_labels == c


def auroc_percent(scores: np.ndarray, id_mask: np.ndarray) -> float:
    """AUROC in percent with OOD (``~id_mask``) as the positive class; higher score = more OOD."""
    return 100 * ood_metrics(scores[id_mask], scores[~id_mask])["AUROC"]


def dlsr_scores(cfg, ctx: DistContext, extractor, train_z: torch.Tensor, test_z: torch.Tensor,
                test_keys: torch.Tensor, out_dir: str) -> Dict[str, np.ndarray]:
    """DLSR's MFsim and MSE (higher = more OOD) of the test vectors, trained on one class's training vectors."""
    cfg.output_dir = os.path.join(out_dir, "checkpoint")
    trainer = train(cfg, ctx, features=train_z, extractor=extractor, overwrite=True)
    scorer = Scorer(cfg, ctx, trainer.extractor, trainer.diffusion, {"end": trainer.ema.module})
    return scorer.scores(test_z, test_keys)


def baseline_scores(train_z: torch.Tensor, test_z: torch.Tensor) -> Dict[str, np.ndarray]:
    """kNN (k = 1, 2) and Mahalanobis, fitted on one class's training vectors (the evaluation's code)."""
    return Baselines(train_z, ["knn", "mahalanobis"], KNN_K).scores(test_z)


def table(per_class: Dict[int, Dict[str, float]]) -> dict:
    """{"classes": {c: {method: AUROC %}}, "mean": {method: mean over the classes}}."""
    mean = {m: float(np.mean([r[m] for r in per_class.values()])) for m in METHODS}
    return {"classes": {str(c): r for c, r in sorted(per_class.items())}, "mean": mean}


def markdown(result: dict) -> str:
    out = io.StringIO()
    out.write("| class | " + " | ".join(METHODS) + " |\n|---|" + "---:|" * len(METHODS) + "\n")
    for c, r in result["classes"].items():
        out.write(f"| {c} {CLASSES[int(c)]} | " + " | ".join(f"{r[m]:.2f}" for m in METHODS) + " |\n")
    out.write("| **mean** | " + " | ".join(f"**{result['mean'][m]:.2f}**" for m in METHODS) + " |\n")
    return out.getvalue()


def write_outputs(result: dict, out: str) -> None:
    """oneclass.json, oneclass.md and oneclass.csv in ``out``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "oneclass.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "oneclass.md"), "w") as f:
        f.write(markdown(result))
    with open(os.path.join(out, "oneclass.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", *METHODS])
        for c, r in result["classes"].items():
            w.writerow([c, *(f"{r[m]:.4f}" for m in METHODS)])
        w.writerow(["mean", *(f"{result['mean'][m]:.4f}" for m in METHODS)])


def parse_classes(text: str) -> List[int]:
    try:
        classes = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        classes = []
    if not classes or not all(0 <= c < len(CLASSES) for c in classes):
        raise UserError(f"--classes: give class indices in 0..{len(CLASSES) - 1}, e.g. 6,8; got {text!r}")
    return classes


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def result_key(args, cfg) -> dict:
    """What a class's kept DLSR result depends on: the whole resolved config (an edit in place of the
    file changes it), the seed and the epochs."""
    digest = hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()[:20]
    return {"config": args.config, "config_digest": digest, "seed": args.seed, "epochs": cfg.train.epochs}


def main(argv: Sequence[str] = None) -> None:
    p = argparse.ArgumentParser(description="One-class Fashion-MNIST benchmark (DLSR vs kNN and Mahalanobis).")
    p.add_argument("--classes", default=",".join(map(str, range(10))), help="ID classes to run (default: all 10)")
    p.add_argument("--output_dir", default="oneclass_output")
    p.add_argument("--config", default=SPLIT_CONFIG, help="backbone, LFDN and training settings (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--epochs", type=positive_int, help="override train.epochs of --config")
    p.add_argument("--data_path", help="override data_path of --config")
    args = p.parse_args(argv)
    classes = parse_classes(args.classes)
    out = os.path.join(ROOT, args.output_dir)
    cfg = load_config(os.path.join(ROOT, args.config))
    cfg.device, cfg.train.seed = "cpu", args.seed
    cfg.train.epochs = args.epochs if args.epochs is not None else cfg.train.epochs
    cfg.data_path = args.data_path or cfg.data_path
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    start = time.perf_counter()
    extractor = build_extractor(cfg)
    sets = {split: build_dataset(DATASET, split, cfg.data_path, cfg.backbone.input_size, cfg.download)
            for split in ("train", "test")}
    feats = {split: features_for(cfg, ctx, extractor, ds, split, f"{DATASET} {split} features")
             for split, ds in sets.items()}
    extract_s = time.perf_counter() - start
    print(f"features: {extract_s:.0f} s", flush=True)
    per_class, seconds = {}, {}
    for c in classes:
        train_idx, id_mask = oneclass_split(sets["train"].labels, sets["test"].labels, c)
        train_z, test_z = feats["train"].z[train_idx], feats["test"].z
        done = os.path.join(out, f"class-{c}.json")  # DLSR's AUROC of a finished class: training is the cost
        key = result_key(args, cfg)
        kept = None
        if os.path.isfile(done):
            with open(done) as f:
                kept = json.load(f)
        t0 = time.perf_counter()
        if kept is not None and kept.get("key") == key:
            dlsr, seconds[c] = kept["auroc"], kept["seconds"]
            print(f"class {c}: DLSR kept from {done}", flush=True)
        else:
            scores = dlsr_scores(cfg, ctx, extractor, train_z, test_z, feats["test"].keys, os.path.join(out, f"class-{c}"))
            dlsr = {m: auroc_percent(scores[m], id_mask) for m in ("MFsim", "MSE")}
            seconds[c] = time.perf_counter() - t0
            with open(done, "w") as f:
                json.dump({"key": key, "auroc": dlsr, "seconds": seconds[c]}, f, indent=2)
        baselines = {m: auroc_percent(v, id_mask) for m, v in baseline_scores(train_z, test_z).items()}
        per_class[c] = {**dlsr, **baselines}
        print(f"class {c} ({CLASSES[c]}): " + ", ".join(f"{m} {per_class[c][m]:.2f}" for m in METHODS)
              + f" ({seconds[c]:.0f} s)", flush=True)
    result = table(per_class)
    result["settings"] = {"config": args.config, "seed": args.seed, "epochs": cfg.train.epochs,
                          "backbone": cfg.backbone.name, "input_size": cfg.backbone.input_size,
                          "feature_seconds": extract_s, "class_seconds": {str(c): s for c, s in seconds.items()},
                          "wall_seconds": time.perf_counter() - start}
    write_outputs(result, out)
    print(markdown(result))
    record(f"One-class Fashion-MNIST (bench/oneclass.py, classes {','.join(map(str, classes))})",
           [(m, f"{result['mean'][m]:.2f}") for m in METHODS]
           + [("wall time, s", f"{time.perf_counter() - start:.0f} (features {extract_s:.0f})")],
           f"mean AUROC in percent over the classes; {args.config}, {cfg.train.epochs} epochs, seed {args.seed}; "
           f"per class in {args.output_dir}/oneclass.md")


if __name__ == "__main__":
    run_entry(main)  # a problem is one line and exit 2; a stop signal's save, exit 143
