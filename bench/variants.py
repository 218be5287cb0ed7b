"""Test-time variants of DLSR's scores, chosen on a validation split, then reported once on the
near split and the one-class benchmark. The default (the release's computation) is variant "release".

    python bench/variants.py [--out variants_output]

Validation split (no reported test set in it): ID = Fashion-MNIST classes 0, 1, 3, 4; DLSR is
trained (the benchmark's settings: config/fmnist_split.yaml) on 6,000 of their training images;
2,000 other training images of those classes are validation ID, 2,000 training images of class 2
(pullover, close to the ID tops) validation OOD, and 2,000 more ID training images give the
held-out statistics that some variants need. Variants (each for MFsim and MSE):

- release: one noise draw at k = 3 (the default);
- draws N: the score averaged over N independent noise draws (N = 4, 16);
- multi-k: the mean over k in {2, 3, 5, 10} of the score at k, each standardised by its mean and
  std on the held-out ID vectors;
- layer-normalised: each layer's error (1 - cos, or the squared error) standardised by its mean
  and std on the held-out ID vectors, then averaged over all layers;
- layer-normalised + draws 16.

The variant with the best validation AUROC is then reported on the near split (shirt against
classes 0-4, the benchmark's seed-0 checkpoint, held-out statistics from training images of
classes 0-4 it was not trained on) and on the one-class benchmark (the checkpoints of
bench/oneclass.py; all 6,000 training images of a class are its training set, so its statistics
come from 2,000 of those, which the model has seen). Needs the feature caches and checkpoints of
`make benchmark` and `make benchmark-oneclass`.
"""
import argparse
import json
import os
import time
from typing import Callable, Dict

import numpy as np
import torch
import torch.nn.functional as F
from common import BENCHMARK_OUT, ROOT, SPLIT_CONFIG, record

from datasets import build_dataset  # noqa: E402
from experiment.config import load_config  # noqa: E402
from utils.distributed import DistContext  # noqa: E402
from engine.scorer import Scorer, image_noise  # noqa: E402
from experiment.run import run_config  # noqa: E402
from store.checkpoint import load_checkpoint  # noqa: E402
from engine.extraction import features_for  # noqa: E402
from scoring.metrics import ood_metrics  # noqa: E402
from engine.factory import build_extractor  # noqa: E402
from engine.training import train  # noqa: E402

CPU = DistContext(0, 1, 0, torch.device("cpu"))
VAL_ID, VAL_OOD = (0, 1, 3, 4), 2
MULTI_K = (2, 3, 5, 10)


class Reconstructor:
    """Per-layer errors of one LFDN's reconstructions: (cos (B, L), squared error (B, L)) per draw and k."""

    def __init__(self, scorer: Scorer):
        self.scorer, self.indices = scorer, [0, *scorer.extractor.indices]
        self.model = scorer.models["end"]

    @torch.no_grad()
    def layer_errors(self, z: torch.Tensor, keys: torch.Tensor, k: int = 3, draw: int = 0):
        d, cfg = self.scorer.diffusion, self.scorer.cfg
        draws = d.noise_draws(k, cfg.diffusion.eta, cfg.diffusion.indexing)
        role = "end" if draw == 0 else f"end-draw{draw}"  # draw 0 is the default's own noise
        cos, sq = [], []
        for i in range(0, len(z), 1024):
            z0 = z[i:i + 1024]
            noise = image_noise(keys[i:i + 1024], cfg.eval.seed, role, draws, z0.shape[1:])
            rec = d.reconstruct(self.model, z0, k, cfg.diffusion.eta, indexing=cfg.diffusion.indexing, noise=noise)
            pairs = list(zip(self.indices[:-1], self.indices[1:]))
            cos.append(torch.stack([F.cosine_similarity(rec[:, a:b], z0[:, a:b], dim=1) for a, b in pairs], 1))
            sq.append(torch.stack([((rec[:, a:b] - z0[:, a:b]) ** 2).sum(1) for a, b in pairs], 1))
        return torch.cat(cos).double(), torch.cat(sq).double()


