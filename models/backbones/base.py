"""What every backbone adapter is: ``Backbone`` (the base class of one file per family) and
``Family`` (the names a family serves), and the weight loading they share."""
import os
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from errors import UserError, load_refusal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_SEARCH_DIRS = (".", "checkpoint")  # where a canonical weights file name is looked for, then torch's hub


class Backbone:
    """One backbone: what the neck (models/features.py) needs of it. Subclasses set the class
    attributes and define ``build``, ``taps`` and ``used_prefixes``; the rest has defaults."""

    name: str = ""
    channels: tuple = ()           # per tap
    strides: tuple = ()            # per tap, in pixels
    weight_files: tuple = ()       # file names searched for locally, the first one the canonical name
    mean: tuple = IMAGENET_MEAN    # input normalisation
    std: tuple = IMAGENET_STD
    min_input_size: int = 32       # below this the network fails or taps vanish
    has_swish: bool = False        # efficientnet_pytorch's swish, which the bf16 fast path may fuse

    @property
    def indices(self) -> list:
        """Cumulative channel counts: the slice ends of each tap in the vector."""
        return np.cumsum(self.channels).tolist()

    def build(self) -> nn.Module:
        """The network with its default (random) initialisation."""
        raise NotImplementedError

    def taps(self, net: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
        """The maps at the taps, in order, for a normalised batch x (B, 3, H, W)."""
        raise NotImplementedError

    def used_prefixes(self) -> tuple:
        """State-dict key prefixes of the layers up to the last tap (a classifier head is not used)."""
        raise NotImplementedError

    def used_keys(self, net: nn.Module) -> set:
        prefixes = self.used_prefixes()
        return {k for k in net.state_dict() if k.startswith(prefixes)}

    def set_fused_swish(self, net: nn.Module, on: bool) -> None:
        """Switch the activation to a fused kernel (a faster path with other rounding); only families
        with ``has_swish`` have one."""

    def create(self, weights: Optional[str]) -> tuple:
        """(the network with its ImageNet weights, where they came from). ``weights``: a file; "random"
        (seeded random initialisation, for tests); None: the canonical file in ./ or ./checkpoint/ or
        torch's hub folder, else a download."""
        net = self.build()
        if weights == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                for m in net.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
            return net, "random"
        path = weights or self.find_local()
        if weights and not os.path.isfile(weights):
            raise UserError(f"backbone weights file {weights} does not exist "
                            f"(expected the {self.name} ImageNet weights, e.g. {self.weight_files[0]})")
        if path is None:
            self.download(net)
            return net, "download"
        load_used(net, read_weights(path), None, path)
        return net, path

    def find_local(self) -> Optional[str]:
        hub = os.path.join(torch.hub.get_dir(), "checkpoints")
        for d in (*WEIGHT_SEARCH_DIRS, hub):
            for f in self.weight_files:
                if os.path.isfile(os.path.join(d, f)):
                    return os.path.join(d, f)
        return None

    def download(self, net: nn.Module) -> None:
        """Load the weights from the internet into ``net``; raises UserError naming the file to put locally."""
        try:
            self.fetch(net)
        except UserError:
            raise
        except Exception as e:
            reason = f"{e.__class__.__name__}: {e}".splitlines()[0]
            raise UserError(f"{self.name} ImageNet weights not found: put {self.weight_files[0]} in ./ or "
                            f"./checkpoint/ (or pass --backbone_weights PATH); automatic download failed ({reason})") \
                from None

    def fetch(self, net: nn.Module) -> None:
        raise RuntimeError("no download for this backbone")


_read = {}  # the last weights file read in this process: {(path, inode, size, mtime): its state dict}


def read_weights(path: str):
    """The object in the weights file ``path``, read once per process while the file is unchanged (a
    detector next to its baselines, or an evaluation after a training, builds the same backbone
    several times); only ``load_state_dict`` copies from it, so it is shared, never changed."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _read:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read backbone weights {path}: {e.__class__.__name__}: {load_refusal(e)}") \
                from None
        _read.clear()  # one file held: a process uses one backbone
        _read[key] = state
    return _read[key]


def load_used(net: nn.Module, state, used: Optional[set], source: str) -> None:
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


class Family:
    """A family of backbones: the names it serves (``names``, or any name with ``prefix``) and its adapter."""

    def __init__(self, adapter, names: Sequence[str] = (), prefix: str = "", usage: str = ""):
        self.adapter, self.names, self.prefix, self.usage = adapter, tuple(names), prefix, usage

    def serves(self, name: str) -> bool:
        return name in self.names or bool(self.prefix and name.startswith(self.prefix) and len(name) > len(self.prefix))
