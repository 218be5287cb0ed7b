"""scoring/metrics.py: AUROC, FPR95 (both conventions), AUPR, with answers checkable by hand."""
import numpy as np
import pytest

from scoring.metrics import fpr_at_95, ood_metrics


def test_fpr95_at_ties():
    id_s = np.zeros(100)
    assert fpr_at_95(id_s, np.zeros(10), "release") == 0.0  # equal to the threshold is not below it
    assert fpr_at_95(id_s, np.r_[np.zeros(5), -np.ones(5)], "release") == 0.5
    # OOD positive: the first threshold catching 95% of a tied OOD set flags every tied ID image too
    assert fpr_at_95(np.r_[np.zeros(50), -np.ones(50)], np.zeros(10), "ood_positive") == 0.5


def test_fpr95_ood_positive_takes_the_first_threshold_that_reaches_95_percent():
    from scoring.metrics import fpr_at_95
    ids = np.arange(10.0)                           # ID scores 0..9
    ood = np.r_[np.arange(100.0, 119.0), 5.5]       # 19 of 20 OOD above every ID score: TPR 0.95 at FPR 0
    assert fpr_at_95(ids, ood, "ood_positive") == 0.0
    ood = np.r_[np.arange(100.0, 118.0), 5.5, 7.5]  # 18 high (TPR 0.90), 7.5 makes 0.95 with 8, 9 above: FPR 0.2
    assert fpr_at_95(ids, ood, "ood_positive") == pytest.approx(0.2)


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
