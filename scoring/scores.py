"""Per-sample OOD scores from (reconstruction, original), docs/METHOD.md §6: one registry, the one
place a score is defined. Convention throughout: higher = more likely OOD.

A score is a function ``(rec (B, D), orig (B, D), layers, options) -> (B,)`` registered with
``@score("NAME")``: ``layers`` are the (start, end) column ranges of the backbone's taps in the
vector, ``options`` the config's eval section (a score may ignore it). Everything else follows from
this table: the ``--similarity_type`` / ``--score`` choices, the results tables and their columns,
the per-image score files, predict.py's CSV columns and the calibration key (docs/EXTENDING.md).

The layer-normalised variant (``eval.layer_norm``, docs/METHOD.md §6a) needs nothing more: a score
applied to one layer's slice alone is that layer's error.
"""
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

Layers = Sequence[Tuple[int, int]]
ScoreFn = Callable[[torch.Tensor, torch.Tensor, Layers, object], torch.Tensor]
SCORES: Dict[str, ScoreFn] = {}


def score(name: str):
    """Register ``fn`` as the score ``name`` (a name also used as a column and a file field)."""
    def register(fn: ScoreFn) -> ScoreFn:
        if name in SCORES:
            raise ValueError(f"score {name!r} is registered twice")
        SCORES[name] = fn
        return fn
    return register


def score_types() -> Tuple[str, ...]:
    """The registered scores' names, in registration order."""
    return tuple(SCORES)


def layer_slices(indices: Sequence[int]) -> List[Tuple[int, int]]:
    """The (start, end) columns of each layer, from the cumulative channel counts ``indices``."""
    bounds = [0, *indices]
    return list(zip(bounds[:-1], bounds[1:]))


MFSIM_LAYERS = ("release", "all")  # release: layers 2..L averaged over L-1; all: every layer (the paper's formula)


@score("MSE")
def mse_score(rec: torch.Tensor, orig: torch.Tensor, layers: Layers = (), options=None) -> torch.Tensor:
    """Sum over all dims of (rec - orig)^2. (B, D), (B, D) -> (B,)."""
    return (rec.float() - orig.float()).pow(2).sum(dim=-1)


@score("MFsim")
def mfsim_score(rec: torch.Tensor, orig: torch.Tensor, layers: Layers, options=None) -> torch.Tensor:
    """Negative mean per-layer cosine similarity. (B, D), (B, D) -> (B,).

    By default (the release) every layer but the first, averaged over L - 1; ``options.mfsim_layers``
    "all" (the paper's formula) averages all L. A perfect reconstruction scores -1. With a single
    layer both read the same: its cosine.
    """
    all_layers = getattr(options, "mfsim_layers", "release") == "all"
    chosen = list(layers) if all_layers or len(layers) == 1 else list(layers)[1:]
    sims = [F.cosine_similarity(rec[..., lo:hi].float(), orig[..., lo:hi].float(), dim=-1) for lo, hi in chosen]
    return -torch.stack(sims, dim=-1).mean(dim=-1)


def all_scores(rec: torch.Tensor, orig: torch.Tensor, layers: Layers, options=None) -> Dict[str, torch.Tensor]:
    """Every registered score of (B, D) reconstructions: {name: (B,)}."""
    return {name: fn(rec, orig, layers, options) for name, fn in SCORES.items()}


def layer_errors(rec: torch.Tensor, orig: torch.Tensor, layers: Layers, options=None) -> Dict[str, torch.Tensor]:
    """Each score on each layer alone: {name: (B, L) float64}."""
    return {name: torch.stack([fn(rec[:, lo:hi], orig[:, lo:hi], [(0, hi - lo)], options).double()
                               for lo, hi in layers], dim=1) for name, fn in SCORES.items()}


def layer_stats(errors: Dict[str, torch.Tensor]) -> Dict[str, tuple]:
    """{name: (mean (L,), std (L,))} of ``layer_errors`` over the ID vectors it was given."""
    return {name: (e.mean(0), e.std(0) + 1e-12) for name, e in errors.items()}


def layer_normalised_scores(errors: Dict[str, torch.Tensor], stats: Dict[str, tuple]) -> Dict[str, torch.Tensor]:
    """The layer-normalised variant: each layer's error standardised by its ID statistics, averaged
    over the layers. {name: (B,)}."""
    return {name: ((e - stats[name][0]) / stats[name][1]).mean(1) for name, e in errors.items()}


def likelihood_regret(first: np.ndarray, end: np.ndarray) -> np.ndarray:
    """LR = score(first checkpoint) - score(end checkpoint), per sample, same score type for both."""
    if first.shape != end.shape:
        raise ValueError(f"score arrays differ in shape: {first.shape} vs {end.shape}")
    return first - end
