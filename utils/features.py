"""Feature extraction, once per (backbone weights, input size, precision, backbone batch, dataset
content, split), and the one place where features are standardised.

The backbone is frozen and there is no augmentation (docs/METHOD.md §1), so an image's raw pooled
vector never changes. It is computed once, stored under a key that names everything it depends
on, and a stored file whose key differs is never used. Along with each vector goes a 64-bit
digest of the decoded image (``image_keys``): the image's identity, from which its test-time
noise is seeded.
"""
import atexit
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from datasets import ImageSet, build_dataset, random_subset
from models.features import BackboneId, MultiLayerFeatures, standardize
from utils.atomic import atomic_torch_save
from utils.config import Config
from utils.distributed import DistContext, agreed_record, block_rows, broadcast_from, gather_interleaved
from utils.preemption import STOP_SIGNALS
from utils.progress import progress
from utils.rundir import cause

log = logging.getLogger("dlsr")
CACHE_VERSION = 4  # 2: the backbone batch is part of the key; 3: image keys stored; 4: the device type
DECODE_BATCH = 64


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


MODES = ("fp32", "fp16-autocast", "bf16-autocast")
# Measurement only, never a default: bench/bench_precision.py sets it to measure bf16's effect on
# the AUROC on CPUs that emulate bf16 (the same rounding, only slowly).
EMULATED_BF16_ENV = "DLSR_MEASURE_EMULATED_BF16"
_said_no_bf16 = []


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def exact_fp32_on_cuda() -> None:
    """fp32 on CUDA means fp32: PyTorch lets cuDNN round convolutions to TF32 on Ampere and newer
    GPUs by default (and allows it for matrix products where asked), which moves features by ~1e-3.
    AMP's fp16 work is unaffected; the fp32 parts of every run are exact."""
    cudnn = torch.backends.cudnn
    if hasattr(cudnn, "conv") and hasattr(cudnn.conv, "fp32_precision"):  # PyTorch >= 2.9: the new switches only
        cudnn.conv.fp32_precision = cudnn.rnn.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = cudnn.allow_tf32 = False


def compute_mode(cfg: Config, ctx: DistContext) -> str:
    """The arithmetic of the run: fp16 autocast on CUDA (``amp``, as the release), bf16 autocast on a
    CPU with native bf16 when ``precision: bf16`` asks for it (an opt-in), fp32 otherwise. On CUDA
    it also turns TF32 off (``exact_fp32_on_cuda``), so that fp32 is true fp32."""
    if ctx.cuda:
        exact_fp32_on_cuda()
        return "fp16-autocast" if cfg.amp else "fp32"
    if cfg.precision == "bf16":
        if native_bf16() or os.environ.get(EMULATED_BF16_ENV) == "1":
            return "bf16-autocast"
        if not _said_no_bf16:
            _said_no_bf16.append(True)
            log.warning("precision bf16 asked for, but this CPU has no native bf16 (avx512_bf16 / amx_bf16): "
                        "going on in fp32")
    return "fp32"


def autocast(ctx: DistContext, mode: str):
    if mode == "fp16-autocast":
        return torch.autocast("cuda", dtype=torch.float16)
    if mode == "bf16-autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def fast_swish(mode: str, extractor: MultiLayerFeatures) -> bool:
    """The bf16 fast path also takes nn.SiLU's fused swish (b4); exact fp32 keeps the release's."""
    return mode == "bf16-autocast" and extractor.has_swish


