"""Scores and metrics with answers checkable by hand (docs/METHOD.md §6-§7): perfect reconstructions,
MSE as a sum, MFsim's layers, LR, perfect and inverted separation, both FPR95 conventions, AUPR-In
and AUPR-Out, refused inputs."""
import numpy as np
import pytest
import torch

from utils.metrics import fpr_at_95, ood_metrics
from utils.scores import likelihood_regret, mfsim_score, mse_score

INDICES = [24, 56, 112, 272, 720]


def test_perfect_reconstruction():
    z = torch.randn(5, 720)
    assert torch.equal(mse_score(z, z), torch.zeros(5))
    assert torch.allclose(mfsim_score(z, z, INDICES), -torch.ones(5))
    assert torch.allclose(mfsim_score(z, z, INDICES, all_layers=True), -torch.ones(5))


def test_mse_is_a_sum_over_dims():
    rec, orig = torch.zeros(2, 4), torch.tensor([[1.0, 2, 0, 0], [0, 0, 0, 3]])
    assert mse_score(rec, orig).tolist() == [5.0, 9.0]


def test_mfsim_release_skips_the_first_layer_and_divides_by_l_minus_1():
    z = torch.randn(3, 720)
    rec = z.clone()
    rec[:, :24] = -z[:, :24]  # only layer 0 is wrong (cosine -1 there)
    assert torch.allclose(mfsim_score(rec, z, INDICES), -torch.ones(3))
    assert torch.allclose(mfsim_score(rec, z, INDICES, all_layers=True), torch.full((3,), -(4 - 1) / 5))
    rec = z.clone()
    rec[:, 272:] = -z[:, 272:]  # the last layer flipped: (1 + 1 + 1 - 1) / 4 averaged, negated
    assert torch.allclose(mfsim_score(rec, z, INDICES), torch.full((3,), -0.5))


def test_likelihood_regret():
    assert likelihood_regret(np.array([3.0, 1.0]), np.array([1.0, 2.0])).tolist() == [2.0, -1.0]
    with pytest.raises(ValueError):
        likelihood_regret(np.zeros(2), np.zeros(3))


def test_perfect_and_inverted_separation():
    id_s, ood_s = np.linspace(0, 1, 100), np.linspace(2, 3, 50)
    m = ood_metrics(id_s, ood_s)
    assert m == {"AUROC": 1.0, "FPR95": 0.0, "AUPR_In": 1.0, "AUPR_Out": 1.0}
    assert ood_metrics(id_s, ood_s, fpr95="ood_positive")["FPR95"] == 0.0
    inv = ood_metrics(ood_s, id_s)
    assert inv["AUROC"] == 0.0 and inv["FPR95"] == 1.0


def test_fpr95_release_convention_by_hand():
    id_s = np.arange(1, 101, dtype=float)           # 95th percentile (linear) = 95.05
    ood_s = np.array([10.0, 95.0, 95.1, 200.0])     # below 95.05: 10 and 95 -> 2 of 4
    assert fpr_at_95(id_s, ood_s) == 0.5


def test_fpr95_ood_positive_convention_by_hand():
    # 20 OOD scores 1..20; to flag 95% (19) of them the threshold is 2; ID scores >= 2: 3 of 10.
    ood_s = np.arange(1, 21, dtype=float)
    id_s = np.array([-5, -4, -3, -2, -1, 0, 0.5, 2, 5, 30], dtype=float)
    assert fpr_at_95(id_s, ood_s, "ood_positive") == pytest.approx(0.3)


def test_aupr_in_and_out_are_the_two_positive_classes():
    id_s, ood_s = np.array([0.0, 1.0, 3.0]), np.array([2.0, 4.0])
    m = ood_metrics(id_s, ood_s)
    # OOD positive, ranked by score: 4 (OOD), 3 (ID), 2 (OOD) -> AP = (1/1 + 2/3) / 2
    assert m["AUPR_Out"] == pytest.approx((1 + 2 / 3) / 2)
    # ID positive, ranked by -score: 0, 1 (ID), 2 (OOD), 3 (ID) -> AP = (1 + 1 + 3/4) / 3
    assert m["AUPR_In"] == pytest.approx((1 + 1 + 3 / 4) / 3)
    assert m["AUROC"] == pytest.approx(5 / 6)


@pytest.mark.parametrize("id_s,ood_s,msg", [
    ([], [1.0], "empty"), ([1.0], [], "empty"), ([1.0, np.nan], [2.0], "NaN"), ([1.0], [np.inf], "NaN"),
])
def test_bad_input_is_refused(id_s, ood_s, msg):
    with pytest.raises(ValueError, match=msg):
        ood_metrics(id_s, ood_s)


def test_unknown_fpr_convention():
    with pytest.raises(ValueError, match="convention"):
        fpr_at_95([1.0], [2.0], "openood")
