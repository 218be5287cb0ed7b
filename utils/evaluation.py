"""The scoring engine behind every entry point (test_mse_mfsim.py, test_LR.py, predict.py and the
Python API), as training's engine is ``utils/training.py``.

A ``Scorer`` bundles what scoring needs: the frozen extractor, the LFDN of each checkpoint role
("end", or "first" and "end" for LR), the diffusion schedule, the config and the process context.
Features arrive standardised on the device from ``utils.features``. Each image's test-time noise
is drawn from a generator seeded by (seed, checkpoint role, the image's pixel digest), the same
amount per image as the release draws: an image's noise does not depend on its set, its batch,
the batch size, the order or the number of processes (docs/METHOD.md §5).
"""
import copy
import hashlib
import logging
import time
from contextlib import nullcontext
from typing import Dict, List, Optional, Union

import numpy as np
import torch

from datasets import ImageSet, build_datasets
from errors import UserError
from models.diffusion import GaussianDiffusion
from models.features import BackboneId, MultiLayerFeatures, weights_digest
from models.lfdn import LFDN
from utils.baselines import Baselines, baseline_fields
from utils.checkpoint import LoadedCheckpoint, check_against, load_checkpoint
from utils.config import Config
from utils.distributed import DistContext, all_reduce_sum, distributed_context, stop_unless_main_agrees
from utils.features import (Features, autocast, compute_mode, features_for, file_stem, image_batch_features,
                            precision_tag, training_set, vector_keys)
from utils.metrics import ood_metrics
from utils.model_factory import build_diffusion, build_extractor
from utils.progress import progress, setup_logging
from utils.report import (ID_NAME, EvalResult, SetResult, check_output_dir, format_markdown, output_lock,
                          write_outputs)
from utils.rundir import same_file
from utils.scores import (SCORE_TYPES, layer_errors, layer_normalised_scores, layer_stats, likelihood_regret,
                          mfsim_score, mse_score)

log = logging.getLogger("dlsr")
LAYER_STATS_VECTORS = 2000  # ID training vectors that eval.layer_norm's per-layer statistics come from


def score_fields(roles: List[str], headline_type: str) -> List[str]:
    """Field names in display order, the headline type first. One role: MFsim, MSE; two: LR_*, first_*, end_*."""
    types = [headline_type] + [t for t in SCORE_TYPES if t != headline_type]
    if len(roles) == 1:
        return types
    return [f"{prefix}_{t}" for t in types for prefix in ("LR", *roles)]


