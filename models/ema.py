"""Exponential moving average of the LFDN weights, with latent-diffusion's warm-up rule (docs/METHOD.md §4)."""
import copy

import torch
from torch import nn


class EMA:
    """ema <- ema - (1 - d)(ema - w), d = min(decay, (1 + n) / (10 + n)), n counting updates from 1."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        # lerp(ema, w, 1 - d) = ema + (1 - d)(w - ema), the same update written as one fused op.
        torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), 1.0 - decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "weights": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.module.load_state_dict(state["weights"])
