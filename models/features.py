"""Frozen multi-layer semantic features (docs/METHOD.md §2): the neck over any backbone of
``models/backbones/``.

An ImageNet backbone is tapped at the end of several stages; every map is resized to
stride 16 with bilinear ``align_corners=True`` (what the release's ``UpsamplingBilinear2d``
does), globally averaged, and the pooled vectors are concatenated. Per-layer
standardisation is a separate step (``standardize``) so that cached raw vectors can be reused.
"""
import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from errors import UserError
from models.backbones import backbone, load_used


def standardize(v: torch.Tensor, indices: Sequence[int], eps: float = 1e-5) -> torch.Tensor:
    """Per sample and per layer slice: (v - mean) / (unbiased std + eps). v: (..., D) -> (..., D)."""
    bounds = [0, *indices]
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        s = v[..., lo:hi]
        parts.append((s - s.mean(-1, keepdim=True)) / (s.std(-1, keepdim=True) + eps))
    return torch.cat(parts, dim=-1)


def weights_digest(state_dict: dict) -> str:
    """Short sha256 over names and bytes of every tensor: the backbone's identity for caches."""
    h = hashlib.sha256()
    for name, t in state_dict.items():
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class BackboneId:
    """What makes two runs' feature vectors the same: equal ids give equal vectors for equal images.
    Checkpoints store it (``record``), the feature cache is keyed by it, and a checkpoint is checked
    against the id of the backbone loaded now before it scores anything."""
    name: str
    weights: str                # digest of the weights the taps use (``weights_digest``)
    input_size: int             # images are resized to this many pixels a side
    feature_dim: int            # width of the vectors the LFDN sees
    layers: Tuple[int, ...]     # the taps those vectors are made of (0-based)
    indices: Tuple[int, ...]    # their slice ends in the vector

    @property
    def identity(self) -> str:
        """"name@digest": the backbone and its weights, whatever the input size or taps."""
        return f"{self.name}@{self.weights}"

    def record(self) -> dict:
        """The plain dict a checkpoint stores (``weights_only`` loading admits no classes)."""
        return {"name": self.name, "identity": self.identity, "input_size": self.input_size,
                "feature_dim": self.feature_dim, "indices": list(self.indices), "layers": list(self.layers)}


