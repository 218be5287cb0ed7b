"""EfficientNet-b0..b7 as the ``efficientnet_pytorch`` package defines them; b4 is the paper's
backbone, built exactly as the release builds it (its features are bit-identical to the release's,
tests/test_features.py)."""
from torch import nn

from models.backbones.base import Backbone, Family

# Blocks 1, 5, 9, 21, 31 = efficientnet_pytorch's extract_endpoints() reduction_1..5 (b4).
SPECS = {"efficientnet-b4": ((1, 5, 9, 21, 31), (24, 32, 56, 160, 448), "efficientnet-b4-6ed6700e.pth")}


class StemAndBlocks(Backbone):
    """The EfficientNet layout both packages share: a stem (conv, BN, swish), then ``net._blocks``;
    the taps are the outputs of the blocks numbered in ``self.blocks``."""

    def taps(self, net, x):
        x = net._swish(net._bn0(net._conv_stem(x)))
        maps = []
        for idx, block in enumerate(net._blocks[: self.blocks[-1] + 1]):
            x = block(x)  # eval mode: drop-connect is off
            if idx in self.blocks:
                maps.append(x)
        return maps

    def used_prefixes(self) -> tuple:
        return ("_conv_stem.", "_bn0.", *(f"_blocks.{i}." for i in range(self.blocks[-1] + 1)))


class EfficientNet(StemAndBlocks):
    strides = (2, 4, 8, 16, 32)
    has_swish = True

    def __init__(self, name: str):
        self.name = name
        self.blocks, self.channels, weights = SPECS[name]
        self.weight_files = (weights,)

    def build(self) -> nn.Module:
        from efficientnet_pytorch import EfficientNet as Net
        # Default construction, as the release: same-padding is precomputed for b4's 380 px, and swish
        # is the package's MemoryEfficientSwish, i.e. x * sigmoid(x). Its export switch
        # (set_swish(memory_efficient=False)) installs nn.SiLU, whose fused kernel rounds differently
        # by ~1e-6 per activation; b4 amplifies that to O(1) in the standardised last layer.
        return Net.from_name(self.name)

    def set_fused_swish(self, net, on: bool) -> None:
        net.set_swish(memory_efficient=not on)

    def fetch(self, net) -> None:
        from efficientnet_pytorch.utils import load_pretrained_weights
        load_pretrained_weights(net, self.name, verbose=False)


FAMILY = Family(EfficientNet, names=tuple(SPECS))
