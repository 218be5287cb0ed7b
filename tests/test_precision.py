"""utils/precision.py: the arithmetic of a run, the scoped TF32 switch, and the keys that name it."""
import json
import logging
import os
import re
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

import utils.precision as utils_precision
from datasets import build_dataset
from dlsr.detector import DLSRDetector
from engine.extraction import features_tag, mode_of
from engine.factory import build_extractor
from experiment.config import load_config
from models.features import MultiLayerFeatures
from store.feature_cache import cache_key
from tests.helpers import CPU, ROOT, digits_uint8, library_files, run_inprocess
from utils.distributed import DistContext


def _bf16(path):
    cfg = load_config(path)
    cfg.precision = "bf16"
    return cfg


def tf32_getters() -> dict:
    """Every TF32 getter of PyTorch, legacy and new, as a value or the name of the error it raises."""
    b = torch.backends
    getters = {"cudnn.allow_tf32": lambda: b.cudnn.allow_tf32, "matmul.allow_tf32": lambda: b.cuda.matmul.allow_tf32,
               "cudnn.flags()": lambda: b.cudnn.flags().__enter__() is None,
               "float32_matmul_precision": torch.get_float32_matmul_precision}
    for path in ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn"):
        obj = b
        for part in filter(None, path.split(".")):
            obj = getattr(obj, part)
        if hasattr(obj, "fp32_precision"):
            getters[f"{path or 'backends'}.fp32_precision"] = lambda obj=obj: obj.fp32_precision
    out = {}
    for name, get in getters.items():
        try:
            out[name] = get()
        except Exception as e:  # what raises is what this records
            out[name] = f"raises {type(e).__name__}"
    return out


def pretend_cuda(monkeypatch, detector):
    """The CUDA path's precision setup on a CPU: the detector's device reads as CUDA where the
    precision switch and the arithmetic look (the computations still run on the CPU)."""
    import dlsr.detector
    real = utils_precision.exact_fp32
    monkeypatch.setattr(dlsr.detector, "exact_fp32", lambda device: real(torch.device("cuda", 0)))
    return detector


@pytest.mark.parametrize("caller", ["default", "high"])
def test_the_api_changes_no_process_wide_setting_and_every_tf32_getter_keeps_working(tiny, monkeypatch, caller):
    snapshot = utils_precision.tf32_state()
    try:
        if caller == "high":
            torch.set_float32_matmul_precision("high")  # what torch.compile users and transformers set
        before = tf32_getters()
        assert not any(str(v).startswith("raises") for v in before.values()), before
        inside = []
        real = utils_precision.exact_fp32

        @contextmanager
        def watched(device):
            with real(torch.device("cuda", 0)):
                inside.append(tf32_getters())
                yield
        import dlsr.detector
        monkeypatch.setattr(dlsr.detector, "exact_fp32", watched)
        det = DLSRDetector(tiny.write(train={"epochs": 1, "subset": 64}), device="cpu")
        images = digits_uint8()[:64]
        det.fit([images])
        det.calibrate([images[:40]])
        det.predict(images[:5])
        assert inside, "the detector never held the scoped switch"
        assert all(state["cudnn.conv.fp32_precision"] == "ieee" for state in inside if "cudnn.conv.fp32_precision"
                   in state)  # exact fp32 while it computes
        after = tf32_getters()
        assert after == before  # equal, and none raises
    finally:
        for path, name, value in snapshot:
            setattr(utils_precision._switch(path), name, value)


def test_the_scoped_switch_restores_the_switches_of_older_pytorch_too(monkeypatch):
    cudnn, matmul = SimpleNamespace(allow_tf32=True), SimpleNamespace(allow_tf32=False)  # PyTorch < 2.9: no .conv
    monkeypatch.setattr(torch.backends, "cudnn", cudnn)
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    with utils_precision.exact_fp32(torch.device("cuda", 0)):
        assert cudnn.allow_tf32 is False and matmul.allow_tf32 is False
    assert cudnn.allow_tf32 is True and matmul.allow_tf32 is False  # the caller's, not a default


def test_off_cuda_the_switch_touches_nothing(monkeypatch):
    cudnn = SimpleNamespace(allow_tf32=True)
    monkeypatch.setattr(torch.backends, "cudnn", cudnn)
    with utils_precision.exact_fp32(torch.device("cpu")):
        assert cudnn.allow_tf32 is True


def test_the_arithmetic_follows_the_device_and_the_device_is_in_the_keys(tiny, monkeypatch):
    cfg = load_config(tiny.write())
    gpu = DistContext(0, 1, 0, torch.device("cuda", 0))
    cfg.amp = False
    assert mode_of(cfg, gpu) == "fp32"
    cfg.amp = True
    assert mode_of(cfg, gpu) == "fp16-autocast"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    ext = build_extractor(cfg)
    assert features_tag("fp32", ext, gpu.device) == "cuda-sm90-cudnn91002-fp32"
    assert features_tag("fp32", ext, torch.device("cpu")) == "cpu-fp32"
    ds = build_dataset("noise:uniform:4", "test", tiny.cfg["data_path"], 32)
    bid = ext.backbone_id(32)
    keys = {json.dumps(cache_key(bid, ds, "test", features_tag("fp32", ext, d), 8)) for d in ("cuda", "cpu")}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # another GPU generation
    keys.add(json.dumps(cache_key(bid, ds, "test", features_tag("fp32", ext, "cuda"), 8)))
    assert len(keys) == 3