def precision_tag(mode: str, extractor: MultiLayerFeatures, device: torch.device) -> str:
    """What the features' arithmetic was, on which kind of device ("cpu-fp32", "cuda-fp16-autocast"):
    part of the cache and calibration keys, so features of two modes or devices never mix."""
    return f"{torch.device(device).type}-{mode}" + ("+channels-last" if extractor.channels_last else "") + \
        ("+silu" if fast_swish(mode, extractor) else "")


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """In a decoding worker: SIGTERM and SIGUSR1 are for the main process. A scheduler signals the
    whole process group; a worker ended by it would end the run with "DataLoader worker killed by
    signal" before the main process can save. Workers leave when the main process closes the loader,
    or are killed when it exits (``_kill_workers_at_exit``)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _kill_workers_at_exit() -> None:
    """At exit, end the decoding workers still alive (a loader left open by an error) with SIGKILL:
    multiprocessing's own exit handler ends them with SIGTERM, which they ignore, and would then
    wait for them forever. Registered after multiprocessing's, so it runs first."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the loader's handler would raise at the first death
    workers = [c for c in multiprocessing.active_children() if c.daemon]  # DataLoader's; others left as they are
    for child in workers:
        child.kill()
    for child in workers:
        child.join(timeout=5)


_exit_handler = []


SHM = "/dev/shm"


def shm_workers(num_workers: int, batch_bytes: int, folder: str = SHM) -> int:
    """At most as many decoding workers as /dev/shm can serve: each worker keeps about two batches
    in shared memory (the loader's prefetch), and a container's default /dev/shm of 64 MB holds
    fewer 224 px batches than 8 workers would queue. Uses half of what is free; says so when it cuts."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return num_workers
    fit = max(0, int(free // 2 // max(1, 2 * batch_bytes)))
    if fit < num_workers:
        if not _said_shm:
            _said_shm.append(True)
            log.warning("%s has %.0f MB free: decoding with %d worker(s) instead of %d (each queues ~%.0f MB); "
                        "give the container more (docker --shm-size=8g) to decode faster", folder, free / 2 ** 20,
                        fit, num_workers, 2 * batch_bytes / 2 ** 20)
        return fit
    return num_workers


_said_shm = []


def decoded(loader: DataLoader):
    """Iterate ``loader``, its workers started with the stop signals blocked: a signal that reaches
    the process group while a worker is being forked waits until the worker ignores it."""
    if not loader.num_workers:
        yield from loader
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        batches = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    try:
        yield from batches
    finally:
        del batches  # an error, here or in the caller's loop, closes the workers now (not when collected)


def image_loader(dataset, ctx: DistContext, batch_size: int, num_workers: int, image_size: int = 0,
                 **kwargs) -> DataLoader:
    """A DataLoader of decoded uint8 images; with workers, as many as /dev/shm holds batches of
    ``image_size`` px for, and each worker deaf to the stop signals (``ignore_stop_signals``)."""
    if num_workers and image_size:
        num_workers = shm_workers(num_workers, batch_size * image_size * image_size * 3)
    if num_workers and not _exit_handler:
        atexit.register(_kill_workers_at_exit)
        _exit_handler.append(True)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=ctx.cuda,
                      persistent_workers=False, worker_init_fn=ignore_stop_signals if num_workers else None,
                      **kwargs)


@torch.no_grad()
def backbone_features(extractor: MultiLayerFeatures, images: torch.Tensor, ctx: DistContext, mode: str,
                      chunk: Optional[int] = None) -> torch.Tensor:
    """uint8 images (B, H, W[, 3]) -> raw pooled vectors (B, D) float32, the backbone run ``chunk`` at a time."""
    extractor.use_fused_swish(fast_swish(mode, extractor))
    x = extractor.normalize(images.to(ctx.device, non_blocking=True))  # (B, 3, S, S)
    chunk = chunk or len(x)
    if extractor.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(ctx, mode):
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
def extract_features(extractor: MultiLayerFeatures, dataset: ImageSet, ctx: DistContext, batch_size: int,
                     num_workers: int, mode: str, desc: str) -> torch.Tensor:
    """Run the backbone over ``dataset`` -> raw (N, D) float32 and image keys (N,), on every rank,
    the features on ``ctx.device``.

    Ranks take whole backbone batches round-robin (rank r: batches r, r + W, ...), so every image
    goes through the backbone in exactly the batch it would meet in one process: the features do
    not depend on the number of ranks, not even at rounding level.
    """
    shard = Subset(dataset, block_rows(len(dataset), batch_size, ctx.rank, ctx.world_size).tolist())
    out, keys = [], []
    loader = image_loader(shard, ctx, decode_batch_size(batch_size), num_workers, getattr(dataset, "image_size", 0))
    for images in progress(decoded(loader), desc, ctx.is_main, total=len(loader), unit="batch"):
        out.append(backbone_features(extractor, images, ctx, mode, chunk=batch_size))  # (B, D)
        keys.append(image_keys(images))  # (B,)
    local = torch.cat(out) if out else torch.empty(0, extractor.raw_dim, device=ctx.device)
    local_keys = torch.cat(keys) if keys else torch.empty(0, dtype=torch.int64)
    return (gather_interleaved(local, len(dataset), ctx, block=batch_size),
            gather_interleaved(local_keys, len(dataset), ctx, block=batch_size))


def cache_key(backbone: BackboneId, dataset: ImageSet, split: str, precision: str, backbone_batch: int) -> dict:
    """Raw features hold every tap, so the taps the LFDN uses are not part of the key."""
    return {"version": CACHE_VERSION, "backbone": backbone.identity, "input_size": backbone.input_size,
            "precision": precision, "backbone_batch": backbone_batch, "split": split, "dataset": dataset.identity()}


def file_stem(name: str) -> str:
    """A dataset or set name as a safe file name stem ("folder:dtd/images" -> "folder_dtd_images")."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "set"


