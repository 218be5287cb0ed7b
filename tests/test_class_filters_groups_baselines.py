"""Class filters, near/far group means, and the same-feature baselines (kNN, Mahalanobis)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import build_dataset
from tests.helpers import run_inprocess
from utils.baselines import Baselines
from errors import UserError
from utils.report import summary_rows


# ------------------------------------------------------------------ class filters

def test_class_filters_select_by_index_range_list_and_name(tmp_path):
    from sklearn.datasets import load_digits
    target = load_digits().target
    for spec, classes in (("digits@3", [3]), ("digits@0-4", [0, 1, 2, 3, 4]), ("digits@0,1,8", [0, 1, 8])):
        ds = build_dataset(spec, "test", str(tmp_path), 16)
        expected = np.flatnonzero(np.isin(target, classes))
        assert len(ds) == len(expected) and sorted(set(ds.labels.tolist())) == classes
        assert np.array_equal(ds[0].numpy(), build_dataset("digits", "test", str(tmp_path), 16)[int(expected[0])].numpy())
        assert ds.name == spec
    a, b = build_dataset("digits@3", "test", str(tmp_path), 16), build_dataset("digits@4", "test", str(tmp_path), 16)
    assert a.identity() != b.identity()  # so their cached features can never be mixed up
    for cls in ("cat", "dog"):
        for i in range(2 if cls == "cat" else 3):
            os.makedirs(tmp_path / "pets" / cls, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / "pets" / cls / f"{i}.png")
    assert len(build_dataset("folder:pets@dog", "test", str(tmp_path), 16)) == 3
    assert len(build_dataset("folder:pets@cat,dog", "test", str(tmp_path), 16)) == 5


@pytest.mark.parametrize("spec,message", [
    ("digits@10", "unknown class '10'; the classes are 0=0, 1=1"),
    ("digits@4-2", "unknown class '4-2'"),
    ("folder:pets@bird", "unknown class 'bird'; the classes are 0=cat, 1=dog"),
    ("photos@1", "photos has no classes"),
])
def test_a_bad_class_list_is_one_line_naming_the_valid_classes(tmp_path, spec, message):
    for cls in ("cat", "dog"):
        os.makedirs(tmp_path / "pets" / cls)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "pets" / cls / "0.png")
    with pytest.raises(UserError) as e:
        build_dataset(spec, "test", str(tmp_path), 16)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_fashion_mnist_classes_when_the_data_is_there():
    try:
        shirt = build_dataset("fashion-mnist@6", "test", "./data", 16, download=False)
    except UserError:
        pytest.skip("Fashion-MNIST is not installed here")
    assert len(shirt) == 1000 and shirt.classes[6] == "Shirt"
    assert len(build_dataset("fashion-mnist@Shirt", "test", "./data", 16, download=False)) == 1000


# ------------------------------------------------------------------ group means

def test_group_means_by_hand():
    rows = {"a": {"AUROC": 0.6, "FPR95": 0.9, "AUPR_In": 0.5, "AUPR_Out": 0.4},
            "b": {"AUROC": 1.0, "FPR95": 0.0, "AUPR_In": 1.0, "AUPR_Out": 1.0},
            "c": {"AUROC": 0.8, "FPR95": 0.2, "AUPR_In": 0.7, "AUPR_Out": 0.6},
            "d": None}
    got = dict(summary_rows(rows, {"a": "near", "b": "far", "c": "far", "d": "far"}))
    assert list(got) == ["near mean", "far mean", "mean"]
    assert got["near mean"]["AUROC"] == pytest.approx(0.6)
    assert got["far mean"]["AUROC"] == pytest.approx(0.9) and got["far mean"]["FPR95"] == pytest.approx(0.1)
    assert got["mean"]["AUROC"] == pytest.approx(0.8)
    assert list(dict(summary_rows(rows, {}))) == ["mean"]


# ------------------------------------------------------------------ baselines against brute force

def brute_knn(train, test, k):
    tr = train / np.linalg.norm(train, axis=1, keepdims=True)
    te = test / np.linalg.norm(test, axis=1, keepdims=True)
    d = np.sqrt(((te[:, None, :] - tr[None, :, :]) ** 2).sum(-1))  # (M, N) Euclidean
    return np.sort(d, axis=1)[:, k - 1]


def brute_mahalanobis(train, test):
    from sklearn.covariance import LedoitWolf
    lw = LedoitWolf().fit(train)
    diff = test - train.mean(0)
    return np.einsum("ij,jk,ik->i", diff, np.linalg.inv(lw.covariance_), diff)


def test_knn_and_mahalanobis_equal_a_brute_force_numpy_computation(monkeypatch):
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(300, 12)), rng.normal(size=(70, 12)) * 1.5
    monkeypatch.setattr("utils.baselines.CHUNK_ELEMENTS", 300 * 16)  # several chunks of 16 test rows
    got = Baselines(torch.tensor(train, dtype=torch.float32), ["knn", "mahalanobis"], [1, 5, 50]).scores(
        torch.tensor(test, dtype=torch.float32))
    for k in (1, 5, 50):
        assert np.allclose(got[f"kNN_k{k}"], brute_knn(train, test, k), atol=1e-5)
    assert np.allclose(got["Mahalanobis"], brute_mahalanobis(train, test), rtol=1e-4)
    assert not np.allclose(got["kNN_k1"], got["kNN_k50"])


def test_knn_needs_k_training_features():
    with pytest.raises(ValueError, match="k = 50"):
        Baselines(torch.randn(10, 4), ["knn"], [1, 50])


# ------------------------------------------------------------------ end to end

def test_baselines_and_groups_in_an_evaluation(trained, tmp_path):
    out = tmp_path / "b"
    run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                  "--pretrained_ldm_cfg", trained.config, "--output_dir", str(out), "--no_plots",
                  "--baselines", "knn,mahalanobis", "--knn_k", "1,7", "--ood", "three=digits@3",
                  "--ood", "gauss=noise:gaussian:200", "--group", "three=near", "--group", "gauss=far")
    md = (out / "results.md").read_text()
    assert "## kNN_k7  (baseline on the same features, not DLSR)" in md and "## Mahalanobis  (baseline" in md
    assert "| **near mean** |" in md and "| **far mean** |" in md
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["baselines"] == ["kNN_k1", "kNN_k7", "Mahalanobis"]
    for field in ("MFsim", "kNN_k7"):
        assert data["metrics"][field]["near mean"] == data["metrics"][field]["three"]
        assert data["metrics"][field]["far mean"] == data["metrics"][field]["gauss"]
    scores = np.load(out / "scores" / "three.npy")
    assert set(scores.dtype.names) == {"MFsim", "MSE", "kNN_k1", "kNN_k7", "Mahalanobis"}
    # The ID training features (digits, subset 256 in this config) come from the cache training wrote.
    from datasets import random_subset
    from utils.config import load_config
    from utils.distributed import DistContext
    from utils.evaluation import Scorer
    cfg = load_config(trained.config)
    scorer = Scorer.from_checkpoints(cfg, DistContext(0, 1, 0, torch.device("cpu")),
                                     {"end": str(trained.ckpt / "checkpoint-last.pth")})
    train = scorer.set_features(random_subset(build_dataset("digits", "train", cfg.data_path, 32), 256), split="train")
    assert train.from_cache
    z = scorer.set_features(build_dataset("digits@3", "test", cfg.data_path, 32)).z
    assert np.allclose(scores["kNN_k7"], brute_knn(train.z.double().numpy(), z.double().numpy(), 7), atol=1e-5)
