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


def likelihood_regret(first: np.ndarray, end: np.ndarray) -> np.ndarray:
    """LR = score(first checkpoint) - score(end checkpoint), per sample, same score type for both."""
    if first.shape != end.shape:
        raise ValueError(f"score arrays differ in shape: {first.shape} vs {end.shape}")
    return first - end
