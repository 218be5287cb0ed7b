"""Feature extraction, once per (backbone weights, input size, precision, backbone batch, dataset
content, split), and the one place where features are standardised.

The backbone is frozen and there is no augmentation (docs/METHOD.md §1), so an image's raw pooled
vector never changes: it is computed once and kept in the feature cache (``store.feature_cache``),
which every rank consults before all ranks decide together. Along with each vector goes a 64-bit
digest of the decoded image (``image_keys``): the image's identity, from which its test-time
noise is seeded.
"""
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Subset

from datasets import ImageSet, build_dataset, random_subset
from experiment.config import Config
from models.features import MultiLayerFeatures, standardize
from store import feature_cache
from utils.distributed import DistContext, agreed_record, block_rows, broadcast_from, gather_interleaved
from utils.loader import decoded, image_loader
from utils.precision import autocast, compute_mode, precision_tag
from utils.progress import progress

log = logging.getLogger("dlsr")
DECODE_BATCH = 64


def mode_of(cfg: Config, ctx: DistContext) -> str:
    """The arithmetic of a run of ``cfg`` on ``ctx``'s device (``utils.precision.compute_mode``)."""
    return compute_mode(ctx.device, cfg.amp, cfg.precision)


def fast_swish(mode: str, extractor: MultiLayerFeatures) -> bool:
    """The bf16 fast path also takes nn.SiLU's fused swish (b4); exact fp32 keeps the release's."""
    return mode == "bf16-autocast" and extractor.has_swish


def features_tag(mode: str, extractor: MultiLayerFeatures, device: torch.device) -> str:
    """The arithmetic of ``extractor``'s features in ``mode`` on ``device``, for cache and calibration keys."""
    return precision_tag(mode, device, extractor.channels_last, fast_swish(mode, extractor))


def loader_for(cfg: Config, ctx: DistContext, dataset, batch_size: int, **kwargs):
    """The decoding loader of ``dataset`` with the run's workers (``Config.workers``) and pinning."""
    return image_loader(dataset, batch_size, cfg.workers(ctx.cuda, ctx.local_world_size), cfg.backbone.input_size,
                        pin_memory=ctx.cuda, local_processes=ctx.local_world_size, **kwargs)


@dataclass
class Features:
    z: torch.Tensor        # (N, D) float32 standardised vectors, dataset order, on the run's device
    keys: torch.Tensor     # (N,) int64 image digests (image_keys), on CPU
    seconds: float         # time spent extracting in this run (0 when read from a cache)
    from_cache: bool


def image_keys(images: torch.Tensor) -> torch.Tensor:
    """uint8 decoded images (B, S, S[, 3]) -> (B,) int64: a digest of each image's pixels.

    An RGB image whose three channels are equal is digested as its one channel, as a grayscale
    (B, S, S) array is: an image has one key whether it comes from an array or from a file.
    """
    arr = images.cpu().numpy()
    if arr.ndim == 4:
        gray = (arr[..., 0] == arr[..., 1]).all(axis=(1, 2)) & (arr[..., 0] == arr[..., 2]).all(axis=(1, 2))
        planes = [np.ascontiguousarray(a[..., 0]) if g else a for a, g in zip(arr, gray)]
    else:
        planes = list(arr)
    return torch.tensor([digest64(a) for a in planes], dtype=torch.int64)


def digest64(a: np.ndarray) -> int:
    """A signed 64-bit digest of an array's bytes (the same in every process, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(a).data, digest_size=8).digest(), "little", signed=True)


def vector_keys(z: torch.Tensor) -> torch.Tensor:
    """(N, D) feature vectors -> (N,) int64 keys from each vector's own bytes: the noise seeds of
    vectors that come without their images' keys."""
    return torch.tensor([digest64(row) for row in z.cpu().numpy()], dtype=torch.int64)


@torch.no_grad()
def backbone_features(extractor: MultiLayerFeatures, images: torch.Tensor, ctx: DistContext, mode: str,
                      chunk: Optional[int] = None) -> torch.Tensor:
    """uint8 images (B, H, W[, 3]) -> raw pooled vectors (B, D) float32, the backbone run ``chunk`` at a time."""
    extractor.use_fused_swish(fast_swish(mode, extractor))
    x = extractor.normalize(images.to(ctx.device, non_blocking=True))  # (B, 3, S, S)
    chunk = chunk or len(x)
    if extractor.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(mode):
        return torch.cat([extractor(x[i:i + chunk]).float() for i in range(0, len(x), chunk)])


