"""LFDN: the latent feature diffusion network, an MLP of residual blocks (docs/METHOD.md §3).

Parameter names follow the authors' release so that their state dict, with the
prefix ``model.diffusion_model.`` removed, loads with ``strict=True``.
"""
import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos half first. t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def group_norm(channels: int) -> nn.GroupNorm:
    # One group over a (B, C) vector: LayerNorm with per-channel affine, as the release.
    return nn.GroupNorm(1, channels)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """x + out(in(x) + emb(e)); the output Linear starts at zero, so each block starts as identity."""

    def __init__(self, channels: int, emb_channels: int, bottleneck_channels: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Linear(channels, bottleneck_channels))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, bottleneck_channels))
        self.out_layers = nn.Sequential(
            group_norm(bottleneck_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_init(nn.Linear(bottleneck_channels, channels)),
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)  # (B, bottleneck)
        return x + self.out_layers(h)  # (B, channels)


class LFDN(nn.Module):
    """Predicts the clean vector x0 from a noised one. forward(x (B, in), t (B,)) -> (B, out).

    The network sees only vectors and integer timesteps; the noise schedule lives in
    ``models.diffusion.GaussianDiffusion``.
    """

    def __init__(self, in_channels: int = 720, time_embed_dim: int = 720, model_channels: int = 1440,
                 bottleneck_channels: int = 1440, out_channels: int = 720, num_res_blocks: int = 16,
                 dropout: float = 0.0):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        # SiLU on the raw input vector before the projection is what the release does.
        self.input_proj = nn.Sequential(nn.SiLU(), nn.Linear(in_channels, model_channels))
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        self.res_blocks = nn.ModuleList(
            ResBlock(model_channels, time_embed_dim, bottleneck_channels, dropout) for _ in range(num_res_blocks)
        )
        self.out = nn.Sequential(group_norm(model_channels), nn.SiLU(),
                                 zero_init(nn.Linear(model_channels, out_channels)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.model_channels))  # (B, time_embed_dim)
        h = self.input_proj(x)  # (B, model_channels)
        for block in self.res_blocks:
            h = block(h, emb)
        return self.out(h)  # (B, out_channels)