class MultiLayerFeatures(nn.Module):
    """Frozen backbone + neck. forward(x (B, 3, H, W), normalised) -> raw pooled vector (B, D).

    ``name``: a backbone of ``models.backbones`` (its adapter builds the network and knows its taps).
    ``weights``: a file path; ``"random"`` (seeded random init, for tests); or None to search the
    canonical file locally, then try the family's own source. ``state_dict``: backbone weights given
    directly (e.g. from a release checkpoint); wins over ``weights``.
    """

    def __init__(self, name: str, weights: Optional[str] = None, state_dict: Optional[dict] = None,
                 layers: Optional[Sequence[int]] = None):
        super().__init__()
        self.name = name
        self.spec = backbone(name)
        # The LFDN's vector may use some of the tapped layers (the paper's Fig. 5 ablation). The
        # backbone always computes, and the cache always stores, all of them: ``select`` picks.
        n_taps = len(self.spec.channels)
        self.layers = list(range(n_taps)) if layers is None else sorted(set(layers))
        if not self.layers or any(not 0 <= l < n_taps for l in self.layers):
            raise UserError(f"layers must be taps of {name} among 0..{n_taps - 1}, got {list(layers)}")
        bounds = [0, *self.spec.indices]
        self._columns = torch.cat([torch.arange(bounds[l], bounds[l + 1]) for l in self.layers])
        if state_dict is not None:
            self.backbone = self.spec.build()
            load_used(self.backbone, state_dict, self.used_keys(), "backbone weights in the checkpoint")
            self.weights_source = "checkpoint"
        else:
            self.backbone, self.weights_source = self.spec.create(weights)
        self.backbone.requires_grad_(False)
        self.eval()
        self.channels_last = False  # set by the config's opt-in channels_last (see engine.factory)
        self.fused_swish = False    # nn.SiLU instead of the release's x * sigmoid(x): the bf16 fast path only
        # Only the weights the taps use identify the features (a classifier head never touches them).
        used = self.used_keys()
        self.digest = weights_digest({k: v for k, v in self.backbone.state_dict().items() if k in used})
        self.register_buffer("mean", torch.tensor(self.spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.spec.std).view(1, 3, 1, 1), persistent=False)

    @property
    def identity(self) -> str:
        return f"{self.name}@{self.digest}"

    def backbone_id(self, input_size: int) -> BackboneId:
        """The identity of this extractor's features for images resized to ``input_size``."""
        return BackboneId(name=self.name, weights=self.digest, input_size=input_size,
                          feature_dim=self.feature_dim, layers=tuple(self.layers), indices=tuple(self.indices))

    def used_keys(self) -> set:
        """State-dict keys of the layers up to the last tap."""
        return self.spec.used_keys(self.backbone)

    @property
    def raw_dim(self) -> int:
        """Width of the pooled vector of all taps (what ``forward`` returns and the cache stores)."""
        return self.spec.indices[-1]

    @property
    def feature_dim(self) -> int:
        """Width of the vectors the LFDN sees (the selected layers)."""
        return len(self._columns)

    @property
    def indices(self) -> list:
        """Cumulative channel counts of the selected layers: the slice ends in the LFDN's vector."""
        return np.cumsum([self.spec.channels[l] for l in self.layers]).tolist()

    def select(self, raw: torch.Tensor) -> torch.Tensor:
        """(..., raw_dim) -> (..., feature_dim): the selected layers' slices."""
        if len(self.layers) == len(self.spec.channels):
            return raw
        return raw[..., self._columns.to(raw.device)]

    def train(self, mode: bool = True):
        # Frozen: BatchNorm always uses its running statistics.
        return super().train(False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) or grayscale (B, H, W) -> float (B, 3, H, W): RGB conversion, ToTensor
        and Normalize, bit for bit, batched.

        The result is contiguous NCHW, as ToTensor gives: a permuted (channels-last) tensor would
        make the convolutions pick other kernels, with other rounding than the release.
        """
        if images.dim() == 3:  # grayscale (B, H, W): converting L to RGB copies the channel
            images = images.unsqueeze(-1).expand(-1, -1, -1, 3)
        x = images.permute(0, 3, 1, 2).to(torch.float32).contiguous()  # (B, 3, H, W)
        return x.div_(255).sub_(self.mean).div_(self.std)

    @property
    def has_swish(self) -> bool:
        """Whether the backbone's activation is a swish with a fused variant (efficientnet_pytorch's b0..b7)."""
        return self.spec.has_swish

    def use_fused_swish(self, on: bool) -> None:
        """Switch b4's swish to nn.SiLU's fused kernel (about 10% faster, other rounding: the fast path
        only) or back to the release's x * sigmoid(x); a no-op for backbones without swish."""
        if self.has_swish and on != self.fused_swish:
            self.spec.set_fused_swish(self.backbone, on)
            self.fused_swish = on

    def taps(self, x: torch.Tensor) -> list:
        return self.spec.taps(self.backbone, x)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.taps(x)
        # Every map is resized to the stride-16 tap's size (the nearest stride where a backbone has none).
        target = min(range(len(maps)), key=lambda i: (abs(self.spec.strides[i] - 16), i))
        size = maps[target].shape[-2:]
        pooled = []
        for m in maps:  # (B, C_l, H_l, W_l)
            if m.shape[-2:] != size:
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=True)
            pooled.append(m.float().mean(dim=(2, 3)))  # (B, C_l)
        return torch.cat(pooled, dim=1)  # (B, D)