def keyed_path(folder: str, stem: str, key: dict, suffix: str) -> str:
    """``folder/stem-<digest of key><suffix>``: a file whose name changes with everything in ``key``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(folder, f"{stem}-{digest}{suffix}")


def cache_path(cache_dir: str, key: dict) -> str:
    return keyed_path(cache_dir, f"{file_stem(key['dataset']['name'])}-{key['split']}", key, ".pt")


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
    mode = compute_mode(cfg, ctx)
    key = cache_key(extractor.backbone_id(cfg.backbone.input_size), dataset, split,
                    precision_tag(mode, extractor, ctx.device), cfg.extract_batch_size)
    path = cache_path(cfg.feature_cache_dir, key)
    shape = (len(dataset), extractor.raw_dim)

    def share(stored, src: int):
        raw, keys = stored if stored is not None else (torch.empty(shape), torch.empty(shape[0], dtype=torch.int64))
        return broadcast_from(raw, src, ctx), broadcast_from(keys, src, ctx).cpu()

    def extract():
        raw, keys = extract_features(extractor, dataset, ctx, cfg.extract_batch_size,
                                     cfg.workers(ctx.cuda, ctx.local_world_size), mode, desc)
        return raw, keys.cpu()

    start = time.perf_counter()
    (raw, keys), held = agreed_record(ctx, path, lambda: _read_valid(path, key, shape), share, extract,
                                      lambda rec: _store(path, {"key": key, "features": rec[0].cpu(),
                                                                "image_keys": rec[1]}))
    seconds = 0.0 if held else time.perf_counter() - start
    z = standardize(extractor.select(raw.to(ctx.device)), extractor.indices)  # (N, D)
    return Features(z, keys, seconds, held)


def _store(path: str, payload: dict) -> None:
    """Write a cache file; a failure (a disk that filled up meanwhile) costs the cache, not the run."""
    try:
        atomic_torch_save(payload, path)
    except OSError as e:
        log.warning("cannot store features in the cache %s: %s; going on without it", path, cause(e))


def _read_valid(path: str, key: dict, shape: tuple):
    """(raw features, image keys) if ``path`` holds exactly this key and shape; None (with a warning why) otherwise."""
    if not os.path.isfile(path):
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        log.warning("feature cache %s is damaged (unreadable); extracting again and rewriting it", path)
        return None
    if not isinstance(stored, dict) or stored.get("key") != key or \
            tuple(getattr(stored.get("features"), "shape", ())) != shape or \
            tuple(getattr(stored.get("image_keys"), "shape", ())) != shape[:1]:
        log.warning("feature cache %s was written for other inputs; extracting again and rewriting it", path)
        return None
    return stored["features"], stored["image_keys"]
