"""Frozen ImageNet backbones, one adapter per family, one file each (docs/EXTENDING.md):

- ``efficientnet.py``: EfficientNet-b0..b7 on efficientnet_pytorch (b4 is the paper's, bit-identical
  to the release);
- ``efficientnet_lite.py``: EfficientNet-Lite0 on efficientnet-lite-pytorch (the offline demo);
- ``resnet.py``: torchvision's ResNet-50 (the paper's variant);
- ``timm_models.py``: any timm model that offers ``features_only``, named ``timm:MODEL``.

An adapter says how to build the network and load its weights, where its taps are (channels and
strides), which state-dict keys those taps use, how to normalise its input, and its activation.
``backbone(name)`` finds the adapter of a name. A new family is one file in this folder that
defines ``FAMILY``: the families are the modules here that define one (``discover``), so nothing
else changes.
"""
import functools
from typing import List

from errors import UserError
from models.backbones.base import IMAGENET_MEAN, IMAGENET_STD, WEIGHT_SEARCH_DIRS, Backbone, Family, load_used
from utils.discovery import discover

__all__ = ["Backbone", "Family", "IMAGENET_MEAN", "IMAGENET_STD", "WEIGHT_SEARCH_DIRS", "backbone", "fixed_backbones",
           "known_names", "load_used"]

# Each family's own package (efficientnet_pytorch, timm, ...) is imported only when one of its backbones is built.
FAMILIES = tuple(discover(__name__, __path__, ["FAMILY"], skip=["base"]))


def known_names() -> List[str]:
    """Every backbone name, and each open family's pattern (timm:MODEL), for messages and --help."""
    return [n for f in FAMILIES for n in (f.names or (f.usage,))]


@functools.lru_cache(maxsize=None)
def backbone(name: str) -> Backbone:
    """The adapter of the backbone ``name``; UserError naming the known ones where none serves it."""
    for family in FAMILIES:
        if family.serves(name):
            return family.adapter(name)
    raise UserError(f"unknown backbone {name!r}; choose one of {', '.join(known_names())}")


def fixed_backbones() -> dict:
    """{name: adapter} of the backbones with fixed names (the open families, timm:MODEL, left out)."""
    return {n: backbone(n) for f in FAMILIES for n in f.names}
