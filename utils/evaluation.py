"""Scoring ID and OOD sets with one or two checkpoints, and the metrics from the saved scores.

Per set: raw features (cached, so re-scoring another checkpoint skips the backbone), per-layer
standardisation, one seeded reconstruction per checkpoint giving MSE and MFsim together. Noise
is drawn per batch from a generator seeded by (seed, set, checkpoint role, batch index), so
scores do not depend on how many processes share the work, and every image is scored.
"""
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from datasets import ImageSet, build_datasets
from models.features import MultiLayerFeatures, standardize, weights_digest
from models.lfdn import LFDN
from utils.checkpoint import check_against, load_checkpoint
from utils.config import Config
from utils.distributed import DistContext
from utils.errors import UserError
from utils.features import autocast, load_or_extract
from utils.metrics import ood_metrics
from utils.model_factory import build_diffusion
from utils.progress import progress
from utils.scores import likelihood_regret, mfsim_score, mse_score

log = logging.getLogger("dlsr")
ID_NAME = "ID"
SCORE_TYPES = ("MSE", "MFsim")


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


def score_fields(roles: List[str], headline_type: str) -> List[str]:
    """Field names in display order, the headline type first. One role: MFsim, MSE; two: LR_*, first_*, end_*."""
    types = [headline_type] + [t for t in SCORE_TYPES if t != headline_type]
    if len(roles) == 1:
        return types
    return [f"{prefix}_{t}" for t in types for prefix in ("LR", *roles)]


