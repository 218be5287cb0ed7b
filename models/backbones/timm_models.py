"""Any timm model that offers ``features_only``, named ``timm:MODEL`` (e.g. ``timm:resnet18``,
``timm:convnext_tiny``): its taps are every stage timm's ``feature_info`` lists, with their
channels and strides; its input is normalised with the model's own mean and std.

Weights: ``--backbone_weights FILE`` (a state dict of the whole model, as timm or the model's hub
page gives it), else the copy in the user's timm / Hugging Face cache; never a download, so a run
without either stops with one line saying where to put them. ``random`` gives seeded random weights
(for tests).
"""
import os
from typing import Optional

import torch
from torch import nn

from errors import UserError
from models.backbones.base import Backbone, Family

PREFIX = "timm:"


def _timm():
    try:
        import timm
    except ImportError:
        raise UserError("timm:MODEL backbones need the timm package: pip install timm") from None
    return timm


class TimmBackbone(Backbone):
    has_swish = False

    def __init__(self, name: str):
        self.name = name
        self.model = name[len(PREFIX):]
        timm = _timm()
        if not timm.is_model(self.model):
            raise UserError(f"backbone {name!r}: timm has no model {self.model!r} (timm.list_models() lists them)")
        net = self._create(pretrained=False)
        info = net.feature_info
        self.channels, self.strides = tuple(info.channels()), tuple(info.reduction())
        cfg = getattr(net, "pretrained_cfg", None) or {}
        self.mean, self.std = tuple(cfg.get("mean", self.mean)), tuple(cfg.get("std", self.std))
        self.weight_files = (f"{self.model}.safetensors",)

    def _create(self, **kwargs) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # a model built only to read its taps draws no global numbers
            torch.manual_seed(0)
            try:
                return _timm().create_model(self.model, features_only=True, **kwargs)
            except UserError:
                raise
            except Exception as e:
                reason = f"{e.__class__.__name__}: {e}".splitlines()[0]
                raise UserError(f"backbone {self.name!r}: timm could not build it with features_only ({reason})") \
                    from None

    def build(self) -> nn.Module:
        return self._create(pretrained=False)

    def taps(self, net, x):
        return list(net(x))

    def used_prefixes(self) -> tuple:
        return ("",)  # features_only already stops at the last tap

    def create(self, weights: Optional[str]) -> tuple:
        if weights == "random":
            return self.build(), "random"
        if weights and not os.path.isfile(weights):
            raise UserError(f"backbone weights file {weights} does not exist (expected the ImageNet weights of "
                            f"timm's {self.model}, a .safetensors, .pth or .bin state dict)")
        path = weights or self.find_local()
        if path is None:
            raise UserError(f"{self.name} ImageNet weights not found: not in the timm / Hugging Face cache "
                            f"({_hub_cache()}); put them there (timm.create_model({self.model!r}, pretrained=True) "
                            f"where there is internet) or pass --backbone_weights FILE")
        return self._create(pretrained=True, pretrained_cfg_overlay={"file": path}), path

    def find_local(self) -> Optional[str]:
        """The model's weights file in the Hugging Face cache (timm's default source), or in torch's hub folder."""
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(self.model)
        if cfg is None:
            return None
        hub_id = getattr(cfg, "hf_hub_id", None)
        if hub_id:
            from huggingface_hub import try_to_load_from_cache
            for filename in (getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin"):
                found = try_to_load_from_cache(hub_id, filename) if filename else None
                if isinstance(found, str):
                    return found
        url = getattr(cfg, "url", None)
        if url:
            local = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
            if os.path.isfile(local):
                return local
        return None


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants
        return constants.HF_HUB_CACHE
    except ImportError:
        return "~/.cache/huggingface/hub"


FAMILY = Family(TimmBackbone, prefix=PREFIX, usage="timm:MODEL")
