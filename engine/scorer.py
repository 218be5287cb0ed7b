"""The scoring engine behind every entry point (test_mse_mfsim.py, test_LR.py, predict.py and the
Python API), as training's engine is ``engine/training.py``.

A ``Scorer`` bundles what scoring needs: the frozen extractor, the LFDN of each checkpoint role
("end", or "first" and "end" for LR), the diffusion schedule, the config and the process context.
Features arrive standardised on the device from ``engine.extraction``. Each image's test-time noise
is drawn from a generator seeded by (seed, checkpoint role, the image's pixel digest), the same
amount per image as the release draws: an image's noise does not depend on its set, its batch,
the batch size, the order or the number of processes (docs/METHOD.md §5). The scores themselves
come from the registry in ``scoring/scores.py``.
"""
import hashlib
import logging
from typing import Dict, List, Optional

import numpy as np
import torch

from engine.extraction import Features, features_for, image_batch_features, mode_of, training_set, vector_keys
from engine.factory import build_diffusion, build_extractor
from experiment.config import Config
from experiment.run import RunConfig, check_lr_pair, checkpoints_agree
from models.diffusion import GaussianDiffusion
from models.features import BackboneId, MultiLayerFeatures
from models.lfdn import LFDN
from scoring.scores import (all_scores, layer_errors, layer_normalised_scores, layer_slices, layer_stats,
                            likelihood_regret, score_types)
from store.checkpoint import LoadedCheckpoint, check_against
from utils.distributed import DistContext, all_reduce_sum
from utils.precision import autocast
from utils.progress import progress

log = logging.getLogger("dlsr")
LAYER_STATS_VECTORS = 2000  # ID training vectors that eval.layer_norm's per-layer statistics come from


