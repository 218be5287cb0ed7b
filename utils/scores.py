"""Per-sample OOD scores from (reconstruction, original), docs/METHOD.md §6. Convention throughout:
higher = more likely OOD."""
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

SCORE_TYPES = ("MSE", "MFsim")
MFSIM_LAYERS = ("release", "all")  # release: layers 2..L averaged over L-1; all: every layer (the paper's formula)


def mse_score(rec: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
    """Sum over all dims of (rec - orig)^2. (B, D), (B, D) -> (B,); higher = more OOD."""
    return (rec.float() - orig.float()).pow(2).sum(dim=-1)


def mfsim_score(rec: torch.Tensor, orig: torch.Tensor, indices: Sequence[int], all_layers: bool = False) -> torch.Tensor:
    """Negative mean per-layer cosine similarity. (B, D), (B, D) -> (B,); higher = more OOD.

    Default (the release): the layer slices between consecutive ``indices``, i.e. every layer but
    the first, averaged over L - 1. ``all_layers=True`` (the paper's formula) averages all L slices.
    A perfect reconstruction scores -1. With a single layer both read the same: its cosine.
    """
    bounds = [0, *indices] if all_layers or len(indices) == 1 else list(indices)
    sims = [F.cosine_similarity(rec[..., lo:hi].float(), orig[..., lo:hi].float(), dim=-1)
            for lo, hi in zip(bounds[:-1], bounds[1:])]
    return -torch.stack(sims, dim=-1).mean(dim=-1)


def layer_errors(rec: torch.Tensor, orig: torch.Tensor, indices: Sequence[int]):
    """Per layer, all L of them: (1 - cosine similarity (B, L), squared error (B, L)), in float64."""
    bounds = [0, *indices]
    pairs = list(zip(bounds[:-1], bounds[1:]))
    cos = torch.stack([F.cosine_similarity(rec[:, a:b].float(), orig[:, a:b].float(), dim=1) for a, b in pairs], 1)
    sq = torch.stack([(rec[:, a:b].float() - orig[:, a:b].float()).pow(2).sum(1) for a, b in pairs], 1)
    return 1 - cos.double(), sq.double()


def layer_stats(errors) -> tuple:
    """(mean (L,), std (L,)) of each of ``layer_errors``' two arrays over the ID vectors it was given."""
    return tuple((e.mean(0), e.std(0) + 1e-12) for e in errors)


def layer_normalised_scores(errors, stats) -> dict:
    """The layer-normalised variant (docs/METHOD.md §6a): each layer's error standardised by its ID
    statistics, averaged over the layers. {"MSE": (B,), "MFsim": (B,)}; higher = more OOD."""
    (cos_err, sq), ((mu_c, sd_c), (mu_s, sd_s)) = errors, stats
    return {"MSE": ((sq - mu_s) / sd_s).mean(1), "MFsim": ((cos_err - mu_c) / sd_c).mean(1)}


def likelihood_regret(first: np.ndarray, end: np.ndarray) -> np.ndarray:
    """LR = score(first checkpoint) - score(end checkpoint), per sample, same score type for both."""
    if first.shape != end.shape:
        raise ValueError(f"score arrays differ in shape: {first.shape} vs {end.shape}")
    return first - end
