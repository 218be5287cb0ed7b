"""The evaluation engine of test_mse_mfsim.py and test_LR.py: score the ID test set and every OOD
set with a ``Scorer`` (engine/scorer.py), compute the metrics from the saved scores, write the
results (store/report.py)."""
import logging
import os
import socket
import time
from contextlib import nullcontext
from typing import Dict, List, Optional

import numpy as np

from datasets import ImageSet, build_datasets
from engine.extraction import features_tag, training_set
from engine.scorer import Scorer
from errors import UserError
from experiment.config import Config
from experiment.run import RunConfig
from scoring.baselines import Baselines, baseline_fields
from scoring.metrics import ood_metrics
from store.report import (ID_NAME, EvalResult, SetResult, check_output_dir, format_markdown, output_lock,
                          write_outputs)
from store.rundir import file_stem
from utils.distributed import DistContext, distributed_context, ranks_holding, stop_unless_main_agrees
from utils.precision import exact_fp32
from utils.progress import setup_logging

log = logging.getLogger("dlsr")


def fit_baselines(scorer: Scorer) -> Optional[Baselines]:
    """The config's baselines fitted on the ID training features (from the cache training wrote, or
    extracted once); None if none are asked for. The training set is the run's own (experiment/run.py)."""
    cfg = scorer.cfg
    if not cfg.eval.baselines:
        return None
    feats = scorer.set_features(training_set(cfg), split="train", desc="baselines: ID training features")
    try:
        return Baselines(feats.z, cfg.eval.baselines, cfg.eval.knn_k)
    except ValueError as e:
        raise UserError(f"baselines: {e}") from None


def score_set(scorer: Scorer, name: str, dataset: ImageSet, keep_features: bool = False,
              baselines: Optional[Baselines] = None) -> SetResult:
    start = time.perf_counter()
    feats = scorer.set_features(dataset, desc=f"{name}: features")
    result = SetResult(name, dataset.name, len(dataset), features_from="cache" if feats.from_cache else "extracted")
    result.scores = scorer.scores(feats.z, feats.keys, desc=f"{name}: ", shared=True)
    if baselines is not None:
        result.scores.update(baselines.scores(feats.z))
    if keep_features:
        result.features = feats.z.cpu().numpy().astype(np.float32)
    result.seconds = time.perf_counter() - start
    return result


def evaluate(scorer: Scorer, skip_missing: bool = False, keep_features: bool = False) -> EvalResult:
    """Score the config's ID test set and OOD sets; metrics from the scores."""
    cfg, ctx = scorer.cfg, scorer.ctx
    id_set, ood_sets, missing = find_sets(cfg, skip_missing, ctx)
    baselines = fit_baselines(scorer)
    sets: Dict[str, SetResult] = {}
    for name, ds in [(ID_NAME, id_set), *ood_sets.items()]:
        sets[name] = score_set(scorer, name, ds, keep_features, baselines)
        if ctx.is_main:
            s = sets[name]
            log.info("%s: %d images scored (%s features, %.0f images/s)", name, s.n, s.features_from,
                     s.images_per_s or 0)
    for name in missing:
        sets[name] = SetResult(name, cfg.eval.ood[name])
    sets = {ID_NAME: sets[ID_NAME], **{n: sets[n] for n in cfg.eval.ood if n in sets}}
    fields = scorer.fields() + baseline_fields(cfg.eval.baselines, cfg.eval.knn_k)
    return EvalResult(fields[0], fields, sets, compute_metrics(sets, fields, cfg.eval.fpr95), meta(scorer))


def meta(scorer: Scorer) -> dict:
    """The settings a result was computed with (results.json's "meta", the report's header)."""
    cfg, ctx = scorer.cfg, scorer.ctx
    return {
        "checkpoints": {role: {"path": c.path, "kind": c.kind, "epoch": c.epoch}
                        for role, c in scorer.checkpoints.items()},
        "id_dataset": cfg.eval.dataset, "backbone": scorer.backbone.identity, "input_size": scorer.backbone.input_size,
        "subset_timesteps_num": cfg.diffusion.subset_timesteps_num, "eta": cfg.diffusion.eta,
        "indexing": cfg.diffusion.indexing, "mfsim_layers": cfg.eval.mfsim_layers, "fpr95": cfg.eval.fpr95,
        "seed": cfg.eval.seed, "noise_draws": cfg.eval.noise_draws, "layer_norm": cfg.eval.layer_norm,
        "device": str(ctx.device), "processes": ctx.world_size,
        "groups": dict(cfg.eval.groups), "baselines": baseline_fields(cfg.eval.baselines, cfg.eval.knn_k),
        "precision": features_tag(scorer.mode, scorer.extractor, ctx.device),
    }


