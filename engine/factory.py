"""The LFDN and the diffusion schedule as a config describes them."""
from typing import Optional

import torch

from models.diffusion import GaussianDiffusion
from models.features import MultiLayerFeatures
from models.lfdn import LFDN
from experiment.config import Config


def build_lfdn(cfg: Config, feature_dim: int) -> LFDN:
    c = cfg.lfdn
    return LFDN(in_channels=feature_dim, time_embed_dim=c.time_embed_dim, model_channels=c.model_channels,
                bottleneck_channels=c.bottleneck_channels, out_channels=feature_dim,
                num_res_blocks=c.num_res_blocks, dropout=c.dropout)


def build_extractor(cfg: Config, state_dict: Optional[dict] = None) -> MultiLayerFeatures:
    """The frozen backbone of the config (weights from ``state_dict`` when given, e.g. a release checkpoint's)."""
    extractor = MultiLayerFeatures(cfg.backbone.name, cfg.backbone.weights, state_dict, cfg.backbone.layers)
    if cfg.channels_last:
        extractor.channels_last = True
        extractor.to(memory_format=torch.channels_last)
    return extractor


def build_diffusion(cfg: Config) -> GaussianDiffusion:
    d = cfg.diffusion
    return GaussianDiffusion(d.timesteps, d.linear_start, d.linear_end)
