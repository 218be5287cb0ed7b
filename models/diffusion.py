"""All of the diffusion math: schedule, noising, x0 loss, partial DDIM reconstruction (docs/METHOD.md §4-5).

The network is passed in as an argument and only ever sees ``(x, t)``. Everything here works
for any tensor shape ``(B, ...)``; time coefficients are broadcast over the trailing dims.
"""
import math
from typing import Callable, Optional

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

INDEXING = ("release", "consistent")


def largest_k(timesteps: int, indexing: str) -> int:
    """The most steps (k, diffusion.subset_timesteps_num) a reconstruction may take: T - 1 with the
    release's indexing (it noises to abar[k], one past the k steps it runs), T otherwise."""
    return timesteps - 1 if indexing == "release" else timesteps


class GaussianDiffusion:
    """The "linear" schedule of latent-diffusion: betas = linspace(sqrt(b0), sqrt(b1), T) ** 2, float64."""

    def __init__(self, timesteps: int = 100, linear_start: float = 0.0015, linear_end: float = 0.0195):
        self.timesteps = timesteps
        self.linear_start = linear_start
        self.linear_end = linear_end
        self.betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # abar, (T,)
        self._on_device = {}  # device -> (sqrt(abar), sqrt(1 - abar)) there: no copy per training step

    def _coef(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] reshaped to (B, 1, ..., 1) to broadcast against ``like`` (B, ...)."""
        out = values.to(like.device)[t].to(like.dtype)
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t]) noise. x0, noise: (B, ...), t: (B,) long."""
        if x0.device not in self._on_device:
            abar = self.alphas_cumprod
            self._on_device[x0.device] = (abar.sqrt().to(x0.device), (1 - abar).sqrt().to(x0.device))
        keep, mix = self._on_device[x0.device]
        return self._coef(keep, t, x0) * x0 + self._coef(mix, t, x0) * noise

    def training_loss(self, model: Denoiser, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Mean over batch and dims of (model(z_t, t) - x0)^2: the network predicts x0."""
        pred = model(self.q_sample(x0, t, noise), t)  # (B, ...)
        return (pred.float() - x0.float()).pow(2).mean()

    def _plan(self, steps: int, indexing: str):
        """(start index, [(network timestep s, a, a_prev), ...]) of the partial DDIM run (docs/METHOD.md §5)."""
        if indexing not in INDEXING:
            raise ValueError(f"indexing must be one of {INDEXING}, got {indexing!r}")
        top = largest_k(self.timesteps, indexing)
        if not 1 <= steps <= top:
            raise ValueError(f"steps must be in 1..{top}, got {steps}")
        abar = self.alphas_cumprod.tolist()
        if indexing == "release":
            return steps, [(i + 1, abar[i], abar[i - 1] if i > 0 else abar[0]) for i in reversed(range(steps))]
        return steps - 1, [(s, abar[s], abar[s - 1] if s > 0 else 1.0) for s in reversed(range(steps))]

    @staticmethod
    def _sigma(eta: float, a: float, a_prev: float) -> float:
        return eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))

    def noise_draws(self, steps: int = 3, eta: float = 1.0, indexing: str = "release") -> int:
        """How many noise tensors ``reconstruct`` draws: the start, then one per step with sigma > 0."""
        _, plan = self._plan(steps, indexing)
        return 1 + sum(1 for _, a, a_prev in plan if a_prev != a and self._sigma(eta, a, a_prev) > 0)

    @torch.no_grad()
    def reconstruct(self, model: Denoiser, x0: torch.Tensor, steps: int = 3, eta: float = 1.0,
                    generator: Optional[torch.Generator] = None, indexing: str = "release",
                    noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Noise ``x0`` lightly and denoise it with the first ``steps`` DDIM steps of a 1-step grid.

        x0: (B, ...) -> reconstruction (B, ...). Random draws, in order: the starting noise, then
        one ``z`` per step whose sigma is non-zero; taken from ``noise`` ((noise_draws(...), B, ...),
        e.g. drawn per image) when given, else from ``generator``.

        indexing="release" (default) reproduces the authors' code, off-by-one included: noising
        and the network use abar[s] with s = i + 1, the DDIM coefficients abar[i] and abar[i-1]
        (abar[0] for i = 0), and the result is the final x. Its last step (i = 0) has
        a = a_prev and sigma = 0, which makes the update x <- x exactly whatever the network
        says, so that network call is not made.

        indexing="consistent" uses one abar for everything: start at abar[steps - 1], step
        s = steps-1 .. 0 with a = abar[s], a_prev = abar[s-1] (1.0 at s = 0), so the last step
        returns the network's x0 prediction.
        """
        start, plan = self._plan(steps, indexing)
        abar = self.alphas_cumprod.tolist()
        if noise is not None and tuple(noise.shape) != (self.noise_draws(steps, eta, indexing), *x0.shape):
            raise ValueError(f"noise must have shape {(self.noise_draws(steps, eta, indexing), *x0.shape)}, "
                             f"got {tuple(noise.shape)}")
        draws = iter(noise.to(device=x0.device, dtype=x0.dtype)) if noise is not None else None

        def randn() -> torch.Tensor:
            if draws is not None:
                return next(draws)
            return torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)

        x = math.sqrt(abar[start]) * x0 + math.sqrt(1 - abar[start]) * randn()  # (B, ...)
        for s, a, a_prev in plan:
            if a_prev == a:
                continue
            x0_hat = model(x, torch.full((x.shape[0],), s, dtype=torch.long, device=x.device)).to(x.dtype)
            eps_hat = (x / math.sqrt(abar[s]) - x0_hat) / math.sqrt(1 / abar[s] - 1)
            sigma = self._sigma(eta, a, a_prev)
            pred = (x - math.sqrt(1 - a) * eps_hat) / math.sqrt(a)
            # DDIM's update, Eq. 12 of Song et al. (ICLR 2021); sigma is their Eq. 16 times eta (docs/METHOD.md §5)
            x = math.sqrt(a_prev) * pred + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps_hat
            if sigma > 0:
                x = x + sigma * randn()
        return x
