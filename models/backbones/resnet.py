"""torchvision's ResNet-50, tapped after layer1, layer2 and layer3 (the paper's ResNet variant)."""
from torch import nn

from models.backbones.base import Backbone, Family


class ResNet50(Backbone):
    name = "resnet50"
    stages = ("layer1", "layer2", "layer3")
    channels = (256, 512, 1024)
    strides = (4, 8, 16)
    weight_files = ("resnet50-19c8e357.pth", "resnet50-0676ba61.pth")
    min_input_size = 16

    def __init__(self, name: str = "resnet50"):
        pass

    def build(self) -> nn.Module:
        import torchvision
        return torchvision.models.resnet50()

    def taps(self, net, x):
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        maps = []
        for stage in self.stages:
            x = getattr(net, stage)(x)
            maps.append(x)
        return maps

    def used_prefixes(self) -> tuple:
        return ("conv1.", "bn1.", *(f"{stage}." for stage in self.stages))

    def fetch(self, net) -> None:
        from torchvision.models import ResNet50_Weights
        net.load_state_dict(ResNet50_Weights.IMAGENET1K_V1.get_state_dict(progress=True))


FAMILY = Family(ResNet50, names=("resnet50",))