def release_scores(cos: torch.Tensor, sq: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The default's MFsim (layers 2..L over L-1, as eval.mfsim_layers release) and MSE."""
    return {"MFsim": -cos[:, 1:].mean(1), "MSE": sq.sum(1)}


def variant_scores(rec: Reconstructor, z, keys, held_z, held_keys) -> Dict[str, Dict[str, np.ndarray]]:
    """{variant: {"MFsim": (N,), "MSE": (N,)}} for vectors z, with statistics from the held-out ID vectors."""
    def per_draw(vectors, vkeys, n, k=3):
        return [rec.layer_errors(vectors, vkeys, k, j) for j in range(n)]

    test16, held16 = per_draw(z, keys, 16), per_draw(held_z, held_keys, 16)
    out = {"release": release_scores(*test16[0])}
    for n in (4, 16):
        parts = [release_scores(*e) for e in test16[:n]]
        out[f"draws {n}"] = {t: torch.stack([p[t] for p in parts]).mean(0) for t in ("MFsim", "MSE")}

    def standardised(value: Callable, test_errs, held_errs):
        t, h = value(*test_errs), value(*held_errs)
        return (t - h.mean(0)) / (h.std(0) + 1e-12)

    layer_err = {"MFsim": lambda c, s: 1 - c, "MSE": lambda c, s: s}
    out["layer-normalised"] = {t: standardised(f, test16[0], held16[0]).mean(1) for t, f in layer_err.items()}
    out["layer-normalised + draws 16"] = {
        t: torch.stack([standardised(f, a, b).mean(1) for a, b in zip(test16, held16)]).mean(0)
        for t, f in layer_err.items()}
    multi = {t: [] for t in ("MFsim", "MSE")}
    for k in MULTI_K:
        te, he = rec.layer_errors(z, keys, k), rec.layer_errors(held_z, held_keys, k)
        for t in multi:
            multi[t].append(standardised(lambda c, s: release_scores(c, s)[t], te, he))
    out["multi-k"] = {t: torch.stack(v).mean(0) for t, v in multi.items()}
    return {v: {t: s.numpy() for t, s in scores.items()} for v, scores in out.items()}


def auroc(scores: np.ndarray, is_id: np.ndarray) -> float:
    return 100 * ood_metrics(scores[is_id], scores[~is_id])["AUROC"]


def seeded(indices: np.ndarray, seed: int) -> np.ndarray:
    return indices[np.random.default_rng(seed).permutation(len(indices))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="variants_output")
    p.add_argument("--oneclass_dir", default="oneclass_output")
    args = p.parse_args()
    out = os.path.join(ROOT, args.out)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    cfg = load_config(os.path.join(ROOT, SPLIT_CONFIG))
    cfg.device, cfg.cache_dir = "cpu", os.path.join(BENCHMARK_OUT, "feature_cache")
    extractor = build_extractor(cfg)
    sets = {s: build_dataset("fashion-mnist", s, cfg.data_path, cfg.backbone.input_size, cfg.download)
            for s in ("train", "test")}
    feats = {s: features_for(cfg, CPU, extractor, ds, s, f"fashion-mnist {s}") for s, ds in sets.items()}
    labels = {s: ds.labels for s, ds in sets.items()}

    # ---- validation: train on 6,000 images of classes 0, 1, 3, 4; choose the variant there
    id_pool = seeded(np.flatnonzero(np.isin(labels["train"], VAL_ID)), 1)
    fit, val_id, held = id_pool[:6000], id_pool[6000:8000], id_pool[8000:10000]
    val_ood = seeded(np.flatnonzero(labels["train"] == VAL_OOD), 2)[:2000]
    cfg.output_dir = os.path.join(out, "validation-checkpoint")
    trainer = train(cfg, CPU, features=feats["train"].z[fit], extractor=extractor, overwrite=True)
    rec = Reconstructor(Scorer(cfg, CPU, trainer.extractor, trainer.diffusion, {"end": trainer.ema.module}))
    val = np.r_[val_id, val_ood]
    is_id = np.r_[np.ones(len(val_id), bool), np.zeros(len(val_ood), bool)]
    z, keys = feats["train"].z, feats["train"].keys
    scores = variant_scores(rec, z[val], keys[val], z[held], keys[held])
    validation = {v: {t: auroc(s, is_id) for t, s in ts.items()} for v, ts in scores.items()}
    chosen = max(validation, key=lambda v: validation[v]["MFsim"])
    print("validation AUROC:", json.dumps(validation, indent=1), "\nchosen:", chosen, flush=True)

    # ---- the chosen variant, once, on the near split and the one-class benchmark
    report = {"validation": validation, "chosen": chosen}
    near_ckpt = os.path.join(BENCHMARK_OUT, "seed-0", "checkpoint", "checkpoint-last.pth")
    near_rec = Reconstructor(Scorer.from_checkpoints(run_config({"end": load_checkpoint(near_ckpt)}, cfg), CPU))
    near_id_train = np.flatnonzero(labels["train"] < 5)
    trained_on = np.sort(np.random.default_rng(0).permutation(len(near_id_train))[:6000])  # random_subset's
    near_held = seeded(np.setdiff1d(near_id_train, near_id_train[trained_on]), 3)[:2000]
    test = np.flatnonzero((labels["test"] < 5) | (labels["test"] == 6))
    zt, kt = feats["test"].z, feats["test"].keys
    near = variant_scores(near_rec, zt[test], kt[test], z[near_held], keys[near_held])
    near_is_id = labels["test"][test] < 5
    report["near"] = {v: {t: auroc(near[v][t], near_is_id) for t in ("MFsim", "MSE")} for v in ("release", chosen)}
    oneclass = {}
    for c in range(10):
        ckpt = os.path.join(ROOT, args.oneclass_dir, f"class-{c}", "checkpoint", "checkpoint-last.pth")
        if not os.path.isfile(ckpt):
            continue
        crec = Reconstructor(Scorer.from_checkpoints(run_config({"end": load_checkpoint(ckpt)}, cfg), CPU))
        own = seeded(np.flatnonzero(labels["train"] == c), 4)[:2000]
        sc = variant_scores(crec, zt, kt, z[own], keys[own])
        oneclass[c] = {v: {t: auroc(sc[v][t], labels["test"] == c) for t in ("MFsim", "MSE")}
                       for v in ("release", chosen)}
    if oneclass:
        report["oneclass"] = {"classes": oneclass, "mean": {v: {t: float(np.mean([r[v][t] for r in oneclass.values()]))
                                                                 for t in ("MFsim", "MSE")} for v in ("release", chosen)}}
    report["wall_seconds"] = time.perf_counter() - start
    with open(os.path.join(out, "variants.json"), "w") as f:
        json.dump(report, f, indent=2)
    rows = [(f"validation: {v}", f"MFsim {a['MFsim']:.2f}, MSE {a['MSE']:.2f}") for v, a in validation.items()]
    rows += [("chosen on validation (best MFsim)", chosen)]
    rows += [(f"near split (shirt): {v}", f"MFsim {a['MFsim']:.2f}, MSE {a['MSE']:.2f}") for v, a in report["near"].items()]
    if oneclass:
        rows += [(f"one-class mean over {len(oneclass)} classes: {v}", f"MFsim {a['MFsim']:.2f}, MSE {a['MSE']:.2f}")
                 for v, a in report["oneclass"]["mean"].items()]
    rows.append(("wall time, s", f"{report['wall_seconds']:.0f}"))
    record("Test-time variants (bench/variants.py)", rows,
           "AUROC in percent; validation: ID Fashion-MNIST 0, 1, 3, 4 (held-out training images) vs pullover "
           "training images; the chosen variant once on the near split and the one-class benchmark")


if __name__ == "__main__":
    main()