def find_sets(cfg: Config, skip_missing: bool, ctx: Optional[DistContext] = None):
    """Build the ID test set and every OOD set before any computing; report all missing ones at once.
    Under several processes the ranks agree: a set missing on any node is missing for all (with
    ``--skip_missing``; else the run stops naming the node and the set)."""
    if ID_NAME in cfg.eval.ood:
        raise UserError(f"an OOD set may not be called {ID_NAME!r}: that name is the ID test set's")
    stems = {}
    for name in (ID_NAME, *cfg.eval.ood):
        other = stems.setdefault(file_stem(name), name)
        if other != name:
            raise UserError(f"the sets {other!r} and {name!r} would both be saved as scores/{file_stem(name)}.npy; "
                            f"rename one")
    specs = {ID_NAME: cfg.eval.dataset, **cfg.eval.ood}
    found, missing = build_datasets(specs, "test", cfg.data_path, cfg.backbone.input_size, cfg.download)
    if ctx is not None and ctx.distributed:
        missing = _agreed_missing(specs, found, missing, ctx)
    if missing and (ID_NAME in missing or not skip_missing):
        lines = "; ".join(f"{'ID test set' if name == ID_NAME else name} ({specs[name]}): {why}"
                          for name, why in missing.items())
        hint = "" if ID_NAME in missing else " (use --skip_missing to go on without the OOD ones)"
        raise UserError(f"{len(missing)} set(s) missing, nothing computed{hint}: {lines}")
    for name, why in missing.items():
        log.warning("skipping missing OOD set %s: %s", name, why)
    id_set = found.pop(ID_NAME)
    return id_set, found, missing


def _agreed_missing(specs: Dict[str, str], found: dict, missing: Dict[str, str], ctx: DistContext) -> Dict[str, str]:
    """The sets missing on any rank, the same on every rank; a set that one rank lacks and another has
    is reported as missing on that rank's node (a collective per set, in the config's order)."""
    agreed = {}
    for name in specs:
        lacking = ranks_holding(name in missing, ctx)
        if lacking:
            here = f" on {socket.gethostname()}" if name in missing else ""
            why = missing.get(name) or f"missing on rank(s) {', '.join(map(str, lacking))} (another node's data folder)"
            agreed[name] = f"{why}{here}" if len(lacking) < ctx.world_size else why
            found.pop(name, None)
    return agreed


def compute_metrics(sets: Dict[str, SetResult], fields: List[str], fpr95: str) -> Dict[str, Dict[str, Optional[dict]]]:
    """Metrics of every OOD set against the ID set, from the score arrays alone."""
    id_scores = sets[ID_NAME].scores
    table = {}
    for f in fields:
        table[f] = {name: (ood_metrics(id_scores[f], s.scores[f], fpr95) if s.features_from != "missing" else None)
                    for name, s in sets.items() if name != ID_NAME}
    return table


def run_evaluation(run: RunConfig, output_dir: str, *, skip_missing: bool = False, save_features: bool = False,
                   plots: bool = True) -> Optional[EvalResult]:
    """The evaluation scripts' whole run: check and lock ``output_dir``, score the config's sets with
    ``run``'s checkpoints, write every output (rank 0) and print the table. Returns the result on rank 0."""
    cfg = run.cfg
    with distributed_context(cfg.device) as ctx, exact_fp32(ctx.device):
        setup_logging(ctx.is_main)
        stop_unless_main_agrees(lambda: check_output_dir(output_dir, cfg.feature_cache_dir), ctx)
        with output_lock(output_dir) if ctx.is_main else nullcontext():
            scorer = Scorer.from_checkpoints(run, ctx)
            result = evaluate(scorer, skip_missing, save_features)
            if not ctx.is_main:
                return None
            write_outputs(result, output_dir, save_features, plots=plots)
            print(format_markdown(result))
            log.info("results written to %s", output_dir)
            return result


def default_output_dir(checkpoint: str, name: str) -> str:
    """results-NAME beside ``checkpoint``."""
    return os.path.join(os.path.dirname(checkpoint) or ".", f"results-{name}")