def test_one_module_owns_the_tf32_switches():
    """Only utils/precision.py assigns a TF32 switch (fp32_precision, allow_tf32, set_float32_matmul_precision)."""
    pattern = re.compile(r"(fp32_precision\s*=|allow_tf32\s*=|set_float32_matmul_precision\()")
    owners = set()
    for path in library_files():
        if pattern.search(open(path).read()):
            owners.add(os.path.relpath(path, ROOT))
    assert owners == {"utils/precision.py"}


def test_bf16_is_used_only_on_a_cpu_with_native_bf16(tiny, monkeypatch, caplog):
    import utils.precision as features
    cfg = load_config(tiny.write())
    assert cfg.precision == "fp32" and mode_of(cfg, CPU) == "fp32"  # the default stays exact
    cfg.precision = "bf16"
    monkeypatch.setattr(features, "native_bf16", lambda: True)
    assert mode_of(cfg, CPU) == "bf16-autocast"
    monkeypatch.setattr(features, "native_bf16", lambda: False)
    monkeypatch.setattr(features, "_said_no_bf16", [])
    with caplog.at_level(logging.WARNING, logger="dlsr"):
        assert mode_of(cfg, CPU) == "fp32"
        assert mode_of(cfg, CPU) == "fp32"
    said = [r.message for r in caplog.records if "no native bf16" in r.message]
    assert len(said) == 1 and "going on in fp32" in said[0]  # one line, once


def test_native_bf16_is_read_from_the_cpus_flags_line(monkeypatch):
    import io
    import re

    import utils.precision as precision
    real = open("/proc/cpuinfo").read() if os.path.isfile("/proc/cpuinfo") else ""
    flags = next((m.group(1).split() for m in re.finditer(r"^flags\s*:(.*)$", real, re.M)), [])
    precision.native_bf16.cache_clear()
    assert precision.native_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(flags))  # this machine
    for text, native in (("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16 sse\n", True),
                         ("flags\t: fpu amx_bf16\n", True),
                         ("flags\t: fpu avx2 avx512f\nflags\t: avx512_bf16\n", False),  # the first CPU's line
                         ("vmx flags\t: avx512_bf16\nflags\t: fpu\n", False),  # not the CPU's flags
                         ("flags\t: fpu avx512_bf16x\n", False), ("processor\t: 0\n", False)):
        monkeypatch.setattr(precision, "open", lambda *a, text=text, **k: io.StringIO(text), raising=False)
        precision.native_bf16.cache_clear()
        assert precision.native_bf16() is native, text

    def unreadable(*a, **k):
        raise PermissionError("/proc/cpuinfo")
    monkeypatch.setattr(precision, "open", unreadable, raising=False)
    precision.native_bf16.cache_clear()
    assert precision.native_bf16() is False
    monkeypatch.undo()
    precision.native_bf16.cache_clear()


def test_each_mode_is_its_autocast():
    from contextlib import nullcontext

    from utils.precision import autocast
    with pytest.warns(UserWarning, match="CUDA is not available"):  # torch says so and disables it off CUDA
        fp16 = autocast("fp16-autocast")
    bf16 = autocast("bf16-autocast")
    assert (fp16.device, fp16.fast_dtype) == ("cuda", torch.float16)
    assert (bf16.device, bf16.fast_dtype) == ("cpu", torch.bfloat16)
    assert isinstance(autocast("fp32"), nullcontext)


def test_precision_flags_reach_the_run(trained, tmp_path):
    out = tmp_path / "o"
    run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                  "--pretrained_ldm_cfg", trained.config, "--output_dir", str(out), "--no_plots", "--channels_last",
                  "--precision", "bf16", "--dataset", "digits@3", "--ood", "g=noise:gaussian:20")
    meta = json.loads((out / "results.json").read_text())["meta"]
    expected = "bf16-autocast" if mode_of(_bf16(trained.config), CPU) == "bf16-autocast" else "fp32"
    assert meta["precision"] == "cpu-" + expected + "+channels-last"


def test_the_fast_path_takes_the_fused_swish_on_b4_only_and_says_so_in_the_cache_key():
    from efficientnet_pytorch.utils import MemoryEfficientSwish

    from engine.extraction import backbone_features
    b4, lite = MultiLayerFeatures("efficientnet-b4", weights="random"), MultiLayerFeatures("efficientnet-lite0")
    assert features_tag("bf16-autocast", b4, "cpu") == "cpu-bf16-autocast+silu"
    assert features_tag("fp32", b4, "cpu") == "cpu-fp32"
    assert features_tag("bf16-autocast", lite, "cpu") == "cpu-bf16-autocast"
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    exact = backbone_features(b4, images, CPU, "fp32")
    backbone_features(b4, images, CPU, "bf16-autocast")
    assert b4.fused_swish and isinstance(b4.backbone._swish, torch.nn.SiLU)
    assert torch.equal(backbone_features(b4, images, CPU, "fp32"), exact)  # back to the release's x * sigmoid(x)
    assert not b4.fused_swish and isinstance(b4.backbone._swish, MemoryEfficientSwish)
    backbone_features(lite, images, CPU, "bf16-autocast")
    assert not lite.fused_swish and isinstance(lite.backbone._swish, torch.nn.ReLU6)  # Lite0 keeps its ReLU6
    lite.use_fused_swish(True)  # asked directly (bench/bench_precision.py): a no-op without a swish
    assert not lite.fused_swish and features_tag("bf16-autocast", lite, "cpu") == "cpu-bf16-autocast"