def noise_seed(seed: int, role: str, image_key: int) -> int:
    digest = hashlib.sha256(f"{seed}|{role}|{image_key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def image_noise(keys: torch.Tensor, seed: int, role: str, draws: int, shape: tuple) -> torch.Tensor:
    """(draws, B, *shape) standard normal noise on CPU, image b's from its own generator."""
    g = torch.Generator()
    per_image = []
    for key in keys.tolist():
        g.manual_seed(noise_seed(seed, role, key))
        per_image.append(torch.randn((draws, *shape), generator=g))
    return torch.stack(per_image, dim=1) if per_image else torch.empty((draws, 0, *shape))


class Scorer:
    """Scores images, sets or standardised vectors with one or two checkpoints. Higher = more OOD."""

    def __init__(self, cfg: Config, ctx: DistContext, extractor: MultiLayerFeatures, diffusion: GaussianDiffusion,
                 models: Dict[str, LFDN], checkpoints: Optional[Dict[str, LoadedCheckpoint]] = None):
        self.cfg, self.ctx, self.extractor, self.diffusion = cfg, ctx, extractor, diffusion
        self.models = models
        self.checkpoints = checkpoints or {}
        self.mode = compute_mode(cfg, ctx)  # fp32 | fp16-autocast | bf16-autocast
        self.train_z: Optional[torch.Tensor] = None  # ID training vectors given directly (the API's fit_features)
        self._layer_stats: Dict[tuple, tuple] = {}    # (role, draw) -> layer_stats, for eval.layer_norm

    @classmethod
    def from_checkpoints(cls, cfg: Config, ctx: DistContext, paths: Dict[str, Union[str, LoadedCheckpoint]],
                         config_source: str = "the config") -> "Scorer":
        """{role: checkpoint path (or one already loaded)} -> a Scorer with each checkpoint's EMA weights,
        all checked against ``cfg``."""
        ckpts = {role: p if isinstance(p, LoadedCheckpoint) else load_checkpoint(p) for role, p in paths.items()}
        runs = {role: c.run_id for role, c in ckpts.items() if c.run_id}
        if len(runs) == len(ckpts) > 1 and len(set(runs.values())) > 1:
            raise UserError(f"the checkpoints come from different training runs "
                            f"({', '.join(f'{r}: {c.path} (run {c.run_id[:8]})' for r, c in ckpts.items())}); "
                            f"LR compares the first and the last checkpoint of one run")
        if set(ckpts) == {"first", "end"}:
            check_lr_pair(ckpts["first"], ckpts["end"])
        for ck in ckpts.values():
            check_backbone_name(ck, cfg, config_source)
        cfg = with_training_set_of(cfg, ckpts, config_source, say=ctx.is_main)
        states = {role: c.backbone_state for role, c in ckpts.items() if c.backbone_state is not None}
        digests = {role: weights_digest(s) for role, s in states.items()}
        if len(set(digests.values())) > 1:
            raise UserError(f"the checkpoints carry different backbone weights "
                            f"({', '.join(f'{r}: {d}' for r, d in digests.items())}); they must come from one run")
        states = list(states.values())
        extractor = build_extractor(cfg, states[0] if states else None)
        diffusion = build_diffusion(cfg)
        models = {}
        for role, ck in ckpts.items():
            check_against(ck, backbone=extractor.backbone_id(cfg.backbone.input_size), diffusion=diffusion,
                          config_source=config_source)
            model = LFDN(**ck.lfdn_sizes())
            model.load_state_dict(ck.eval_weights)
            models[role] = model.to(ctx.device).eval()
        return cls(cfg, ctx, extractor.to(ctx.device), diffusion, models, ckpts)

    @property
    def backbone(self) -> BackboneId:
        return self.extractor.backbone_id(self.cfg.backbone.input_size)

    def to(self, ctx: DistContext) -> "Scorer":
        """Move every piece of state to ``ctx``'s device: the networks, the training vectors, the
        layer statistics, and the arithmetic (fp16 autocast on CUDA, fp32 on CPU) that follows the device."""
        self.ctx = ctx
        self.extractor.to(ctx.device)
        for model in self.models.values():
            model.to(ctx.device)
        if self.train_z is not None:
            self.train_z = self.train_z.to(ctx.device)
        self._layer_stats = {k: tuple((mu.to(ctx.device), sd.to(ctx.device)) for mu, sd in v)
                             for k, v in self._layer_stats.items()}
        self.mode = compute_mode(self.cfg, ctx)
        return self

    @property
    def roles(self) -> List[str]:
        return list(self.models)

    def fields(self) -> List[str]:
        return score_fields(self.roles, self.cfg.eval.similarity_type)

    # ---------------------------------------------------------------- features

    def set_features(self, dataset: ImageSet, split: str = "test", desc: str = "features") -> Features:
        """Standardised features of a whole set on the device, through the feature cache."""
        return features_for(self.cfg, self.ctx, self.extractor, dataset, split, desc)

    def image_features(self, images: torch.Tensor):
        """uint8 decoded images (B, S, S[, 3]) -> (standardised (B, D) on the device, image keys (B,))."""
        return image_batch_features(self.extractor, images, self.ctx, self.mode, self.cfg.extract_batch_size)

    # ---------------------------------------------------------------- scores

    @torch.no_grad()
    def reconstruction_scores(self, z: torch.Tensor, keys: torch.Tensor, role: str, desc: str = "",
                              shared: bool = False) -> Dict[str, np.ndarray]:
        """z: (N, D) standardised on the device, keys: (N,) -> {"MSE": (N,), "MFsim": (N,)} of one checkpoint.

        ``shared``: the ranks split the batches round-robin and every rank gets all N scores;
        otherwise this process scores all N alone. With ``eval.noise_draws`` N > 1 the scores of N
        independent draws are averaged; ``eval.layer_norm`` standardises each layer's error first
        (docs/METHOD.md §6a). Both off: the release's scores.
        """
        cfg, ctx = self.cfg, self.ctx
        b, n = cfg.eval.batch_size, z.shape[0]
        world, rank = (ctx.world_size, ctx.rank) if shared else (1, 0)
        self.prepare(role)  # collectives, if any, before the ranks' loops diverge
        out = torch.zeros((n, len(SCORE_TYPES)), dtype=torch.float64, device=ctx.device)  # columns: SCORE_TYPES
        batches = range(rank, -(-n // b), world)
        for j in progress(batches, desc, ctx.is_main and bool(desc), unit="batch"):
            rows = slice(j * b, (j + 1) * b)
            for draw in range(cfg.eval.noise_draws):
                scores = self._draw_scores(z[rows], keys[rows], role, draw)
                for c, t in enumerate(SCORE_TYPES):
                    out[rows, c] += scores[t].double() / cfg.eval.noise_draws
        if shared:
            out = all_reduce_sum(out, ctx)  # every row was written by exactly one rank
        out = out.cpu().numpy()
        return {t: out[:, i] for i, t in enumerate(SCORE_TYPES)}

    def _reconstruct(self, z0: torch.Tensor, keys: torch.Tensor, role: str, draw: int) -> torch.Tensor:
        """(b, D) reconstructions of ``role``'s LFDN with the draw-th noise of each image (draw 0: the release's one)."""
        cfg, d = self.cfg, self.cfg.diffusion
        draws = self.diffusion.noise_draws(d.subset_timesteps_num, d.eta, d.indexing)
        noise = image_noise(keys, cfg.eval.seed, role if draw == 0 else f"{role}-draw{draw}", draws, z0.shape[1:])
        with autocast(self.ctx, self.mode):
            return self.diffusion.reconstruct(self.models[role], z0, d.subset_timesteps_num, d.eta,
                                              indexing=d.indexing, noise=noise)

    def _draw_scores(self, z0: torch.Tensor, keys: torch.Tensor, role: str, draw: int) -> Dict[str, torch.Tensor]:
        rec = self._reconstruct(z0, keys, role, draw)  # (b, D)
        indices = self.extractor.indices
        if self.cfg.eval.layer_norm:
            return layer_normalised_scores(layer_errors(rec, z0, indices), self.layer_stats(role, draw))
        return {"MSE": mse_score(rec, z0), "MFsim": mfsim_score(rec, z0, indices, self.cfg.eval.mfsim_layers == "all")}

    def prepare(self, role: Optional[str] = None) -> None:
        """Compute now what scoring ``role`` (every role by default) computes once: eval.layer_norm's
        statistics. They may need the training features, whose cache decision is collective, so
        every rank calls this at the same point, before any per-rank loop (where a rank with no
        batch would skip it and leave the others waiting)."""
        if self.cfg.eval.layer_norm:
            for r in [role] if role else self.roles:
                for draw in range(self.cfg.eval.noise_draws):
                    self.layer_stats(r, draw)

    def layer_stats(self, role: str, draw: int) -> tuple:
        """Per-layer error statistics of ``role``'s LFDN (draw ``draw``) on up to LAYER_STATS_VECTORS
        seeded ID training vectors: those given to ``fit_features``, else the checkpoint's training set."""
        if (role, draw) not in self._layer_stats:
            if self.train_z is not None:
                z, keys = self.train_z, vector_keys(self.train_z)
            else:
                feats = self.set_features(training_set(self.cfg), split="train", desc="ID training features")
                z, keys = feats.z, feats.keys
            pick = torch.from_numpy(np.sort(np.random.default_rng(0).permutation(len(z))[:LAYER_STATS_VECTORS]))
            z0, k0 = z[pick.to(z.device)], keys[pick]
            errors = [layer_errors(self._reconstruct(z0[i:i + 1024], k0[i:i + 1024], role, draw),
                                   z0[i:i + 1024], self.extractor.indices) for i in range(0, len(z0), 1024)]
            self._layer_stats[(role, draw)] = layer_stats([torch.cat(e) for e in zip(*errors)])
        return self._layer_stats[(role, draw)]

    def scores(self, z: torch.Tensor, keys: torch.Tensor, desc: str = "", shared: bool = False) -> Dict[str, np.ndarray]:
        """Every score field of ``fields()`` for (N, D) vectors: MSE/MFsim, or LR_* with first_*/end_*."""
        per_role = {role: self.reconstruction_scores(z, keys, role, f"{desc}reconstruct ({role})" if desc else "",
                                                     shared) for role in self.roles}
        if len(self.roles) == 1:
            return per_role[self.roles[0]]
        first, end = self.roles
        out = {}
        for t in SCORE_TYPES:
            out[f"LR_{t}"] = likelihood_regret(per_role[first][t], per_role[end][t])
            for role in self.roles:
                out[f"{role}_{t}"] = per_role[role][t]
        return out

    def fit_baselines(self) -> Optional[Baselines]:
        """The config's baselines fitted on the ID training features (from the cache training wrote,
        or extracted once); None if none are asked for. The training set is the checkpoint's own
        (``with_training_set_of``)."""
        cfg = self.cfg
        if not cfg.eval.baselines:
            return None
        feats = self.set_features(training_set(cfg), split="train", desc="baselines: ID training features")
        try:
            return Baselines(feats.z, cfg.eval.baselines, cfg.eval.knn_k)
        except ValueError as e:
            raise UserError(f"baselines: {e}") from None

    def score_set(self, name: str, dataset: ImageSet, keep_features: bool = False,
                  baselines: Optional[Baselines] = None) -> SetResult:
        start = time.perf_counter()
        feats = self.set_features(dataset, desc=f"{name}: features")
        result = SetResult(name, dataset.name, len(dataset), features_from="cache" if feats.from_cache else "extracted")
        result.scores = self.scores(feats.z, feats.keys, desc=f"{name}: ", shared=True)
        if baselines is not None:
            result.scores.update(baselines.scores(feats.z))
        if keep_features:
            result.features = feats.z.cpu().numpy().astype(np.float32)
        result.seconds = time.perf_counter() - start
        return result

    # ---------------------------------------------------------------- the evaluation driver

    def evaluate(self, skip_missing: bool = False, keep_features: bool = False) -> EvalResult:
        """Score the config's ID test set and OOD sets; metrics from the scores."""
        cfg, ctx = self.cfg, self.ctx
        id_set, ood_sets, missing = find_sets(cfg, skip_missing)
        baselines = self.fit_baselines()
        sets: Dict[str, SetResult] = {}
        for name, ds in [(ID_NAME, id_set), *ood_sets.items()]:
            sets[name] = self.score_set(name, ds, keep_features, baselines)
            if ctx.is_main:
                s = sets[name]
                log.info("%s: %d images scored (%s features, %.0f images/s)", name, s.n, s.features_from,
                         s.images_per_s or 0)
        for name in missing:
            sets[name] = SetResult(name, cfg.eval.ood[name])
        sets = {ID_NAME: sets[ID_NAME], **{n: sets[n] for n in cfg.eval.ood if n in sets}}
        fields = self.fields() + baseline_fields(cfg.eval.baselines, cfg.eval.knn_k)
        return EvalResult(fields[0], fields, sets, compute_metrics(sets, fields, cfg.eval.fpr95), self.meta())

    def meta(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        return {
            "checkpoints": {role: {"path": c.path, "kind": c.kind, "epoch": c.epoch}
                            for role, c in self.checkpoints.items()},
            "id_dataset": cfg.eval.dataset, "backbone": self.backbone.identity, "input_size": self.backbone.input_size,
            "subset_timesteps_num": cfg.diffusion.subset_timesteps_num, "eta": cfg.diffusion.eta,
            "indexing": cfg.diffusion.indexing, "mfsim_layers": cfg.eval.mfsim_layers, "fpr95": cfg.eval.fpr95,
            "seed": cfg.eval.seed, "noise_draws": cfg.eval.noise_draws, "layer_norm": cfg.eval.layer_norm,
            "device": str(ctx.device), "processes": ctx.world_size,
            "groups": dict(cfg.eval.groups), "baselines": baseline_fields(cfg.eval.baselines, cfg.eval.knn_k),
            "precision": precision_tag(self.mode, self.extractor, ctx.device),
        }


TRAINING_SET_KEYS = ("dataset", "subset")  # train.*: what the ID training set is


def with_training_set_of(cfg: Config, ckpts: Dict[str, LoadedCheckpoint], config_source: str,
                         say: bool = True) -> Config:
    """``cfg`` with the ID training set that the checkpoints were trained on (train.dataset and
    train.subset of their stored config), so that whatever is fitted on training data (the
    baselines) uses that set. Says so in one line where ``cfg`` names another; the authors' files
    store no config, and then ``cfg``'s is used."""
    stored = next((c.config["train"] for c in ckpts.values() if c.config and "train" in c.config), None)
    if stored is None:
        return cfg
    theirs = {k: stored.get(k, getattr(cfg.train, k)) for k in TRAINING_SET_KEYS}
    ours = {k: getattr(cfg.train, k) for k in TRAINING_SET_KEYS}
    if theirs == ours:
        return cfg
    if say:
        log.warning("%s sets the ID training set to %s, but the checkpoint was trained on %s: using the "
                    "checkpoint's", config_source, _training_set_words(ours), _training_set_words(theirs))
    cfg = copy.deepcopy(cfg)
    for k, v in theirs.items():
        setattr(cfg.train, k, v)
    return cfg


def _training_set_words(train: dict) -> str:
    size = "all images" if train["subset"] is None else f"a subset of {train['subset']}"
    return f"{train['dataset']} ({size})"


def check_lr_pair(first: LoadedCheckpoint, end: LoadedCheckpoint) -> None:
    """LR compares an early checkpoint of a run with a later one: two different files, first earlier."""
    if same_file(first.path, end.path):
        raise UserError(f"--pretrained_ldm_ckpt_first and --pretrained_ldm_ckpt_end are the same file ({end.path}); "
                        f"LR compares an early checkpoint of a run with a later one (e.g. checkpoint-0.pth and "
                        f"checkpoint-last.pth)")
    if first.epoch is not None and end.epoch is not None:
        at = [(c.epoch, int((c.in_progress or {}).get("step", 1 << 62))) for c in (first, end)]  # a finished epoch last
        if not at[0] < at[1]:
            raise UserError(f"the first checkpoint {first.path} (epoch {first.epoch}) is not earlier than the end "
                            f"checkpoint {end.path} (epoch {end.epoch}); swap them, or pass another pair")


def check_backbone_name(ck: LoadedCheckpoint, cfg: Config, config_source: str) -> None:
    """Refuse, before any backbone weights are looked for, a checkpoint of ours trained on another
    backbone or input size than ``cfg`` names."""
    trained = ck.backbone or {}
    if trained.get("name") and (trained["name"], trained.get("input_size")) != (cfg.backbone.name,
                                                                                cfg.backbone.input_size):
        raise UserError(f"{ck.path} holds an LFDN trained on {trained['name']} features at "
                        f"{trained.get('input_size')} px, but {config_source} uses {cfg.backbone.name} at "
                        f"{cfg.backbone.input_size} px; pass the config it was trained with (or none: the "
                        f"checkpoint stores its own)")


def find_sets(cfg: Config, skip_missing: bool):
    """Build the ID test set and every OOD set before any computing; report all missing ones at once."""
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
    if missing and (ID_NAME in missing or not skip_missing):
        lines = "; ".join(f"{'ID test set' if name == ID_NAME else name} ({specs[name]}): {why}"
                          for name, why in missing.items())
        hint = "" if ID_NAME in missing else " (use --skip_missing to go on without the OOD ones)"
        raise UserError(f"{len(missing)} set(s) missing, nothing computed{hint}: {lines}")
    for name, why in missing.items():
        log.warning("skipping missing OOD set %s: %s", name, why)
    id_set = found.pop(ID_NAME)
    return id_set, found, missing


def compute_metrics(sets: Dict[str, SetResult], fields: List[str], fpr95: str) -> Dict[str, Dict[str, Optional[dict]]]:
    """Metrics of every OOD set against the ID set, from the score arrays alone."""
    id_scores = sets[ID_NAME].scores
    table = {}
    for f in fields:
        table[f] = {name: (ood_metrics(id_scores[f], s.scores[f], fpr95) if s.features_from != "missing" else None)
                    for name, s in sets.items() if name != ID_NAME}
    return table


def run_evaluation(cfg: Config, checkpoints: Dict[str, str], output_dir: str, *, config_source: str,
                   skip_missing: bool = False, save_features: bool = False, plots: bool = True) -> Optional[EvalResult]:
    """The evaluation scripts' whole run: check and lock ``output_dir``, score the config's sets with
    ``checkpoints`` ({role: path}), write every output (rank 0) and print the table. Returns the
    result on rank 0."""
    with distributed_context(cfg.device) as ctx:
        setup_logging(ctx.is_main)
        stop_unless_main_agrees(lambda: check_output_dir(output_dir, cfg.feature_cache_dir), ctx)
        with output_lock(output_dir) if ctx.is_main else nullcontext():
            scorer = Scorer.from_checkpoints(cfg, ctx, checkpoints, config_source)
            result = scorer.evaluate(skip_missing, save_features)
            if not ctx.is_main:
                return None
            write_outputs(result, output_dir, save_features, plots=plots)
            print(format_markdown(result))
            log.info("results written to %s", output_dir)
            return result
