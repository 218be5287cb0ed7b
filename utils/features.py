"""Feature extraction, once per (backbone weights, input size, precision, dataset content, split).

The backbone is frozen and there is no augmentation (REFERENCE §1), so an image's raw pooled
vector never changes. It is computed once, stored under a key that names everything it depends
on, and a stored file whose key differs is never used.
"""
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import DataLoader, Subset

from datasets import ImageSet
from models.features import MultiLayerFeatures
from utils.atomic import atomic_torch_save
from utils.distributed import DistContext, barrier, gather_interleaved
from utils.progress import progress

log = logging.getLogger("dlsr")
CACHE_VERSION = 1
DECODE_BATCH = 64


@dataclass
class Features:
    raw: torch.Tensor      # (N, D) float32 raw pooled vectors, dataset order, on CPU
    seconds: float         # time spent extracting in this run (0 when read from the cache)
    from_cache: bool


def autocast(ctx: DistContext, amp: bool):
    return torch.autocast("cuda", dtype=torch.float16, enabled=amp and ctx.cuda)


def precision_tag(ctx: DistContext, amp: bool) -> str:
    return "fp16-autocast" if amp and ctx.cuda else "fp32"


def image_loader(dataset, ctx: DistContext, batch_size: int, num_workers: int, **kwargs) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=ctx.cuda,
                      persistent_workers=False, **kwargs)


@torch.no_grad()
def backbone_features(extractor: MultiLayerFeatures, images: torch.Tensor, ctx: DistContext, amp: bool,
                      chunk: Optional[int] = None) -> torch.Tensor:
    """uint8 images (B, H, W[, 3]) -> raw pooled vectors (B, D) float32, the backbone run ``chunk`` at a time."""
    x = extractor.normalize(images.to(ctx.device, non_blocking=True))  # (B, 3, S, S)
    chunk = chunk or len(x)
    with autocast(ctx, amp):
        return torch.cat([extractor(x[i:i + chunk]).float() for i in range(0, len(x), chunk)])


def decode_batch_size(batch_size: int) -> int:
    """Images decoded per loader step during extraction: about DECODE_BATCH, a multiple of the
    backbone's batch. Fewer, larger PIL calls and loader steps; the backbone still sees
    ``batch_size`` images at a time, so the features do not change."""
    return batch_size * max(1, DECODE_BATCH // batch_size)


@torch.no_grad()
def extract_features(extractor: MultiLayerFeatures, dataset: ImageSet, ctx: DistContext, batch_size: int,
                     num_workers: int, amp: bool, desc: str) -> torch.Tensor:
    """Run the backbone over ``dataset`` (each rank a strided shard) -> (N, D) on every rank."""
    shard = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))
    out = []
    loader = image_loader(shard, ctx, decode_batch_size(batch_size), num_workers)
    for images in progress(loader, desc, ctx.is_main, unit="batch"):
        out.append(backbone_features(extractor, images, ctx, amp, chunk=batch_size))  # (B, D)
    local = torch.cat(out) if out else torch.empty(0, extractor.feature_dim, device=ctx.device)
    return gather_interleaved(local, len(dataset), ctx).cpu()


def cache_key(extractor: MultiLayerFeatures, dataset: ImageSet, split: str, input_size: int, precision: str) -> dict:
    return {"version": CACHE_VERSION, "backbone": extractor.identity, "input_size": input_size,
            "precision": precision, "split": split, "dataset": dataset.identity()}


def file_stem(name: str) -> str:
    """A dataset or set name as a safe file name stem ("folder:dtd/images" -> "folder_dtd_images")."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "set"


def cache_path(cache_dir: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_dir, f"{file_stem(key['dataset']['name'])}-{key['split']}-{digest}.pt")


def load_or_extract(extractor: MultiLayerFeatures, dataset: ImageSet, split: str, ctx: DistContext, *,
                    cache_dir: str, input_size: int, batch_size: int, num_workers: int, amp: bool,
                    use_cache: bool = True, desc: str = "features") -> Features:
    """Raw features of ``dataset`` from the cache when its key matches, else extracted (and stored)."""
    key = cache_key(extractor, dataset, split, input_size, precision_tag(ctx, amp))
    path = cache_path(cache_dir, key)
    if use_cache and os.path.isfile(path):
        stored = _read(path)
        if stored is not None and stored.get("key") == key and \
                tuple(stored["features"].shape) == (len(dataset), extractor.feature_dim):
            return Features(stored["features"], 0.0, True)
        if ctx.is_main:
            log.warning("feature cache %s does not match this run; extracting again", path)
    start = time.perf_counter()
    feats = extract_features(extractor, dataset, ctx, batch_size, num_workers, amp, desc)
    seconds = time.perf_counter() - start
    if use_cache:
        if ctx.is_main:
            atomic_torch_save({"key": key, "features": feats}, path)
        barrier(ctx)
    return Features(feats, seconds, False)


def _read(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache file is simply rebuilt
        return None
