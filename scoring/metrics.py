"""OOD metrics from saved score arrays (docs/METHOD.md §7; higher score = more OOD; OOD is the positive
class for AUROC).

FPR95 comes in two conventions:
- "release" (default, what the authors print): threshold = 95th percentile of the ID scores
  (linear interpolation); FPR95 = fraction of OOD scores below it, i.e. OOD accepted while 95% of
  ID is kept.
- "ood_positive" (OpenOOD v1.5, pytorch-ood): walk the ROC with OOD positive; FPR95 = fraction of
  ID flagged at the first threshold that catches 95% of OOD.
"""
from typing import Dict

import numpy as np

FPR95_CONVENTIONS = ("release", "ood_positive")


def _check(name: str, scores) -> np.ndarray:
    a = np.asarray(scores, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{name} scores are empty: both ID and OOD scores are needed")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} scores contain {np.count_nonzero(~np.isfinite(a))} NaN/inf values")
    return a


def fpr_at_95(id_scores, ood_scores, convention: str = "release") -> float:
    id_s, ood_s = _check("ID", id_scores), _check("OOD", ood_scores)
    if convention == "release":
        threshold = np.percentile(id_s, 95)
        return float(np.mean(ood_s < threshold))
    if convention == "ood_positive":
        from sklearn.metrics import roc_curve  # imported here: scikit-learn takes ~2 s to import

        labels = np.r_[np.zeros(id_s.size), np.ones(ood_s.size)]
        fpr, tpr, _ = roc_curve(labels, np.r_[id_s, ood_s])
        return float(fpr[np.argmax(tpr >= 0.95)])
    raise ValueError(f"FPR95 convention must be one of {FPR95_CONVENTIONS}, got {convention!r}")


OPENOOD_COLUMNS = ("FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT")


def openood_metrics(id_scores, ood_scores) -> Dict[str, float]:
    """The metrics as OpenOOD v1.5's evaluator defines them, each in [0, 1] (docs/METHOD.md §7):
    FPR@95 with OOD positive (the "ood_positive" convention), AUROC, and AUPR_IN / AUPR_OUT as the
    trapezoidal area under the precision-recall curve with ID / OOD positive (not the average
    precision of ``ood_metrics``, which differs slightly)."""
    from sklearn.metrics import auc, precision_recall_curve, roc_auc_score  # here: ~2 s to import

    id_s, ood_s = _check("ID", id_scores), _check("OOD", ood_scores)
    ood = np.r_[np.zeros(id_s.size), np.ones(ood_s.size)]
    scores = np.r_[id_s, ood_s]
    p_in, r_in, _ = precision_recall_curve(1 - ood, -scores)
    p_out, r_out, _ = precision_recall_curve(ood, scores)
    return {"FPR@95": fpr_at_95(id_s, ood_s, "ood_positive"), "AUROC": float(roc_auc_score(ood, scores)),
            "AUPR_IN": float(auc(r_in, p_in)), "AUPR_OUT": float(auc(r_out, p_out))}


def ood_metrics(id_scores, ood_scores, fpr95: str = "release") -> Dict[str, float]:
    """AUROC, FPR95, AUPR-In (ID positive), AUPR-Out (OOD positive), each in [0, 1]."""
    from sklearn.metrics import average_precision_score, roc_auc_score  # here: scikit-learn takes ~2 s to import

    id_s, ood_s = _check("ID", id_scores), _check("OOD", ood_scores)
    labels = np.r_[np.zeros(id_s.size), np.ones(ood_s.size)]
    scores = np.r_[id_s, ood_s]
    return {
        "AUROC": float(roc_auc_score(labels, scores)),
        "FPR95": fpr_at_95(id_s, ood_s, fpr95),
        "AUPR_In": float(average_precision_score(1 - labels, -scores)),
        "AUPR_Out": float(average_precision_score(labels, scores)),
    }
