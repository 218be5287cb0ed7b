"""scoring/baselines.py: kNN and Mahalanobis on the same features, against brute-force computations."""
import numpy as np
import pytest
import torch

from dlsr.detector import MahalanobisDetector
from scoring.baselines import Baselines
from tests.helpers import brute_knn


def brute_mahalanobis(train, test):
    from sklearn.covariance import LedoitWolf
    lw = LedoitWolf().fit(train)
    diff = test - train.mean(0)
    return np.einsum("ij,jk,ik->i", diff, np.linalg.inv(lw.covariance_), diff)


def test_knn_and_mahalanobis_equal_a_brute_force_numpy_computation(monkeypatch):
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(300, 12)), rng.normal(size=(70, 12)) * 1.5
    monkeypatch.setattr("scoring.baselines.CHUNK_ELEMENTS", 300 * 16)  # several chunks of 16 test rows
    got = Baselines(torch.tensor(train, dtype=torch.float32), ["knn", "mahalanobis"], [1, 5, 50]).scores(
        torch.tensor(test, dtype=torch.float32))
    for k in (1, 5, 50):
        assert np.allclose(got[f"kNN_k{k}"], brute_knn(train, test, k), atol=1e-5)
    assert np.allclose(got["Mahalanobis"], brute_mahalanobis(train, test), rtol=1e-4)
    assert not np.allclose(got["kNN_k1"], got["kNN_k50"])


def test_knn_needs_k_training_features():
    with pytest.raises(ValueError, match="k = 50"):
        Baselines(torch.randn(10, 4), ["knn"], [1, 50])


def test_knn_distances_are_exact_float64_for_every_candidate():
    from scoring.baselines import Baselines
    rng = np.random.default_rng(1)
    train = torch.from_numpy(rng.normal(size=(300, 64)).astype(np.float32))
    test = torch.cat([train[:5], torch.from_numpy(rng.normal(size=(20, 64)).astype(np.float32))])
    got = Baselines(train, ["knn"], [1, 3]).scores(test)
    a = train.double() / train.double().norm(dim=1, keepdim=True)
    b = test.double() / test.double().norm(dim=1, keepdim=True)
    dist = torch.cdist(b, a, compute_mode="donot_use_mm_for_euclid_dist").sort(dim=1).values  # float64 brute force
    assert np.allclose(got["kNN_k1"], dist[:, 0].numpy(), atol=1e-9, rtol=0)
    assert np.allclose(got["kNN_k3"], dist[:, 2].numpy(), atol=1e-9, rtol=0)
    assert np.all(got["kNN_k1"][:5] == 0.0)  # exact duplicates of training vectors


def test_mahalanobis_refuses_too_few_vectors(trained):
    m = MahalanobisDetector(trained.config, device="cpu")
    for n in (1, 2):
        with pytest.raises(ValueError, match="at least 3 training features"):
            m.fit_features(torch.randn(n, 512))
    m.fit_features(torch.randn(3, 512))
    assert len(set(m.predict_features(torch.randn(4, 512)).tolist())) == 4


def test_moving_the_baselines_moves_every_fitted_tensor():
    b = Baselines(torch.randn(20, 6), ["knn", "mahalanobis"], [1, 3])
    fitted = [n for n in ("train", "bank", "mean", "precision") if hasattr(b, n)]
    assert "bank" in fitted and "mean" in fitted and "precision" in fitted
    assert b.to(torch.device("meta")) is b
    assert all(getattr(b, n).is_meta for n in fitted)
