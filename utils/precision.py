"""The numerics policy, in one place: which arithmetic a run uses, and the switches that make fp32
on CUDA true fp32.

- ``compute_mode``: fp16 autocast on CUDA (``amp``, as the release), bf16 autocast on a CPU with
  native bf16 when ``precision: bf16`` asks for it (an opt-in), fp32 otherwise. It reads the
  machine and the settings and changes nothing.
- ``exact_fp32(device)``: a scoped switch. PyTorch lets cuDNN round fp32 convolutions to TF32 on
  Ampere and newer GPUs by default (and matrix products where asked), which moves features by
  ~1e-3. Inside the block both are IEEE fp32; on leaving it every switch is put back as it was
  found, so a program that uses the Python API keeps its own settings (and PyTorch's legacy getters,
  ``torch.backends.cudnn.allow_tf32`` and friends, keep working). On a CPU it changes nothing.

Entry scripts hold ``exact_fp32`` for their whole run, where a reader of their first lines sees it;
the Python API holds it around each call that computes.
"""
import functools
import logging
import os
from contextlib import contextmanager, nullcontext

import torch

log = logging.getLogger("dlsr")
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


def compute_mode(device: torch.device, amp: bool, precision: str) -> str:
    """The arithmetic of a run on ``device``: "fp32", "fp16-autocast" or "bf16-autocast"."""
    if torch.device(device).type == "cuda":
        return "fp16-autocast" if amp else "fp32"
    if precision == "bf16":
        if native_bf16() or os.environ.get(EMULATED_BF16_ENV) == "1":
            return "bf16-autocast"
        if not _said_no_bf16:
            _said_no_bf16.append(True)
            log.warning("precision bf16 asked for, but this CPU has no native bf16 (avx512_bf16 / amx_bf16): "
                        "going on in fp32")
    return "fp32"


def autocast(mode: str):
    if mode == "fp16-autocast":
        return torch.autocast("cuda", dtype=torch.float16)
    if mode == "bf16-autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def precision_tag(mode: str, device: torch.device, channels_last: bool = False, fused_swish: bool = False) -> str:
    """What the features' arithmetic was, on which kind of device ("cpu-fp32", "cuda-sm90-cudnn91002-fp32"):
    part of the cache and calibration keys, so features of two modes, devices, GPU generations or
    cuDNN versions never mix."""
    device = torch.device(device)
    where = device.type
    if where == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where += f"-sm{major}{minor}-cudnn{torch.backends.cudnn.version()}"
    return f"{where}-{mode}" + ("+channels-last" if channels_last else "") + ("+silu" if fused_swish else "")


# PyTorch >= 2.9 keeps TF32 in these string switches ("ieee", "tf32", "none": inherit); older ones in
# two booleans. Saving and restoring every one of them gives the caller back exactly what it had.
_NEW_SWITCHES = (("", "fp32_precision"), ("cuda.matmul", "fp32_precision"), ("cudnn", "fp32_precision"),
                 ("cudnn.conv", "fp32_precision"), ("cudnn.rnn", "fp32_precision"))
_LEGACY_SWITCHES = (("cudnn", "allow_tf32"), ("cuda.matmul", "allow_tf32"))


def _switch(path: str):
    obj = torch.backends
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


def _new_api() -> bool:
    return all(hasattr(_switch(path), name) for path, name in _NEW_SWITCHES)


def tf32_state() -> tuple:
    """Every TF32 switch as (path, name, value): what ``exact_fp32`` restores."""
    switches = _NEW_SWITCHES if _new_api() else _LEGACY_SWITCHES
    return tuple((path, name, getattr(_switch(path), name)) for path, name in switches)


@contextmanager
def exact_fp32(device):
    """fp32 on CUDA is IEEE fp32 for the block (TF32 off for cuDNN and matrix products); the previous
    switches come back afterwards. AMP's fp16 work is unaffected. A no-op off CUDA."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = tf32_state()
    try:
        if _new_api():
            for path in ("cudnn.conv", "cudnn.rnn", "cuda.matmul"):
                _switch(path).fp32_precision = "ieee"
        else:
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        for path, name, value in saved:
            setattr(_switch(path), name, value)
