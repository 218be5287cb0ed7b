"""The opt-in fast CPU path: bf16 autocast (native bf16 CPUs only) and channels-last convolutions."""
import copy
import json
import logging

import torch

from datasets import build_dataset
from tests.helpers import run_inprocess
from utils.config import load_config
from utils.distributed import DistContext
from utils.features import EMULATED_BF16_ENV, compute_mode, features_for, precision_tag
from utils.model_factory import build_extractor

CPU = DistContext(0, 1, 0, torch.device("cpu"))


def test_bf16_is_used_only_on_a_cpu_with_native_bf16(tiny, monkeypatch, caplog):
    import utils.features as features
    cfg = load_config(tiny.write())
    assert cfg.precision == "fp32" and compute_mode(cfg, CPU) == "fp32"  # the default stays exact
    cfg.precision = "bf16"
    monkeypatch.setattr(features, "native_bf16", lambda: True)
    assert compute_mode(cfg, CPU) == "bf16-autocast"
    monkeypatch.setattr(features, "native_bf16", lambda: False)
    monkeypatch.setattr(features, "_said_no_bf16", [])
    with caplog.at_level(logging.WARNING, logger="dlsr"):
        assert compute_mode(cfg, CPU) == "fp32"
        assert compute_mode(cfg, CPU) == "fp32"
    said = [r.message for r in caplog.records if "no native bf16" in r.message]
    assert len(said) == 1 and "going on in fp32" in said[0]  # one line, once


def test_features_of_other_arithmetic_never_share_a_cache_file(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(EMULATED_BF16_ENV, "1")  # bf16's rounding, emulated where the CPU lacks it
    cfg = load_config(tiny.write(cache_dir=str(tmp_path / "cache"), extract_batch_size=8))
    ds = build_dataset("noise:uniform:8", "test", str(tmp_path), 32)
    bf16, cl_cfg = copy.deepcopy(cfg), copy.deepcopy(cfg)
    bf16.precision, cl_cfg.channels_last = "bf16", True
    plain, cl = build_extractor(cfg), build_extractor(cl_cfg)
    assert precision_tag("fp32", cl, "cpu") == "cpu-fp32+channels-last"
    assert precision_tag("bf16-autocast", plain, "cpu") == "cpu-bf16-autocast"
    assert compute_mode(bf16, CPU) == "bf16-autocast"
    runs = {"fp32": features_for(cfg, CPU, plain, ds, "test"), "bf16": features_for(bf16, CPU, plain, ds, "test"),
            "cl": features_for(cl_cfg, CPU, cl, ds, "test")}
    assert not any(r.from_cache for r in runs.values()) and len(list((tmp_path / "cache").iterdir())) == 3
    assert features_for(cfg, CPU, plain, ds, "test").from_cache
    diff_bf16 = (runs["bf16"].z - runs["fp32"].z).abs().max()
    diff_cl = (runs["cl"].z - runs["fp32"].z).abs().max()
    assert 0 < diff_bf16 < 1.0 and diff_cl < 1e-2  # bf16 rounds coarsely; channels-last at float level


def test_precision_flags_reach_the_run(trained, tmp_path):
    out = tmp_path / "o"
    run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                  "--pretrained_ldm_cfg", trained.config, "--output_dir", str(out), "--no_plots", "--channels_last",
                  "--precision", "bf16", "--dataset", "digits@3", "--ood", "g=noise:gaussian:20")
    meta = json.loads((out / "results.json").read_text())["meta"]
    expected = "bf16-autocast" if compute_mode(_bf16(trained.config), CPU) == "bf16-autocast" else "fp32"
    assert meta["precision"] == "cpu-" + expected + "+channels-last"


def _bf16(path):
    cfg = load_config(path)
    cfg.precision = "bf16"
    return cfg


def test_the_fast_path_takes_the_fused_swish_on_b4_only_and_says_so_in_the_cache_key():
    from efficientnet_pytorch.utils import MemoryEfficientSwish

    from models.features import MultiLayerFeatures
    from utils.features import backbone_features
    b4, lite = MultiLayerFeatures("efficientnet-b4", weights="random"), MultiLayerFeatures("efficientnet-lite0")
    assert precision_tag("bf16-autocast", b4, "cpu") == "cpu-bf16-autocast+silu"
    assert precision_tag("fp32", b4, "cpu") == "cpu-fp32"
    assert precision_tag("bf16-autocast", lite, "cpu") == "cpu-bf16-autocast"
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    exact = backbone_features(b4, images, CPU, "fp32")
    backbone_features(b4, images, CPU, "bf16-autocast")
    assert b4.fused_swish and isinstance(b4.backbone._swish, torch.nn.SiLU)
    assert torch.equal(backbone_features(b4, images, CPU, "fp32"), exact)  # back to the release's x * sigmoid(x)
    assert not b4.fused_swish and isinstance(b4.backbone._swish, MemoryEfficientSwish)
    backbone_features(lite, images, CPU, "bf16-autocast")
    assert not lite.fused_swish and isinstance(lite.backbone._swish, torch.nn.ReLU6)  # Lite0 keeps its ReLU6