def standardized_features(extractor: MultiLayerFeatures, images: torch.Tensor, ctx: DistContext, mode: str,
                          chunk: Optional[int] = None) -> torch.Tensor:
    """uint8 images (B, H, W[, 3]) -> standardised vectors (B, D) on the device (docs/METHOD.md §2)."""
    return standardize(extractor.select(backbone_features(extractor, images, ctx, mode, chunk)), extractor.indices)


def image_batch_features(extractor: MultiLayerFeatures, images: torch.Tensor, ctx: DistContext, mode: str,
                         chunk: Optional[int] = None):
    """uint8 decoded images (B, S, S[, 3]) -> (standardised (B, D) on the device, image keys (B,))."""
    return standardized_features(extractor, images, ctx, mode, chunk), image_keys(images)


def decode_batch_size(batch_size: int) -> int:
    """Images decoded per loader step during extraction: about DECODE_BATCH, a multiple of the
    backbone's batch. Fewer, larger PIL calls and loader steps; the backbone still sees
    ``batch_size`` images at a time, so the features do not change."""
    return batch_size * max(1, DECODE_BATCH // batch_size)


@torch.no_grad()
def extract_features(extractor: MultiLayerFeatures, dataset: ImageSet, ctx: DistContext, cfg: Config, mode: str,
                     desc: str) -> torch.Tensor:
    """Run the backbone over ``dataset`` -> raw (N, D) float32 and image keys (N,), on every rank,
    the features on ``ctx.device``.

    Ranks take whole backbone batches round-robin (rank r: batches r, r + W, ...), so every image
    goes through the backbone in exactly the batch it would meet in one process: the features do
    not depend on the number of ranks, not even at rounding level.
    """
    batch_size = cfg.extract_batch_size
    shard = Subset(dataset, block_rows(len(dataset), batch_size, ctx.rank, ctx.world_size).tolist())
    out, keys = [], []
    loader = loader_for(cfg, ctx, shard, decode_batch_size(batch_size))
    for images in progress(decoded(loader), desc, ctx.is_main, total=len(loader), unit="batch"):
        out.append(backbone_features(extractor, images, ctx, mode, chunk=batch_size))  # (B, D)
        keys.append(image_keys(images))  # (B,)
    local = torch.cat(out) if out else torch.empty(0, extractor.raw_dim, device=ctx.device)
    local_keys = torch.cat(keys) if keys else torch.empty(0, dtype=torch.int64)
    return (gather_interleaved(local, len(dataset), ctx, block=batch_size),
            gather_interleaved(local_keys, len(dataset), ctx, block=batch_size))


def training_set(cfg: Config) -> ImageSet:
    """The ID training set of ``cfg``: train.dataset (with its class filter), the seeded train.subset."""
    return random_subset(build_dataset(cfg.train.dataset, "train", cfg.data_path, cfg.backbone.input_size,
                                       cfg.download), cfg.train.subset)


def features_for(cfg: Config, ctx: DistContext, extractor: MultiLayerFeatures, dataset: ImageSet, split: str,
                 desc: str = "features") -> Features:
    """Standardised features of ``dataset`` on the device, from the cache when its key matches, else
    extracted (and stored). The config gives the cache folder, input size, backbone batch, decoding
    workers and arithmetic.

    Every rank looks at its own cache folder, then all ranks take one decision together
    (``agreed_record``), so nodes with or without a shared filesystem agree: if every rank holds
    the file, each reads its own; if some do, the lowest such rank sends its features to the
    others (no extraction); if none do, all ranks extract together. A rank that lacked the file
    and is its node's first process then stores it, unless an earlier writer already did.
    """
    mode = mode_of(cfg, ctx)
    key = feature_cache.cache_key(extractor.backbone_id(cfg.backbone.input_size), dataset, split,
                                  features_tag(mode, extractor, ctx.device), cfg.extract_batch_size)
    path = feature_cache.cache_path(cfg.feature_cache_dir, key)
    shape = (len(dataset), extractor.raw_dim)

    def share(stored, src: int):
        raw, keys = stored if stored is not None else (torch.empty(shape), torch.empty(shape[0], dtype=torch.int64))
        return broadcast_from(raw, src, ctx), broadcast_from(keys, src, ctx).cpu()

    def extract():
        raw, keys = extract_features(extractor, dataset, ctx, cfg, mode, desc)
        return raw, keys.cpu()

    start = time.perf_counter()
    (raw, keys), held = agreed_record(ctx, path, lambda: feature_cache.read_valid(path, key, shape), share, extract,
                                      lambda rec: feature_cache.store(path, key, *rec))
    seconds = 0.0 if held else time.perf_counter() - start
    z = standardize(extractor.select(raw.to(ctx.device)), extractor.indices)  # (N, D)
    return Features(z, keys, seconds, held)
