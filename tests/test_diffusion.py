"""models/diffusion.py: the noise schedule, noising, the x0 loss and the partial DDIM reconstruction, by hand."""
import math

import numpy as np
import pytest
import torch

from models.diffusion import GaussianDiffusion


def reference_release_ddim(net, z0, k, eta, seed):
    """docs/METHOD.md §5 evaluated literally, with an independently computed schedule; z drawn at every step."""
    betas = np.linspace(math.sqrt(0.0015), math.sqrt(0.0195), 100) ** 2
    abar = np.cumprod(1 - betas)
    g = torch.Generator().manual_seed(seed)
    x = math.sqrt(abar[k]) * z0 + math.sqrt(1 - abar[k]) * torch.randn(z0.shape, generator=g, dtype=z0.dtype)
    for i in reversed(range(k)):
        s = i + 1
        x0_hat = net(x, torch.full((z0.shape[0],), s))
        eps = (x / math.sqrt(abar[s]) - x0_hat) / math.sqrt(1 / abar[s] - 1)
        a, a_prev = abar[i], (abar[i - 1] if i > 0 else abar[0])
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        pred = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        z = torch.randn(z0.shape, generator=g, dtype=z0.dtype)
        x = math.sqrt(a_prev) * pred + math.sqrt(1 - a_prev - sigma ** 2) * eps + sigma * z
    return x


def test_schedule_values_from_the_reference():
    abar = GaussianDiffusion().alphas_cumprod
    assert abar.dtype == torch.float64 and abar.shape == (100,)
    assert abar[0].item() == pytest.approx(0.9985, abs=1e-12)
    assert abar[3].item() == pytest.approx(0.99352747, abs=1e-8)
    assert abar[99].item() == pytest.approx(0.41175, abs=5e-6)
    assert math.sqrt(1 - abar[3].item()) == pytest.approx(0.0805, abs=1e-4)  # k = 3 start noise std


def test_q_sample_and_x0_loss():
    diff = GaussianDiffusion()
    x0, noise = torch.randn(4, 6), torch.randn(4, 6)
    t = torch.tensor([0, 3, 50, 99])
    abar = diff.alphas_cumprod
    expected = torch.stack([math.sqrt(abar[i]) * x0[j] + math.sqrt(1 - abar[i]) * noise[j] for j, i in enumerate(t.tolist())])
    assert torch.allclose(diff.q_sample(x0, t, noise), expected, atol=1e-6)
    assert diff.training_loss(lambda x, tt: x0, x0, t, noise).item() == 0.0
    assert diff.training_loss(lambda x, tt: torch.zeros_like(x), x0, t, noise).item() == pytest.approx(x0.pow(2).mean().item())


@pytest.mark.parametrize("k,eta", [(3, 1.0), (1, 1.0), (10, 1.0), (3, 0.0), (3, 0.5)])
@pytest.mark.parametrize("net_kind", ["zero", "affine"])
def test_reconstruction_matches_reference_formulas(k, eta, net_kind):
    z0 = torch.randn(7, 20, dtype=torch.float64)
    if net_kind == "zero":
        def net(x, t):
            return torch.zeros_like(x)
    else:
        def net(x, t):
            return 0.7 * x + 0.01 * t[:, None].to(x.dtype)
    ours = GaussianDiffusion().reconstruct(net, z0, k, eta, torch.Generator().manual_seed(5))
    ref = reference_release_ddim(net, z0, k, eta, seed=5)
    assert torch.allclose(ours, ref, atol=1e-12, rtol=1e-10)


def test_release_last_step_is_identity_so_the_network_is_called_k_minus_1_times():
    calls = []

    def net(x, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    GaussianDiffusion().reconstruct(net, torch.randn(2, 4), 3, 1.0, torch.Generator().manual_seed(0))
    assert calls == [3, 2]


def test_consistent_indexing_returns_the_last_x0_prediction():
    target = torch.randn(3, 5)
    out = GaussianDiffusion().reconstruct(lambda x, t: target, torch.randn(3, 5), 3, 1.0,
                                          torch.Generator().manual_seed(0), indexing="consistent")
    assert torch.allclose(out, target, atol=1e-5)


def test_reconstruction_is_reproducible_and_works_for_any_shape():
    diff, z0 = GaussianDiffusion(), torch.randn(2, 3, 4)

    def net(x, t):
        return 0.5 * x

    a = diff.reconstruct(net, z0, 3, 1.0, torch.Generator().manual_seed(1))
    b = diff.reconstruct(net, z0, 3, 1.0, torch.Generator().manual_seed(1))
    c = diff.reconstruct(net, z0, 3, 1.0, torch.Generator().manual_seed(2))
    assert a.shape == z0.shape and torch.equal(a, b) and not torch.equal(a, c)


def test_an_unknown_indexing_a_step_count_off_the_grid_and_noise_of_another_shape_are_value_errors():
    d = GaussianDiffusion(timesteps=100)
    net = lambda z, t: z  # noqa: E731
    x0 = torch.randn(2, 6)
    with pytest.raises(ValueError, match="indexing must be one of"):
        d.reconstruct(net, x0, 3, indexing="other")
    with pytest.raises(ValueError, match=r"steps must be in 1..99, got 100"):
        d.reconstruct(net, x0, 100, indexing="release")
    with pytest.raises(ValueError, match=r"steps must be in 1..100, got 0"):
        d.reconstruct(net, x0, 0, indexing="consistent")
    d.reconstruct(net, x0, 99, indexing="release")
    d.reconstruct(net, x0, 100, indexing="consistent")
    draws = d.noise_draws(3, 1.0, "release")
    d.reconstruct(net, x0, 3, noise=torch.zeros(draws, 2, 6))
    with pytest.raises(ValueError, match=rf"noise must have shape \({draws}, 2, 6\)"):
        d.reconstruct(net, x0, 3, noise=torch.zeros(draws + 1, 2, 6))
