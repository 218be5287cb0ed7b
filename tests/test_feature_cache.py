"""store/feature_cache.py: the cache key names everything the features depend on; a file of another key
or a damaged one is never used."""
import copy
import os
import shutil

import numpy as np
import torch

from datasets import build_dataset
from engine.extraction import features_for, features_tag, mode_of
from engine.factory import build_extractor
from experiment.config import load_config
from models.features import MultiLayerFeatures
from store.feature_cache import cache_path, read_valid
from tests.helpers import CPU, Exploit, try_evaluate
from utils.precision import EMULATED_BF16_ENV


def test_a_truncated_cache_file_is_called_damaged_and_rebuilt(trained, tmp_path, caplog):
    out = tmp_path / "o"
    cache = tmp_path / "cache"
    try_evaluate(trained, out, "--cache_dir", str(cache), "--ood", "g=noise:gaussian:50", check=True)
    before = np.load(out / "scores" / "g.npy")
    victim = next(p for p in cache.iterdir() if p.name.startswith("noise_gaussian"))
    victim.write_bytes(victim.read_bytes()[:100])
    proc = try_evaluate(trained, out, "--cache_dir", str(cache), "--ood", "g=noise:gaussian:50", check=True)
    assert "is damaged (unreadable); extracting again" in proc.stderr
    assert np.array_equal(np.load(out / "scores" / "g.npy"), before)
    assert torch.load(victim, weights_only=True)["features"].shape == (50, 512)


def test_a_cache_file_that_asks_to_run_code_is_called_damaged_not_run(tmp_path, caplog):
    marker, path = tmp_path / "pwned", tmp_path / "c.pt"
    key = {"dataset": "x"}
    torch.save({"key": key, "features": torch.zeros(4, 3), "image_keys": torch.zeros(4), "x": Exploit(marker)}, path)
    assert read_valid(str(path), key, (4, 3)) is None and "is damaged (unreadable)" in caplog.text
    assert not marker.exists()


def test_the_backbone_batch_alone_changes_the_cache_file(tiny, tmp_path):
    cfg = load_config(tiny.write(cache_dir=str(tmp_path / "cache"), extract_batch_size=8))
    ds = build_dataset("noise:uniform:16", "test", "", 32)
    extractor = build_extractor(cfg)
    a = features_for(cfg, CPU, extractor, ds, "test")
    cfg.extract_batch_size = 16
    b = features_for(cfg, CPU, extractor, ds, "test")
    assert not a.from_cache and not b.from_cache and len(os.listdir(tmp_path / "cache")) == 2
    assert torch.allclose(a.z, b.z, atol=1e-4)


def test_cache_path_names_the_set_split_and_key():
    key = {"dataset": {"name": "folder:dtd/images"}, "split": "test", "x": 1}
    path = cache_path("/c", key)
    assert os.path.basename(path).startswith("folder_dtd_images-test-") and path.endswith(".pt")
    assert cache_path("/c", {**key, "x": 2}) != path
    shutil.rmtree("/nonexistent", ignore_errors=True)


def test_a_feature_cache_file_of_another_key_is_never_used(tmp_path):
    from store.feature_cache import read_valid as _read_valid
    path = str(tmp_path / "f.pt")
    key = {"version": 4, "split": "test"}
    torch.save({"key": {**key, "split": "train"}, "features": torch.zeros(3, 5), "image_keys": torch.zeros(3)}, path)
    assert _read_valid(path, key, (3, 5)) is None  # the same file name, another key inside
    torch.save({"key": key, "features": torch.zeros(3, 5), "image_keys": torch.zeros(3)}, path)
    assert _read_valid(path, key, (3, 5)) is not None and _read_valid(path, key, (4, 5)) is None


