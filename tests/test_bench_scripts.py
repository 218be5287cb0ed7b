"""The bench scripts' own logic, where a wrong line would put a wrong number in a published table:
the one-class split and its outputs (bench/oneclass.py), and the aggregation over seeds of the
near/far benchmark (bench/benchmark.py)."""
import csv
import json
import os
import sys

import numpy as np
import pytest

from errors import UserError
from sklearn.metrics import roc_auc_score

from tests.helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import benchmark  # noqa: E402
import oneclass  # noqa: E402


def test_oneclass_split_takes_all_training_images_of_the_class_and_marks_its_test_images():
    train = np.array([3, 1, 3, 0, 3, 2])
    test = np.array([0, 3, 3, 1, 2, 3, 3])
    idx, id_mask = oneclass.oneclass_split(train, test, 3)
    assert idx.tolist() == [0, 2, 4]
    assert id_mask.tolist() == [False, True, True, False, False, True, True]


def test_oneclass_auroc_is_ood_positive_in_percent():
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.2])
    id_mask = np.array([True, True, False, False, True])
    expected = 100 * roc_auc_score(~id_mask, scores)
    assert oneclass.auroc_percent(scores, id_mask) == pytest.approx(expected)
    assert oneclass.auroc_percent(-scores, id_mask) == pytest.approx(100 - expected)


def test_oneclass_outputs_hold_every_class_and_method_and_the_mean(tmp_path):
    per_class = {6: dict(zip(oneclass.METHODS, [80.0, 81.0, 84.0, 83.0, 79.0])),
                 8: dict(zip(oneclass.METHODS, [96.0, 97.0, 98.0, 98.5, 95.0]))}
    result = oneclass.table(per_class)
    oneclass.write_outputs(result, str(tmp_path))
    saved = json.loads((tmp_path / "oneclass.json").read_text())
    assert set(saved["classes"]) == {"6", "8"}
    assert saved["classes"]["8"]["kNN_k2"] == 98.5
    assert saved["mean"] == {"MFsim": 88.0, "MSE": 89.0, "kNN_k1": 91.0, "kNN_k2": 90.75, "Mahalanobis": 87.0}
    rows = list(csv.reader(open(tmp_path / "oneclass.csv")))
    assert rows[0] == ["class", *oneclass.METHODS] and rows[-1][0] == "mean" and float(rows[-1][4]) == 90.75
    md = (tmp_path / "oneclass.md").read_text()
    assert "| 6 Shirt |" in md and "| 8 Bag |" in md and "**88.00**" in md


def test_oneclass_classes_flag_is_checked():
    assert oneclass.parse_classes("8,6,6") == [6, 8]
    for bad in ("10", "a", ""):
        with pytest.raises(UserError, match="0..9"):
            oneclass.parse_classes(bad)


def test_benchmark_aggregates_each_cell_over_seeds_per_metric():
    seeds = [{"metrics": {"MFsim": {"shirt": {"AUROC": 0.6, "FPR95": 0.9}, "mean": {"AUROC": 0.8, "FPR95": 0.5},
                                    "gone": None}}},
             {"metrics": {"MFsim": {"shirt": {"AUROC": 0.7, "FPR95": 0.7}, "mean": {"AUROC": 0.9, "FPR95": 0.3},
                                    "gone": None}}}]
    table = benchmark.collect(seeds)
    assert table["MFsim"]["shirt"]["AUROC"] == pytest.approx([60.0, 70.0])
    assert table["MFsim"]["mean"]["FPR95"] == pytest.approx([50.0, 30.0])
    assert "gone" not in table["MFsim"]  # a missing set is not a zero
    assert benchmark.cell(table["MFsim"]["shirt"]["AUROC"]) == "65.00 ± 5.00"  # population std over seeds
    md = benchmark.markdown(table, ["MFsim"], [], [0, 1])
    assert "| shirt | 65.00 ± 5.00 | 80.00 ± 10.00 |" in md and "| **mean** | 85.00 ± 5.00 | 40.00 ± 10.00 |" in md
