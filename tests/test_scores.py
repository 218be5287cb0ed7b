"""scoring/scores.py: the score registry and each score by hand."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from scoring.scores import layer_slices, likelihood_regret, mfsim_score, mse_score

INDICES = layer_slices([24, 56, 112, 272, 720])
ALL = SimpleNamespace(mfsim_layers="all")


def test_perfect_reconstruction():
    z = torch.randn(5, 720)
    assert torch.equal(mse_score(z, z), torch.zeros(5))
    assert torch.allclose(mfsim_score(z, z, INDICES), -torch.ones(5))
    assert torch.allclose(mfsim_score(z, z, INDICES, ALL), -torch.ones(5))


def test_mse_is_a_sum_over_dims():
    rec, orig = torch.zeros(2, 4), torch.tensor([[1.0, 2, 0, 0], [0, 0, 0, 3]])
    assert mse_score(rec, orig).tolist() == [5.0, 9.0]


def test_mfsim_release_skips_the_first_layer_and_divides_by_l_minus_1():
    z = torch.randn(3, 720)
    rec = z.clone()
    rec[:, :24] = -z[:, :24]  # only layer 0 is wrong (cosine -1 there)
    assert torch.allclose(mfsim_score(rec, z, INDICES), -torch.ones(3))
    assert torch.allclose(mfsim_score(rec, z, INDICES, ALL), torch.full((3,), -(4 - 1) / 5))
    rec = z.clone()
    rec[:, 272:] = -z[:, 272:]  # the last layer flipped: (1 + 1 + 1 - 1) / 4 averaged, negated
    assert torch.allclose(mfsim_score(rec, z, INDICES), torch.full((3,), -0.5))


def test_likelihood_regret():
    assert likelihood_regret(np.array([3.0, 1.0]), np.array([1.0, 2.0])).tolist() == [2.0, -1.0]
    with pytest.raises(ValueError):
        likelihood_regret(np.zeros(2), np.zeros(3))


def test_every_score_gets_the_reconstruction_first_and_the_original_second(monkeypatch):
    """MSE and cosine are symmetric; a registered score need not be (its arguments in their order)."""
    import scoring.scores as scores
    signed = lambda rec, orig, layers=(), options=None: (rec - orig).sum(-1)  # noqa: E731
    monkeypatch.setitem(scores.SCORES, "signed", signed)
    rec, orig = torch.full((2, 720), 3.0), torch.ones(2, 720)
    assert torch.equal(scores.all_scores(rec, orig, INDICES)["signed"], torch.full((2,), 2.0 * 720))
    per_layer = scores.layer_errors(rec, orig, INDICES)["signed"]  # (B, L): 2 x each layer's width
    widths = torch.tensor([hi - lo for lo, hi in INDICES], dtype=torch.float64)
    assert torch.equal(per_layer, 2 * widths.expand(2, -1))


def test_a_score_name_is_registered_once():
    from scoring.scores import SCORES, score
    before = dict(SCORES)
    with pytest.raises(ValueError, match="score 'MSE' is registered twice"):
        score("MSE")(lambda rec, orig, layers, cfg: rec.sum(-1))
    assert SCORES == before
