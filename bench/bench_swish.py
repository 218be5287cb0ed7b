"""b4's swish: the release's x * sigmoid(x) (the default here) against the fused nn.SiLU kernel.

Prints images/s of the backbone with each, timed alternately, and the largest difference they make
to the standardised features. nn.SiLU is not shipped: it changes the features (docs/METHOD.md §2).
"""
import torch

from common import paired, record
from models.features import MultiLayerFeatures, standardize


def main() -> None:
    torch.manual_seed(0)
    f = MultiLayerFeatures("efficientnet-b4", weights="random")
    f.backbone.train()  # BatchNorm statistics from noise, so that activations are O(1) (as with real weights)
    with torch.no_grad():
        for m in f.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        f.backbone(torch.randn(8, 3, 224, 224))
    f.backbone.eval()
    x = torch.randn(16, 3, 224, 224)

    def run(memory_efficient: bool):
        f.backbone.set_swish(memory_efficient=memory_efficient)
        with torch.no_grad():
            return f(x)

    diff = (standardize(run(True), f.indices) - standardize(run(False), f.indices)).abs().max().item()
    t_release, t_fused, ratio = paired(lambda: run(True), lambda: run(False), repeats=5)
    record("b4 swish: release x * sigmoid(x) vs fused nn.SiLU", [
        ("config", "efficientnet-b4 @ 224 px, random weights with BatchNorm statistics from noise, batch 16, 5 pairs"),
        ("x * sigmoid(x) (shipped), images/s", f"{len(x) / t_release:.1f}"),
        ("nn.SiLU (not shipped), images/s", f"{len(x) / t_fused:.1f}"),
        ("nn.SiLU time / x * sigmoid(x) time", f"{ratio:.3f}"),
        ("largest standardised-feature difference", f"{diff:.3g}"),
    ], "device cpu")


if __name__ == "__main__":
    main()
