"""Training: main.py's checkpoints, log and config; cached and uncached features giving the same loss
curve; kill-and-resume to the same weights; the feature cache keyed by the backbone's weights; a
non-finite loss stopping the run; missing data in one line; the learning-rate schedule per step."""
import json
import math
import os

import pytest
import torch

from datasets import build_dataset
from models.features import MultiLayerFeatures
from tests.helpers import run_inprocess
from utils.checkpoint import load_checkpoint
from utils.config import load_config
from utils.distributed import DistContext
from utils.features import features_for
from utils.training import Trainer, lr_at, train

CPU = DistContext(0, 1, 0, torch.device("cpu"))


def read_log(folder):
    with open(os.path.join(folder, "log.txt")) as f:
        return [json.loads(line) for line in f]


def assert_same_weights(a: dict, b: dict, atol=0.0, rtol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=rtol), (k, (a[k] - b[k]).abs().max().item())


def test_main_writes_checkpoints_log_and_config(tiny):
    cfg = tiny.write()
    run_inprocess("main.py", "--config", cfg)
    assert sorted(os.listdir(tiny.ckpt)) == [".lock", "checkpoint-0.pth", "checkpoint-2.pth", "checkpoint-last.pth",
                                             "config.yaml", "log.txt"]  # .lock: held while a run writes here
    log = read_log(tiny.ckpt)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) and r["lr"] == 1e-3 for r in log)
    assert log[-1]["loss"] < log[0]["loss"]
    last = load_checkpoint(str(tiny.ckpt / "checkpoint-last.pth"))
    first = load_checkpoint(str(tiny.ckpt / "checkpoint-0.pth"))
    assert (first.epoch, last.epoch) == (0, 2)
    assert last.kind == "dlsr" and last.ema["num_updates"] == 3 * 8
    assert last.config["train"]["epochs"] == 3 and last.backbone["name"] == "efficientnet-lite0"
    assert {"state", "param_groups"} <= set(last.optimizer)
    assert load_config(str(tiny.ckpt / "config.yaml")).train.subset == 256


def test_cached_and_uncached_training_give_the_same_loss_curve(tiny):
    runs = {}
    for cache in (True, False):
        cfg = load_config(tiny.write(output_dir=str(tiny.tmp / f"run-{cache}"), train={"cache_features": cache,
                                                                                        "epochs": 2}))
        runs[cache] = train(cfg, CPU)
    curve = {c: [r["loss"] for r in read_log(tiny.tmp / f"run-{c}")] for c in runs}
    assert curve[True] == pytest.approx(curve[False], rel=1e-4)
    assert_same_weights(runs[True].model.state_dict(), runs[False].model.state_dict(), atol=1e-5, rtol=1e-3)


def test_killed_and_resumed_run_ends_with_the_same_weights(tiny, monkeypatch):
    settings = dict(train={"epochs": 4, "save_every": 1, "cosine_lr": True, "warmup_epochs": 1, "lr": 2e-3},
                    lfdn={"dropout": 0.1})
    full = train(load_config(tiny.write(output_dir=str(tiny.tmp / "full"), **settings)), CPU)

    cfg = load_config(tiny.write(output_dir=str(tiny.tmp / "killed"), **settings))
    original = Trainer.train_one_epoch

    def killed_at_epoch_2(self, epoch, *args):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch, *args)

    monkeypatch.setattr(Trainer, "train_one_epoch", killed_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, CPU)
    monkeypatch.setattr(Trainer, "train_one_epoch", original)
    assert load_checkpoint(str(tiny.tmp / "killed" / "checkpoint-last.pth")).epoch == 1
    assert not [f for f in os.listdir(tiny.tmp / "killed") if ".tmp" in f]

    resumed = train(cfg, CPU, resume=str(tiny.tmp / "killed" / "checkpoint-last.pth"))
    assert resumed.start_epoch == 2
    assert_same_weights(full.model.state_dict(), resumed.model.state_dict())
    assert_same_weights(full.ema.module.state_dict(), resumed.ema.module.state_dict())
    assert full.ema.num_updates == resumed.ema.num_updates
    assert [r["loss"] for r in read_log(tiny.tmp / "full")] == [r["loss"] for r in read_log(tiny.tmp / "killed")]


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


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tiny):
    cfg = tiny.write(train={"epochs": 2, "save_every": 1})
    run_inprocess("main.py", "--config", cfg)
    last = tiny.ckpt / "checkpoint-last.pth"
    before = last.read_bytes()
    proc = run_inprocess("main.py", "--config", cfg, "--resume", str(last), "--epochs", "4", "--lr", "1e30", check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: loss is") and "at epoch 2, step" in err
    assert last.read_bytes() == before
    assert not (tiny.ckpt / "checkpoint-2.pth").exists()


def test_missing_training_data_is_one_line(tiny):
    proc = run_inprocess("main.py", "--config", tiny.write(), "--dataset", "cifar10", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: not found under")
    assert "cifar-10-batches-py" in proc.stderr and "Traceback" not in proc.stderr


def test_lr_schedule_per_iteration(tiny):
    cfg = load_config(tiny.write(train={"epochs": 10, "warmup_epochs": 2, "cosine_lr": True, "min_lr": 1e-5}))
    assert lr_at(cfg, 1e-3, 0.0) == 0.0
    assert lr_at(cfg, 1e-3, 1.0) == pytest.approx(5e-4)
    assert lr_at(cfg, 1e-3, 2.0) == pytest.approx(1e-3)
    assert lr_at(cfg, 1e-3, 6.0) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert lr_at(cfg, 1e-3, 10.0) == pytest.approx(1e-5)
    cfg.train.cosine_lr = False
    assert lr_at(cfg, 1e-3, 7.3) == 1e-3