def score_fields(roles: List[str], headline_type: str) -> List[str]:
    """Field names in display order, the headline type first. One role: MFsim, MSE; two: LR_*, first_*, end_*."""
    types = [headline_type] + [t for t in score_types() if t != headline_type]
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
        self.mode = mode_of(cfg, ctx)  # fp32 | fp16-autocast | bf16-autocast
        self.train_z: Optional[torch.Tensor] = None  # ID training vectors given directly (the API's fit_features)
        self._layer_stats: Dict[tuple, dict] = {}     # (role, draw) -> layer_stats, for eval.layer_norm

    @classmethod
    def from_checkpoints(cls, run: RunConfig, ctx: DistContext) -> "Scorer":
        """A Scorer with the EMA weights of each of ``run``'s checkpoints ({role: LoadedCheckpoint}),
        under ``run.cfg`` (``experiment.run.run_config``: what the run is comes from its checkpoint)."""
        cfg, ckpts = run.cfg, run.checkpoints
        checkpoints_agree(ckpts)
        if set(ckpts) == {"first", "end"}:
            check_lr_pair(ckpts["first"], ckpts["end"])
        states = [c.backbone_state for c in ckpts.values() if c.backbone_state is not None]
        extractor = build_extractor(cfg, states[0] if states else None)
        diffusion = build_diffusion(cfg)
        models = {}
        for role, ck in ckpts.items():
            check_against(ck, backbone=extractor.backbone_id(cfg.backbone.input_size), diffusion=diffusion,
                          config_source=run.source)
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
        self._layer_stats = {k: {name: tuple(t.to(ctx.device) for t in pair) for name, pair in v.items()}
                             for k, v in self._layer_stats.items()}
        self.mode = mode_of(self.cfg, ctx)
        return self

    @property
    def roles(self) -> List[str]:
        return list(self.models)

    def fields(self) -> List[str]:
        return score_fields(self.roles, self.cfg.eval.similarity_type)

    # ---------------------------------------------------------------- features

    def set_features(self, dataset, split: str = "test", desc: str = "features") -> Features:
        """Standardised features of a whole set on the device, through the feature cache."""
        return features_for(self.cfg, self.ctx, self.extractor, dataset, split, desc)

    def image_features(self, images: torch.Tensor):
        """uint8 decoded images (B, S, S[, 3]) -> (standardised (B, D) on the device, image keys (B,))."""
        return image_batch_features(self.extractor, images, self.ctx, self.mode, self.cfg.extract_batch_size)

    # ---------------------------------------------------------------- scores

    @torch.no_grad()
    def reconstruction_scores(self, z: torch.Tensor, keys: torch.Tensor, role: str, desc: str = "",
                              shared: bool = False) -> Dict[str, np.ndarray]:
        """z: (N, D) standardised on the device, keys: (N,) -> {score: (N,)} of one checkpoint.

        ``shared``: the ranks split the batches round-robin and every rank gets all N scores;
        otherwise this process scores all N alone. With ``eval.noise_draws`` N > 1 the scores of N
        independent draws are averaged; ``eval.layer_norm`` standardises each layer's error first
        (docs/METHOD.md §6a). Both off: the release's scores.
        """
        cfg, ctx = self.cfg, self.ctx
        b, n = cfg.eval.batch_size, z.shape[0]
        world, rank = (ctx.world_size, ctx.rank) if shared else (1, 0)
        self.prepare(role)  # collectives, if any, before the ranks' loops diverge
        names = score_types()
        out = torch.zeros((n, len(names)), dtype=torch.float64, device=ctx.device)  # columns: names
        batches = range(rank, -(-n // b), world)
        for j in progress(batches, desc, ctx.is_main and bool(desc), unit="batch"):
            rows = slice(j * b, (j + 1) * b)
            for draw in range(cfg.eval.noise_draws):
                scores = self._draw_scores(z[rows], keys[rows], role, draw)
                for c, t in enumerate(names):
                    out[rows, c] += scores[t].double() / cfg.eval.noise_draws
        if shared:
            out = all_reduce_sum(out, ctx)  # every row was written by exactly one rank
        out = out.cpu().numpy()
        return {t: out[:, i] for i, t in enumerate(names)}

    def _reconstruct(self, z0: torch.Tensor, keys: torch.Tensor, role: str, draw: int) -> torch.Tensor:
        """(b, D) reconstructions of ``role``'s LFDN with the draw-th noise of each image (draw 0: the release's one)."""
        cfg, d = self.cfg, self.cfg.diffusion
        draws = self.diffusion.noise_draws(d.subset_timesteps_num, d.eta, d.indexing)
        noise = image_noise(keys, cfg.eval.seed, role if draw == 0 else f"{role}-draw{draw}", draws, z0.shape[1:])
        with autocast(self.mode):
            return self.diffusion.reconstruct(self.models[role], z0, d.subset_timesteps_num, d.eta,
                                              indexing=d.indexing, noise=noise)

    @property
    def layers(self) -> list:
        return layer_slices(self.extractor.indices)

    def _draw_scores(self, z0: torch.Tensor, keys: torch.Tensor, role: str, draw: int) -> Dict[str, torch.Tensor]:
        rec = self._reconstruct(z0, keys, role, draw)  # (b, D)
        if self.cfg.eval.layer_norm:
            return layer_normalised_scores(layer_errors(rec, z0, self.layers, self.cfg.eval),
                                           self.layer_stats(role, draw))
        return all_scores(rec, z0, self.layers, self.cfg.eval)

    def prepare(self, role: Optional[str] = None) -> None:
        """Compute now what scoring ``role`` (every role by default) computes once: eval.layer_norm's
        statistics, for every noise draw. They may need the training features, whose cache decision
        is collective, so every rank calls this at the same point, before any per-rank loop (where a
        rank with no batch would skip it and leave the others waiting)."""
        if self.cfg.eval.layer_norm:
            for r in [role] if role else self.roles:
                for draw in range(self.cfg.eval.noise_draws):
                    self.layer_stats(r, draw)

    def layer_stats(self, role: str, draw: int) -> dict:
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
                                   z0[i:i + 1024], self.layers, self.cfg.eval) for i in range(0, len(z0), 1024)]
            self._layer_stats[(role, draw)] = layer_stats({t: torch.cat([e[t] for e in errors]) for t in errors[0]})
        return self._layer_stats[(role, draw)]

    def scores(self, z: torch.Tensor, keys: torch.Tensor, desc: str = "",
               shared: bool = False) -> Dict[str, np.ndarray]:
        """Every score field of ``fields()`` for (N, D) vectors: the scores, or LR_* with first_*/end_*."""
        per_role = {role: self.reconstruction_scores(z, keys, role, f"{desc}reconstruct ({role})" if desc else "",
                                                     shared) for role in self.roles}
        if len(self.roles) == 1:
            return per_role[self.roles[0]]
        first, end = self.roles
        out = {}
        for t in score_types():
            out[f"LR_{t}"] = likelihood_regret(per_role[first][t], per_role[end][t])
            for role in self.roles:
                out[f"{role}_{t}"] = per_role[role][t]
        return out