def noise_seed(seed: int, set_name: str, role: str, batch: int) -> int:
    digest = hashlib.sha256(f"{seed}|{set_name}|{role}|{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def load_models(cfg: Config, paths: Dict[str, str], ctx: DistContext, config_source: str):
    """Checkpoints -> (extractor, {role: LFDN with EMA weights}, {role: LoadedCheckpoint}), all checked."""
    ckpts = {role: load_checkpoint(p) for role, p in paths.items()}
    states = {role: c.backbone_state for role, c in ckpts.items() if c.backbone_state is not None}
    digests = {role: weights_digest(s) for role, s in states.items()}
    if len(set(digests.values())) > 1:
        raise UserError(f"the checkpoints carry different backbone weights ({', '.join(f'{r}: {d}' for r, d in digests.items())}); "
                        f"they must come from one run")
    states = list(states.values())
    extractor = MultiLayerFeatures(cfg.backbone.name, cfg.backbone.weights, states[0] if states else None)
    diffusion = build_diffusion(cfg)
    models = {}
    for role, ck in ckpts.items():
        check_against(ck, extractor.name, cfg.backbone.input_size, extractor.feature_dim, extractor.identity,
                      diffusion, config_source)
        model = LFDN(**ck.lfdn_sizes())
        model.load_state_dict(ck.eval_weights)
        models[role] = model.to(ctx.device).eval()
    return extractor.to(ctx.device), diffusion, models, ckpts


def find_sets(cfg: Config, skip_missing: bool):
    """Build the ID test set and every OOD set before any computing; report all missing ones at once."""
    if ID_NAME in cfg.eval.ood:
        raise UserError(f"an OOD set may not be called {ID_NAME!r}: that name is the ID test set's")
    specs = {ID_NAME: cfg.eval.dataset, **cfg.eval.ood}
    found, missing = build_datasets(specs, "test", cfg.data_path, cfg.backbone.input_size, cfg.download)
    if missing and (ID_NAME in missing or not skip_missing):
        lines = "; ".join(f"{'ID test set' if name == ID_NAME else name} ({specs[name]}): {why}"
                          for name, why in missing.items())
        hint = "" if ID_NAME in missing else " (use --skip_missing to go on without the OOD ones)"
        raise UserError(f"{len(missing)} set(s) missing, nothing computed{hint}: {lines}")
    for name, why in missing.items():
        log.warning("skipping missing OOD set %s: %s", name, why)
    id_set = found.pop(ID_NAME)
    return id_set, found, missing


@torch.no_grad()
def reconstruct_scores(model: LFDN, diffusion, z: torch.Tensor, cfg: Config, ctx: DistContext, set_name: str,
                       role: str, indices: List[int], desc: str) -> Dict[str, np.ndarray]:
    """z: (N, D) standardised on device -> {"MSE": (N,), "MFsim": (N,)}; ranks share batches round-robin."""
    b, n = cfg.eval.batch_size, z.shape[0]
    d = cfg.diffusion
    out = torch.zeros((n, len(SCORE_TYPES)), dtype=torch.float64, device=ctx.device)  # columns: SCORE_TYPES
    generator = torch.Generator(device=ctx.device)
    batches = range(ctx.rank, -(-n // b), ctx.world_size)
    for j in progress(batches, desc, ctx.is_main, unit="batch"):
        z0 = z[j * b:(j + 1) * b]  # (b, D)
        generator.manual_seed(noise_seed(cfg.eval.seed, set_name, role, j))
        with autocast(ctx, cfg.amp):
            rec = diffusion.reconstruct(model, z0, d.subset_timesteps_num, d.eta, generator, d.indexing)
        out[j * b:(j + 1) * b, 0] = mse_score(rec, z0).double()
        out[j * b:(j + 1) * b, 1] = mfsim_score(rec, z0, indices, cfg.eval.mfsim_layers == "all").double()
    if ctx.distributed:
        dist.all_reduce(out)  # every row was written by exactly one rank
    out = out.cpu().numpy()
    return {t: out[:, i] for i, t in enumerate(SCORE_TYPES)}


def score_set(name: str, dataset: ImageSet, extractor: MultiLayerFeatures, diffusion, models: Dict[str, LFDN],
              cfg: Config, ctx: DistContext, keep_features: bool) -> SetResult:
    start = time.perf_counter()
    feats = load_or_extract(extractor, dataset, "test", ctx, cache_dir=cfg.feature_cache_dir,
                            input_size=cfg.backbone.input_size, batch_size=cfg.extract_batch_size,
                            num_workers=cfg.workers(ctx.cuda), amp=cfg.amp, desc=f"{name}: features")
    z = standardize(feats.raw.to(ctx.device), extractor.indices)  # (N, D)
    result = SetResult(name, dataset.name, len(dataset), features_from="cache" if feats.from_cache else "extracted")
    per_role = {role: reconstruct_scores(m, diffusion, z, cfg, ctx, name, role, extractor.indices,
                                         f"{name}: reconstruct ({role})") for role, m in models.items()}
    roles = list(models)
    for t in SCORE_TYPES:
        if len(roles) == 1:
            result.scores[t] = per_role[roles[0]][t]
        else:
            first, end = roles
            result.scores[f"LR_{t}"] = likelihood_regret(per_role[first][t], per_role[end][t])
            for role in roles:
                result.scores[f"{role}_{t}"] = per_role[role][t]
    if keep_features:
        result.features = z.cpu().numpy().astype(np.float32)
    result.seconds = time.perf_counter() - start
    return result


def compute_metrics(sets: Dict[str, SetResult], fields: List[str], fpr95: str) -> Dict[str, Dict[str, Optional[dict]]]:
    """Metrics of every OOD set against the ID set, from the score arrays alone."""
    id_scores = sets[ID_NAME].scores
    table = {}
    for f in fields:
        table[f] = {name: (ood_metrics(id_scores[f], s.scores[f], fpr95) if s.features_from != "missing" else None)
                    for name, s in sets.items() if name != ID_NAME}
    return table


def evaluate(cfg: Config, ctx: DistContext, checkpoints: Dict[str, str], config_source: str,
             skip_missing: bool = False, keep_features: bool = False) -> EvalResult:
    """``checkpoints``: {"end": path} for MSE/MFsim, {"first": p0, "end": p1} for LR."""
    id_set, ood_sets, missing = find_sets(cfg, skip_missing)
    extractor, diffusion, models, ckpts = load_models(cfg, checkpoints, ctx, config_source)
    sets: Dict[str, SetResult] = {}
    for name, ds in [(ID_NAME, id_set), *ood_sets.items()]:
        sets[name] = score_set(name, ds, extractor, diffusion, models, cfg, ctx, keep_features)
        if ctx.is_main:
            s = sets[name]
            log.info("%s: %d images scored (%s features, %.0f images/s)", name, s.n, s.features_from,
                     s.images_per_s or 0)
    for name in missing:
        sets[name] = SetResult(name, cfg.eval.ood[name])
    sets = {ID_NAME: sets[ID_NAME], **{n: sets[n] for n in cfg.eval.ood if n in sets}}
    fields = score_fields(list(checkpoints), cfg.eval.similarity_type)
    meta = {
        "checkpoints": {role: {"path": c.path, "kind": c.kind, "epoch": c.epoch} for role, c in ckpts.items()},
        "id_dataset": cfg.eval.dataset, "backbone": extractor.identity, "input_size": cfg.backbone.input_size,
        "subset_timesteps_num": cfg.diffusion.subset_timesteps_num, "eta": cfg.diffusion.eta,
        "indexing": cfg.diffusion.indexing, "mfsim_layers": cfg.eval.mfsim_layers, "fpr95": cfg.eval.fpr95,
        "seed": cfg.eval.seed, "device": str(ctx.device), "processes": ctx.world_size,
        "precision": "fp16-autocast" if cfg.amp and ctx.cuda else "fp32",
    }
    return EvalResult(fields[0], fields, sets, compute_metrics(sets, fields, cfg.eval.fpr95), meta)
