"""The feature cache: raw backbone vectors of a data set, stored once under a key that names
everything they depend on (backbone weights, input size, arithmetic, backbone batch, the set's
content, the split), so that a stored file whose key differs is never used.

Files are read memory-mapped (``torch.load(mmap=True)``): only the pages used are read.
"""
import logging
import os
from typing import Optional

import torch

from datasets import ImageSet
from models.features import BackboneId
from store.atomic import atomic_torch_save
from store.rundir import cause, file_stem, keyed_path

log = logging.getLogger("dlsr")
CACHE_VERSION = 4  # 2: the backbone batch is part of the key; 3: image keys stored; 4: the device type


def cache_key(backbone: BackboneId, dataset: ImageSet, split: str, precision: str, backbone_batch: int) -> dict:
    """Raw features hold every tap, so the taps the LFDN uses are not part of the key."""
    return {"version": CACHE_VERSION, "backbone": backbone.identity, "input_size": backbone.input_size,
            "precision": precision, "backbone_batch": backbone_batch, "split": split, "dataset": dataset.identity()}


def cache_path(cache_dir: str, key: dict) -> str:
    return keyed_path(cache_dir, f"{file_stem(key['dataset']['name'])}-{key['split']}", key, ".pt")


def store(path: str, key: dict, features: torch.Tensor, image_keys: torch.Tensor) -> None:
    """Write a cache file; a failure (a disk that filled up meanwhile) costs the cache, not the run."""
    try:
        atomic_torch_save({"key": key, "features": features.cpu(), "image_keys": image_keys.cpu()}, path)
    except OSError as e:
        log.warning("cannot store features in the cache %s: %s; going on without it", path, cause(e))


def read_valid(path: str, key: dict, shape: tuple) -> Optional[tuple]:
    """(raw features (N, D), image keys (N,)) if ``path`` holds exactly this key and shape; None (with
    a warning why) otherwise."""
    if not os.path.isfile(path):
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        log.warning("feature cache %s is damaged (unreadable); extracting again and rewriting it", path)
        return None
    if not isinstance(stored, dict) or stored.get("key") != key or \
            tuple(getattr(stored.get("features"), "shape", ())) != shape or \
            tuple(getattr(stored.get("image_keys"), "shape", ())) != shape[:1]:
        log.warning("feature cache %s was written for other inputs; extracting again and rewriting it", path)
        return None
    return stored["features"], stored["image_keys"]