def test_features_of_other_arithmetic_never_share_a_cache_file(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(EMULATED_BF16_ENV, "1")  # bf16's rounding, emulated where the CPU lacks it
    cfg = load_config(tiny.write(cache_dir=str(tmp_path / "cache"), extract_batch_size=8))
    ds = build_dataset("noise:uniform:8", "test", str(tmp_path), 32)
    bf16, cl_cfg = copy.deepcopy(cfg), copy.deepcopy(cfg)
    bf16.precision, cl_cfg.channels_last = "bf16", True
    plain, cl = build_extractor(cfg), build_extractor(cl_cfg)
    assert features_tag("fp32", cl, "cpu") == "cpu-fp32+channels-last"
    assert features_tag("bf16-autocast", plain, "cpu") == "cpu-bf16-autocast"
    assert mode_of(bf16, CPU) == "bf16-autocast"
    runs = {"fp32": features_for(cfg, CPU, plain, ds, "test"), "bf16": features_for(bf16, CPU, plain, ds, "test"),
            "cl": features_for(cl_cfg, CPU, cl, ds, "test")}
    assert not any(r.from_cache for r in runs.values()) and len(list((tmp_path / "cache").iterdir())) == 3
    assert features_for(cfg, CPU, plain, ds, "test").from_cache
    diff_bf16 = (runs["bf16"].z - runs["fp32"].z).abs().max()
    diff_cl = (runs["cl"].z - runs["fp32"].z).abs().max()
    assert 0 < diff_bf16 < 1.0 and diff_cl < 1e-2  # bf16 rounds coarsely; channels-last at float level


def test_feature_cache_is_keyed_by_backbone_weights(tiny, tmp_path):
    ds = build_dataset("noise:uniform:40", "train", str(tmp_path), 32)
    a = MultiLayerFeatures("efficientnet-lite0")
    sd = {k: v.clone() for k, v in a.backbone.state_dict().items()}
    sd["_conv_stem.weight"] *= 1.5
    b = MultiLayerFeatures("efficientnet-lite0", state_dict=sd)
    cfg = load_config(tiny.write(cache_dir=str(tmp_path / "cache"), extract_batch_size=16))
    fa = features_for(cfg, CPU, a, ds, "train")
    fb = features_for(cfg, CPU, b, ds, "train")
    again = features_for(cfg, CPU, a, ds, "train")
    assert not fa.from_cache and not fb.from_cache and again.from_cache
    assert len(os.listdir(tmp_path / "cache")) == 2
    assert torch.equal(again.z, fa.z) and torch.equal(again.keys, fa.keys) and not torch.allclose(fa.z, fb.z)
    assert torch.equal(fa.keys, fb.keys) and len(set(fa.keys.tolist())) == 40  # keys follow the images only
    cfg.backbone.input_size = 48
    other_size = features_for(cfg, CPU, a, build_dataset("noise:uniform:40", "train", str(tmp_path), 48), "train")
    assert not other_size.from_cache


def test_a_cache_file_that_cannot_be_written_costs_the_cache_not_the_run(tmp_path, monkeypatch, caplog):
    import errno
    import logging

    import store.feature_cache as feature_cache

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(feature_cache, "atomic_torch_save", full)
    path = str(tmp_path / "x.pt")
    with caplog.at_level(logging.WARNING, logger="dlsr"):
        feature_cache.store(path, {"k": 1}, torch.zeros(2, 3), torch.arange(2))
    assert f"cannot store features in the cache {path}: no space left on device; going on without it" in caplog.text
    assert not os.path.exists(path)
    monkeypatch.undo()
    feature_cache.store(path, {"k": 1}, torch.ones(2, 3), torch.arange(2))
    raw, keys = feature_cache.read_valid(path, {"k": 1}, (2, 3))
    assert torch.equal(raw, torch.ones(2, 3)) and torch.equal(keys, torch.arange(2))
    assert feature_cache.read_valid(path, {"k": 2}, (2, 3)) is None and feature_cache.read_valid(path, {"k": 1}, (3, 3)) is None
