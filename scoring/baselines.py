"""Baseline OOD scores on the same standardised features as DLSR (docs/METHOD.md §7a; higher = more
OOD), fitted on the ID training features:

- kNN (Sun et al., ICML 2022): the Euclidean distance of the L2-normalised vector to its k-th nearest
  L2-normalised ID training vector.
- Mahalanobis: the squared Mahalanobis distance to one Gaussian fitted on the ID training vectors,
  with Ledoit-Wolf shrinkage of the covariance.

Both work a chunk of test vectors at a time, so memory stays bounded (a chunk x N_train matrix of
at most ~64 MB) however large the test set is; bench/bench_scale.py measures them at CIFAR-10 scale.
"""
from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn.functional as F

BASELINES = ("knn", "mahalanobis")
CHUNK_ELEMENTS = 16 * 2 ** 20  # floats in one (chunk, N_train) similarity matrix


def baseline_fields(names: Sequence[str], ks: Sequence[int]) -> list:
    """Score field names of the chosen baselines: kNN_k1, kNN_k50, ..., Mahalanobis."""
    fields = []
    if "knn" in names:
        fields += [f"kNN_k{k}" for k in ks]
    if "mahalanobis" in names:
        fields.append("Mahalanobis")
    return fields


MIN_GAUSSIAN = 3  # training features below which Mahalanobis's Gaussian is degenerate


class Baselines:
    """Fitted once on the ID training features (N, D); ``scores(z)`` gives every baseline field for (M, D)."""

    def __init__(self, train: torch.Tensor, names: Sequence[str], ks: Sequence[int]):
        self.names, self.ks = list(names), list(ks)
        if "knn" in self.names:
            if max(self.ks) > len(train):
                raise ValueError(f"kNN with k = {max(self.ks)} needs at least that many training features, "
                                 f"got {len(train)}")
            self.train = train.float()  # (N, D), for the exact distances of the candidates
            self.bank = F.normalize(self.train, dim=1)  # (N, D), float32: for ranking only
        if "mahalanobis" in self.names:
            if len(train) < MIN_GAUSSIAN:
                raise ValueError(f"Mahalanobis needs at least {MIN_GAUSSIAN} training features, got {len(train)}: "
                                 f"the covariance of 1 or 2 vectors is degenerate (every image would score alike)")
            from sklearn.covariance import LedoitWolf
            x = train.double().cpu().numpy()
            fit = LedoitWolf().fit(x)
            self.mean = torch.from_numpy(fit.location_).to(train.device)  # (D,)
            self.precision = torch.from_numpy(fit.precision_).to(train.device)  # (D, D)

    def to(self, device: torch.device) -> "Baselines":
        """Move the fitted state (the kNN bank, the Gaussian) to ``device``."""
        for name in ("train", "bank", "mean", "precision"):
            if hasattr(self, name):
                setattr(self, name, getattr(self, name).to(device))
        return self

    def scores(self, z: torch.Tensor) -> Dict[str, np.ndarray]:
        """Every field for z (M, D). Outputs are allocated before the chunk loops, which then keep
        nothing alive between chunks: with the entry scripts' allocator setting (utils/runtime.py),
        a small block kept per chunk between large transient ones fragments the heap (measured:
        6.9 GiB peak instead of 1.9 for 50,000 x 70,000 vectors, bench/bench_scale.py)."""
        out = {}
        if "knn" in self.names:
            out.update(self._knn(z))
        if "mahalanobis" in self.names:
            chunk = max(1, CHUNK_ELEMENTS // (4 * z.shape[1]))
            maha = torch.empty(len(z), dtype=torch.float64)
            for i in range(0, len(z), chunk):
                d = z[i:i + chunk].double() - self.mean  # (c, D)
                maha[i:i + chunk] = ((d @ self.precision) * d).sum(dim=1).cpu()
            out["Mahalanobis"] = maha.numpy()
        return out

    def _knn(self, z: torch.Tensor) -> Dict[str, np.ndarray]:
        """Candidates ranked by float32 cosine similarity (one matmul per chunk), then their distances
        recomputed in float64: 2 - 2 cos in float32 would put near-duplicates ~5e-4 apart instead of 0."""
        kmax, (n, dim) = max(self.ks), self.bank.shape
        chunk = max(1, min(CHUNK_ELEMENTS // n, CHUNK_ELEMENTS // (kmax * dim)))
        kth = {k: torch.empty(len(z), dtype=torch.float64) for k in self.ks}
        for i in range(0, len(z), chunk):
            qc = F.normalize(z[i:i + chunk].double(), dim=1)  # (c, D)
            top = (qc.float() @ self.bank.T).topk(kmax, dim=1).indices  # (c, kmax) nearest by similarity
            near = F.normalize(self.train[top].double(), dim=2)  # (c, kmax, D)
            dist = (near - qc[:, None, :]).norm(dim=2).sort(dim=1).values  # (c, kmax), ascending
            for k in self.ks:
                kth[k][i:i + chunk] = dist[:, k - 1].cpu()
        return {f"kNN_k{k}": v.numpy() for k, v in kth.items()}
