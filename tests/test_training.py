"""engine/training.py through main.py: checkpoints, logs, resume inside an epoch, stop signals, the
output and log folders, learning rates and EMA by hand."""
import json
import math
import os
import re
import shutil
import signal
import sys
from contextlib import nullcontext

import pytest
import torch
import yaml

from cli import resolve_config
from datasets import build_dataset
from engine.training import (
    Trainer,
    base_lr,
    build_trainer,
    keep_log_before,
    lr_at,
    seed_step,
    train,
)
from errors import Preempted, UserError
from experiment.config import load_config
from models.features import standardize
from store.checkpoint import (
    load_checkpoint,
)
from tests.helpers import (
    CPU,
    ROOT,
    Forked,
    Tiny,
    error_line,
    hold_lock,
    last,
    run_inprocess,
    snapshot,
    try_evaluate,
)
from utils.distributed import DistContext


def tiny_trainer(t: Tiny, **sections):
    cfg = load_config(t.write(**sections))
    return build_trainer(cfg, CPU), cfg


class StopAfter:
    """A stop request that becomes true after ``n`` looks (the trainer looks once per micro-step)."""

    def __init__(self, n):
        self.n, self.name = n, "SIGTERM"

    def __bool__(self):
        self.n -= 1
        return self.n < 0


def weights(path):
    return torch.load(path, weights_only=True)["ema"]["weights"]


def assert_equal_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


SIGNAL_RUN = dict(train={"epochs": 6, "save_every": 10, "subset": 512, "batch_size": 16})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run the signalled ones must end equal to."""
    from tests.helpers import Tiny
    t = Tiny(tmp_path_factory.mktemp("signals"))
    run_inprocess("main.py", "--config", t.write("ref.yaml", output_dir=str(t.tmp / "ref"), **SIGNAL_RUN))
    return t.tmp / "ref" / "checkpoint-last.pth"


def copy_run(trained, tmp_path):
    """A copy of the shared trained run (3 epochs, batch 32, digits), to resume without touching it."""
    shutil.copytree(trained.ckpt, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def read_log(folder):
    with open(os.path.join(folder, "log.txt")) as f:
        return [json.loads(line) for line in f]


def assert_same_weights(a: dict, b: dict, atol=0.0, rtol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=rtol), (k, (a[k] - b[k]).abs().max().item())


def test_existing_checkpoints_need_resume_or_overwrite_and_lr_pairs_come_from_one_run(trained, tmp_path):
    import shutil
    shutil.copytree(trained.ckpt, tmp_path / "ck")
    cfg = trained.write("again.yaml", output_dir=str(tmp_path / "ck"))
    before = snapshot(tmp_path / "ck")
    line = error_line(run_inprocess("main.py", "--config", cfg, check=False))
    assert "already holds checkpoints" in line and "--resume" in line and "--overwrite" in line
    assert snapshot(tmp_path / "ck") == before
    run_inprocess("main.py", "--config", cfg, "--overwrite", "--seed", "1")  # a new run, its own id
    old, new = load_checkpoint(str(trained.ckpt / "checkpoint-0.pth")), load_checkpoint(str(tmp_path / "ck" / "checkpoint-last.pth"))
    assert old.run_id and new.run_id and old.run_id != new.run_id
    assert load_checkpoint(str(tmp_path / "ck" / "checkpoint-0.pth")).run_id == new.run_id
    line = error_line(try_evaluate(trained, tmp_path / "lr", "--pretrained_ldm_ckpt_first", str(trained.ckpt / "checkpoint-0.pth"),
                               "--pretrained_ldm_ckpt_end", str(tmp_path / "ck" / "checkpoint-last.pth"),
                               script="test_LR.py"))
    assert "different training runs" in line
    assert f"first: {trained.ckpt / 'checkpoint-0.pth'} (run {old.run_id[:8]})" in line  # the ids' first 8 characters
    assert f"end: {tmp_path / 'ck' / 'checkpoint-last.pth'} (run {new.run_id[:8]})" in line


def test_training_features_of_another_shape_are_refused(tiny):
    """train(features=...) (the API's and the bench scripts' path) takes (N, D) vectors only."""
    from engine.training import build_trainer
    cfg = load_config(tiny.write(train={"batch_size": 16, "subset": 64}))
    for shape in ((64, 511), (64,), (2, 64, 512)):
        with pytest.raises(UserError, match=rf"training features must be \(N, 512\), got {re.escape(str(shape))}"):
            build_trainer(cfg, DistContext(0, 1, 0, torch.device("cpu")), features=torch.zeros(shape))


def test_a_training_step_reads_the_device_once(tiny, monkeypatch):
    """Each read of a device value (item, tolist, bool, float) by our code is a wait for the GPU: one a
    step, the loss and the stop flag together. (PyTorch's own reads are not counted: AdamW's step
    counters live on the CPU; under AMP the grad scaler reads one flag.)"""
    from engine.training import build_trainer
    cfg = load_config(tiny.write(train={"batch_size": 16, "subset": 64}))
    # (float64 vectors, as numpy gives them: the trainer takes them as float32)
    trainer = build_trainer(cfg, DistContext(0, 1, 0, torch.device("cpu")), features=torch.randn(64, 512).double())
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _original=original, _name=name, **k):
            if sys._getframe(1).f_code.co_filename.startswith(tuple(ROOT + os.sep + d for d in ("engine", "utils"))):
                reads.append(_name)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counting)
    stats = trainer.train_one_epoch(0)
    monkeypatch.undo()
    assert stats["steps"] == 4 and reads == ["tolist"] * 4


def test_resume_takes_the_optimiser_settings_given_now(tiny):
    cfg = load_config(tiny.write(train={"epochs": 1, "weight_decay": 0.02}))
    train(cfg, CPU)
    cfg.train.weight_decay, cfg.train.betas, cfg.train.epochs = 0.3, [0.5, 0.6], 2
    trainer = build_trainer(cfg, CPU, resume=str(tiny.ckpt / "checkpoint-last.pth"))
    group = trainer.optimizer.param_groups[0]
    assert (group["weight_decay"], group["betas"]) == (0.3, (0.5, 0.6))
    assert trainer.start_epoch == 1 and len(trainer.optimizer.state) > 0  # the moments came back


def test_accumulation_trains_what_the_larger_batch_trains(tiny):
    """Batch 8 x 2 accumulation steps is batch 16: the same samples per optimiser step, the same
    noise, the same learning rates, to float rounding; and the trailing 8 images of 72 (which make
    no whole batch of 16) are dropped by both. A split changed on resume continues the same run."""
    settings = dict(train={"epochs": 2, "subset": 72, "batch_size": 16, "lr": 1e-3})
    big = train(load_config(tiny.write(output_dir=str(tiny.tmp / "big"), **settings)), CPU)
    split = load_config(tiny.write(output_dir=str(tiny.tmp / "split"), **settings))
    split.train.batch_size, split.train.accum_iter = 8, 2
    small = train(split, CPU)
    assert big.ema.num_updates == small.ema.num_updates == 2 * 4  # 72 // 16 = 4 optimiser steps an epoch

    def gap(a, b):  # the largest weight difference; AdamW turns rounding-level gradient differences into
        return max((a.model.state_dict()[n] - w).abs().max().item() for n, w in b.model.state_dict().items())
    # ~1e-5 here, as two ranks of batch 8 against one process of 16 (0.006 when the noise was drawn per micro-batch)
    assert gap(small, big) < 5e-5
    # a run of batch 16 resumed at 8 x 2 (the check compares 16 x 1 x 1 with 8 x 1 x 2: the same run)
    cfg = load_config(tiny.write(output_dir=str(tiny.tmp / "resumed"), train={**settings["train"], "epochs": 1}))
    train(cfg, CPU)
    cfg.train.epochs, cfg.train.batch_size, cfg.train.accum_iter = 2, 8, 2
    resumed = train(cfg, CPU, resume=str(tiny.tmp / "resumed" / "checkpoint-last.pth"))
    assert gap(resumed, big) < 5e-5


def test_a_resumed_run_keeps_its_id_and_lr_takes_the_pair(tiny, trained):
    cfg = tiny.write(train={"epochs": 2, "save_every": 5}, cache_dir=trained.cfg["cache_dir"])  # its features
    run_inprocess("main.py", "--config", cfg)
    first_id = load_checkpoint(str(tiny.ckpt / "checkpoint-0.pth")).run_id
    run_inprocess("main.py", "--config", cfg, "--epochs", "3", "--resume", str(tiny.ckpt / "checkpoint-last.pth"))
    assert load_checkpoint(str(tiny.ckpt / "checkpoint-last.pth")).run_id == first_id
    assert load_checkpoint(str(tiny.ckpt / "checkpoint-last.pth")).epoch == 2
    run_inprocess("test_LR.py", "--pretrained_ldm_ckpt_first", str(tiny.ckpt / "checkpoint-0.pth"),
                  "--pretrained_ldm_ckpt_end", str(tiny.ckpt / "checkpoint-last.pth"), "--pretrained_ldm_cfg", cfg,
                  "--no_plots", "--output_dir", str(tiny.tmp / "lr"))
    assert (tiny.tmp / "lr" / "results.json").is_file()


def test_overwrite_starts_a_new_log(tiny):
    cfg = tiny.write(train={"epochs": 3})
    run_inprocess("main.py", "--config", cfg)
    run_inprocess("main.py", "--config", cfg, "--epochs", "1", "--overwrite")
    assert [json.loads(line)["epoch"] for line in open(tiny.ckpt / "log.txt")] == [0]


@pytest.mark.parametrize("overhead,write_s,since_s,due", [
    (0.1, 1.0, 9.0, False), (0.1, 1.0, 10.0, True), (0.5, 2.0, 3.0, False), (0.5, 2.0, 4.0, True),
    (0.0, 0.5, 100.0, False), (1.0, 5.0, 0.0, True)])
def test_the_checkpoint_refresh_follows_its_overhead_budget(overhead, write_s, since_s, due):
    from engine.training import SaveClock
    now = [0.0]
    clock = SaveClock(overhead, clock=lambda: now[0])
    with clock.timed():
        now[0] += write_s
    now[0] += since_s
    assert clock.refresh_due() is due  # refreshed while the last write cost at most overhead x the time since


def test_training_reads_the_train_split(tiny_shared):
    # noise: sets draw other images for train and test, so the two splits can be told apart.
    trainer, cfg = tiny_trainer(tiny_shared, train={"dataset": "noise:uniform:64", "subset": None})
    extractor = trainer.extractor
    for split, same in (("train", True), ("test", False)):
        ds = build_dataset("noise:uniform:64", split, cfg.data_path, 32)
        with torch.no_grad():
            z = standardize(extractor(extractor.normalize(torch.stack([ds[i] for i in range(len(ds))]))),
                            extractor.indices)
        assert torch.allclose(trainer.cached, z, atol=1e-4) == same, split


def test_training_flags_reach_the_trainer(tiny_shared):
    args = ["--config", tiny_shared.write(), "--lr", "0.003", "--weight_decay", "0.07", "--batch_size", "16",
            "--subset", "128", "--seed", "4", "--accum_iter", "2", "--warmup_epochs", "1", "--min_lr", "1e-5",
            "--cosine_lr", "--epochs", "5", "--opt", "train.ema_decay=0.5", "--opt", "train.betas=[0.8,0.9]",
            "--opt", "lfdn.dropout=0.25", "--opt", "lfdn.num_res_blocks=3"]
    import importlib
    main = importlib.import_module("main")
    parsed = main.parse_args(args)
    cfg = resolve_config(parsed.config, vars(parsed), main.TRAIN_FLAGS)
    cfg.train.cosine_lr = parsed.cosine_lr
    trainer = build_trainer(cfg, CPU)
    group = trainer.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (0.003, 0.07, (0.8, 0.9))
    assert trainer.ema.decay == 0.5 and len(trainer.model.res_blocks) == 3
    assert trainer.model.res_blocks[0].out_layers[2].p == 0.25
    assert trainer.num_samples == 128 and trainer.steps_per_epoch() == 8
    assert (cfg.train.accum_iter, cfg.train.warmup_epochs, cfg.train.min_lr, cfg.train.cosine_lr,
            cfg.train.epochs, cfg.train.seed) == (2, 1, 1e-5, True, 5, 4)


def test_blr_scales_with_the_total_batch_by_hand(tiny_shared):
    cfg = load_config(tiny_shared.write(train={"lr": None, "blr": 1e-3, "batch_size": 32, "accum_iter": 3}))
    assert base_lr(cfg, 1) == pytest.approx(1e-3 * 32 * 3 / 256)
    assert base_lr(cfg, 4) == pytest.approx(1e-3 * 32 * 3 * 4 / 256)
    trainer = build_trainer(cfg, CPU)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 32 * 3 / 256)


def test_ema_decay_is_recomputed_by_hand_over_an_epoch(tiny_shared):
    # 16 updates: from the 9th on the configured 0.5 is below the warm-up value (1 + n) / (10 + n), so a
    # decay fixed at 0.9999 (or the warm-up alone) gives other weights than the configured one.
    trainer, _ = tiny_trainer(tiny_shared, train={"ema_decay": 0.5, "lr": 1e-2, "batch_size": 16})
    seen = [{k: v.clone() for k, v in trainer.model.state_dict().items()}]
    original = trainer.ema.update

    def recording(model):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        original(model)

    trainer.ema.update = recording
    trainer.train_one_epoch(0)
    ema = dict(seen[0])
    for n, weights in enumerate(seen[1:], start=1):
        d = min(0.5, (1 + n) / (10 + n))
        ema = {k: ema[k] - (1 - d) * (ema[k] - weights[k]) for k in ema}
    assert len(seen) == 17  # 16 optimizer steps; the decay is 0.5 from the 9th on
    for k, v in trainer.ema.module.state_dict().items():
        assert torch.allclose(v, ema[k], atol=1e-6), k


def test_data_order_changes_every_epoch_and_timesteps_cover_0_to_T_minus_1(tiny_shared):
    trainer, _ = tiny_trainer(tiny_shared)
    first = [b.clone() for b in trainer.batches(0)]
    assert all(torch.equal(a, b) for a, b in zip(first, trainer.batches(0)))  # the same epoch: the same order
    assert not torch.equal(first[0], next(iter(trainer.batches(1))))
    drawn = []
    original = trainer.diffusion.training_loss

    def recording(model, x0, t, noise):
        drawn.append(t.clone())
        return original(model, x0, t, noise)

    trainer.diffusion.training_loss = recording
    for epoch in range(3):
        trainer.train_one_epoch(epoch)
    t = torch.cat(drawn)
    assert t.min() == 0 and t.max() == 99 and len(t.unique()) > 90


def test_a_step_seeds_the_cpu_generator_and_on_a_gpu_that_gpus_as_torch_manual_seed_would(monkeypatch):
    """seed_step sets what torch.manual_seed sets for the generators a step draws from (dropout)."""
    expected = torch.Generator().manual_seed(1234).initial_seed()
    gpus = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)]  # stand-ins for cuda:0, cuda:1
    monkeypatch.setattr(torch.cuda, "default_generators", tuple(gpus))
    saved = torch.get_rng_state()
    try:
        seed_step(1234, torch.device("cpu"))
        assert torch.initial_seed() == expected and [g.initial_seed() for g in gpus] == [7, 7]
        drawn = torch.rand(3)
        torch.manual_seed(1234)
        assert torch.equal(drawn, torch.rand(3))
        seed_step(99, torch.device("cuda:1"))
        assert torch.initial_seed() == 99 and [g.initial_seed() for g in gpus] == [7, 99]
    finally:
        torch.set_rng_state(saved)


@pytest.mark.parametrize("accum", [1, 2])
def test_a_stop_inside_an_epoch_saves_and_the_resumed_run_equals_an_uninterrupted_one(tiny, monkeypatch, accum):
    settings = dict(train={"epochs": 3, "save_every": 5, "accum_iter": accum, "cosine_lr": True, "warmup_epochs": 1},
                    lfdn={"dropout": 0.1})
    full = load_config(tiny.write(output_dir=str(tiny.tmp / "full"), **settings))
    train(full, CPU)
    cfg = load_config(tiny.write(output_dir=str(tiny.tmp / "stopped"), **settings))
    original = Trainer.train_one_epoch

    def stop_in_epoch_1(self, epoch, start_step=0, loss_sum=0.0, stop=None):
        return original(self, epoch, start_step, loss_sum, StopAfter(2) if epoch == 1 else stop)

    monkeypatch.setattr(Trainer, "train_one_epoch", stop_in_epoch_1)
    with pytest.raises(Preempted, match=r"received: .*checkpoint-last.pth holds epoch 1 up to step \d of 8; "
                                        r"continue the run with the same command and --resume"):
        train(cfg, CPU)
    monkeypatch.setattr(Trainer, "train_one_epoch", original)
    last = load_checkpoint(str(tiny.tmp / "stopped" / "checkpoint-last.pth"))
    # true at the 3rd look (step 2): with accumulation over 2 steps, the stop waits for the optimiser step
    assert (last.epoch, last.in_progress["step"]) == (1, 3 if accum == 1 else 4)
    train(cfg, CPU, resume=str(tiny.tmp / "stopped" / "checkpoint-last.pth"))
    assert_equal_weights(weights(tiny.tmp / "stopped" / "checkpoint-last.pth"),
                         weights(tiny.tmp / "full" / "checkpoint-last.pth"))
    logged = [json.loads(line) for line in open(tiny.tmp / "stopped" / "log.txt")]
    reference = [json.loads(line) for line in open(tiny.tmp / "full" / "log.txt")]
    assert [r["epoch"] for r in logged] == [0, 1, 2]
    assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in reference], rel=1e-6)


def test_log_lines_of_epochs_to_be_rerun_are_dropped(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("".join(json.dumps({"epoch": e, "loss": 1.0}) + "\n" for e in range(5)) + "not json\n")
    keep_log_before(str(log), 2)
    assert [line for line in log.read_text().splitlines()] == [json.dumps({"epoch": 0, "loss": 1.0}),
                                                               json.dumps({"epoch": 1, "loss": 1.0}), "not json"]


def test_checkpoint_last_is_refreshed_after_every_epoch_when_saving_is_cheap(tiny):
    cfg = load_config(tiny.write(train={"epochs": 4, "save_every": 10, "save_overhead": 1.0}))
    train(cfg, CPU)
    saved = [json.loads(line)["saved"] for line in open(tiny.ckpt / "log.txt")]
    assert saved == [["checkpoint-0.pth", "checkpoint-last.pth"]] + [["checkpoint-last.pth"]] * 3
    cfg = load_config(tiny.write(output_dir=str(tiny.tmp / "never"),
                                 train={"epochs": 4, "save_every": 10, "save_overhead": 0.0}))
    train(cfg, CPU)
    saved = [json.loads(line)["saved"] for line in open(tiny.tmp / "never" / "log.txt")]
    assert saved == [["checkpoint-0.pth", "checkpoint-last.pth"], [], [], ["checkpoint-last.pth"]]


@pytest.mark.parametrize("sig", [signal.SIGUSR1])  # SIGTERM: tests/test_loader.py, test_two_ranks.py, test_multinode.py
def test_a_signal_to_main_py_saves_exits_143_and_resume_loses_nothing(tiny, uninterrupted, sig):
    # The reference run's feature cache: the signal comes after two epochs, not during an extraction.
    config = tiny.write("run.yaml", output_dir=str(tiny.tmp / "run"), cache_dir=str(uninterrupted.parents[1] / "cache"),
                        **SIGNAL_RUN)
    run = Forked("main.py", [["--config", config]], [{}])  # main.py's process, without an interpreter's start-up
    log = tiny.tmp / "run" / "log.txt"
    run.until(lambda: log.is_file() and len(log.read_text().splitlines()) >= 2)
    os.kill(run.pids[0], sig)
    result = run.wait(timeout=120, check=False)[0]
    err = result.stderr
    assert result.returncode == 143, err[-3000:]
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith(f"stopped: {sig.name} received: ") and "--resume" in last_line
    stopped = load_checkpoint(str(tiny.tmp / "run" / "checkpoint-last.pth"))
    assert stopped.epoch >= 1
    run_inprocess("main.py", "--config", config, "--resume", str(tiny.tmp / "run" / "checkpoint-last.pth"))
    assert_equal_weights(weights(tiny.tmp / "run" / "checkpoint-last.pth"), weights(uninterrupted))
    epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert epochs == list(range(6))


def test_a_new_run_from_the_weights_is_the_documented_way_to_change_them(trained, tmp_path):
    ck = str(trained.ckpt / "checkpoint-last.pth")
    run_inprocess("main.py", "--config", trained.config, "--pre_ckpt_path", ck, "--batch_size", "64", "--epochs", "1",
                  "--output_dir", str(tmp_path / "new"))
    assert load_checkpoint(str(tmp_path / "new" / "checkpoint-last.pth")).run_id != load_checkpoint(ck).run_id
    assert "--pre_ckpt_path" in open(os.path.join(ROOT, "docs", "OPERATIONS.md")).read()


def test_resuming_a_complete_run_says_so_and_leaves_the_folder_as_it_was(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for epochs in ("3", "2"):
        proc = run_inprocess("main.py", "--config", trained.config, "--resume", str(run / "checkpoint-last.pth"),
                             "--epochs", epochs, "--output_dir", str(run))
        assert proc.returncode == 0
        line = [x for x in proc.stderr.splitlines() if "complete" in x]
        assert len(line) == 1 and "holds epoch 2 of a run of 3 epoch(s)" in line[0]
        assert ("asks for fewer" in line[0]) == (epochs == "2")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # config.yaml too


def test_a_continued_run_that_trains_more_epochs_is_still_allowed(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    run_inprocess("main.py", "--config", trained.config, "--resume", str(run / "checkpoint-last.pth"), "--epochs", "4",
                  "--output_dir", str(run))
    ck = load_checkpoint(str(run / "checkpoint-last.pth"))
    assert ck.epoch == 3 and ck.config["train"]["epochs"] == 4 and ck.world_size == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 4  # agrees with the checkpoint


def test_sigusr1_during_feature_extraction_is_caught_and_saves_after_the_first_step(tiny, monkeypatch):
    import engine.extraction as features
    original = features.extract_features

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)  # as SLURM's --signal=USR1@... during the extraction
        return original(*args, **kwargs)
    monkeypatch.setattr(features, "extract_features", signalled)
    proc = run_inprocess("main.py", "--config", tiny.write(), check=False)
    assert proc.returncode == 143 and "stopped: SIGUSR1 received" in last(proc)
    ck = load_checkpoint(str(tiny.ckpt / "checkpoint-last.pth"))
    assert ck.epoch == 0 and ck.in_progress["step"] == 1
    assert any("-train-" in n for n in os.listdir(tiny.tmp / "cache"))  # the extraction was kept


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


# ------------------------------------------------------------------ one folder, one run (issue 35)

def test_a_run_is_complete_at_its_last_epoch_saved_whole_and_not_before(tiny):
    from engine.training import completion
    cfg = load_config(tiny.write(train={"epochs": 3}))
    assert completion(cfg, "c.pth", 1, None) is None  # one epoch to go
    assert completion(cfg, "c.pth", 2, {"step": 4}) is None  # saved inside its last epoch
    assert completion(cfg, "c.pth", None, None) is None
    line = completion(cfg, "c.pth", 2, None)
    assert line.startswith("c.pth holds epoch 2 of a run of 3 epoch(s): the run is complete;") and "fewer" not in line
    assert "(--epochs 3 asks for fewer)" in completion(cfg, "c.pth", 4, None)


def test_resume_auto_starts_continues_or_refuses_by_what_the_folder_holds(tiny):
    cfg = tiny.write(train={"epochs": 1})
    proc = run_inprocess("main.py", "--config", cfg, "--resume", "auto")
    assert "holds no run: starting a new one" in proc.stderr and load_checkpoint(str(tiny.ckpt / "checkpoint-last.pth")).epoch == 0
    first = load_checkpoint(str(tiny.ckpt / "checkpoint-last.pth")).run_id
    proc = run_inprocess("main.py", "--config", cfg, "--resume", "auto", "--epochs", "2")
    assert "continuing the run in" in proc.stderr
    ck = load_checkpoint(str(tiny.ckpt / "checkpoint-last.pth"))
    assert ck.epoch == 1 and ck.run_id == first  # the same run, continued
    proc = run_inprocess("main.py", "--config", cfg, "--resume", "auto", "--epochs", "2")
    assert "the run is complete" in proc.stderr and proc.returncode == 0
    before = (tiny.ckpt / "checkpoint-last.pth").read_bytes()
    proc = run_inprocess("main.py", "--config", cfg, "--resume", "auto", "--seed", "5", check=False)
    assert proc.returncode == 2 and "holds another run (train.seed: 5 now, the run's 0)" in last(proc)
    assert (tiny.ckpt / "checkpoint-last.pth").read_bytes() == before


def test_a_resume_into_another_runs_folder_is_refused_and_continues_where_its_checkpoint_is(tiny):
    a = tiny.write("a.yaml", output_dir=str(tiny.tmp / "A"), train={"epochs": 1})
    b = tiny.write("b.yaml", output_dir=str(tiny.tmp / "B"), train={"epochs": 1})
    run_inprocess("main.py", "--config", a)
    run_inprocess("main.py", "--config", b)
    b_before = {p.name: p.read_bytes() for p in (tiny.tmp / "B").iterdir() if p.is_file()}
    ck = str(tiny.tmp / "A" / "checkpoint-last.pth")
    proc = run_inprocess("main.py", "--config", a, "--resume", ck, "--epochs", "2", "--output_dir",
                         str(tiny.tmp / "B"), check=False)
    assert proc.returncode == 2 and "holds another run" in last(proc) and "one folder, one run" in last(proc)
    assert {p.name: p.read_bytes() for p in (tiny.tmp / "B").iterdir() if p.is_file()} == b_before
    # without --output_dir: where the checkpoint is, whatever the config names (and one line says so)
    proc = run_inprocess("main.py", "--config", b, "--resume", ck, "--epochs", "2")
    assert f"continuing the run in {tiny.tmp / 'A'}, where its checkpoint is" in proc.stderr
    assert load_checkpoint(ck).epoch == 1 and {p.name: p.read_bytes() for p in (tiny.tmp / "B").iterdir()
                                               if p.is_file()} == b_before
    # into an empty folder: allowed (a copy of the run goes on there)
    run_inprocess("main.py", "--config", a, "--resume", ck, "--epochs", "3", "--output_dir", str(tiny.tmp / "C"))
    assert load_checkpoint(str(tiny.tmp / "C" / "checkpoint-last.pth")).run_id == load_checkpoint(ck).run_id


def test_a_log_folder_belongs_to_its_run(tiny):
    logs = tiny.tmp / "logs"
    a = tiny.write("a.yaml", output_dir=str(tiny.tmp / "A"), log_dir=str(logs), train={"epochs": 1})
    run_inprocess("main.py", "--config", a)
    kept = (logs / "log.txt").read_text(), (logs / "config.yaml").read_text()
    assert json.loads(kept[0].splitlines()[0])["run_id"] == load_checkpoint(str(tiny.tmp / "A" / "checkpoint-last.pth")).run_id
    b = tiny.write("b.yaml", output_dir=str(tiny.tmp / "B"), log_dir=str(logs), train={"epochs": 1})
    proc = run_inprocess("main.py", "--config", b, check=False)
    assert proc.returncode == 2 and "log folder" in last(proc) and "holds the log of another run" in last(proc)
    assert ((logs / "log.txt").read_text(), (logs / "config.yaml").read_text()) == kept
    assert not (tiny.tmp / "B" / "checkpoint-0.pth").exists()  # refused before any work
    # a second run given the same --log_dir while the first holds it: the folder's lock
    with hold_lock(logs / ".lock"):
        proc = run_inprocess("main.py", "--config", a, "--resume", "auto", "--epochs", "2", check=False)
    assert proc.returncode == 2 and "log folder" in last(proc) and "in use by another run" in last(proc)
    run_inprocess("main.py", "--config", a, "--resume", "auto", "--epochs", "2")  # its own run: welcome
    assert [json.loads(x)["epoch"] for x in (logs / "log.txt").read_text().splitlines()] == [0, 1]


def test_a_run_resumed_on_another_subset_is_refused(trained, tmp_path):
    proc = run_inprocess("main.py", "--config", trained.config, "--resume", str(trained.ckpt / "checkpoint-last.pth"),
                         "--epochs", "5", "--subset", "128", "--output_dir", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "train.subset: 128 now, the run's 256" in last(proc)


def test_a_two_process_checkpoint_resumed_by_one_process_is_another_effective_batch(trained, tmp_path):
    obj = torch.load(str(trained.ckpt / "checkpoint-last.pth"), weights_only=True)
    obj["world_size"] = 2  # written by two processes of batch 32
    path = tmp_path / "two.pth"
    torch.save(obj, path)
    proc = run_inprocess("main.py", "--config", trained.config, "--resume", str(path), "--epochs", "5",
                         "--output_dir", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2
    assert "effective batch: 32 (32 x 1 process(es) x 1 accumulation) now, the run's 64 (32 x 2" in last(proc)
    proc = run_inprocess("main.py", "--config", trained.config, "--resume", str(path), "--epochs", "5",
                         "--batch_size", "64", "--output_dir", str(tmp_path / "o"))  # the same global batch: allowed
    assert proc.returncode == 0


def test_the_configs_save_overhead_reaches_the_trainers_clock(tiny):
    trainer, _ = tiny_trainer(tiny, train={"save_overhead": 0.25})
    assert trainer.saves.overhead == 0.25


def test_a_stop_at_an_epochs_last_step_saves_that_epoch_even_when_no_refresh_is_due(tiny, monkeypatch):
    """With saving costly (no refresh due), a stop asked at the epoch's last step still writes
    checkpoint-last.pth holding that epoch, complete, as the message says."""
    cfg = load_config(tiny.write(train={"epochs": 4, "save_every": 100, "save_overhead": 0.0}))
    steps = 256 // 32
    stop = StopAfter(steps * 2 + steps - 1)  # true at the last step of epoch 2
    monkeypatch.setattr("engine.training.stop_requests", lambda: nullcontext(stop))
    monkeypatch.setattr("engine.training.SaveClock.refresh_due", lambda self: False)  # never due
    with pytest.raises(Preempted, match=r"holds epoch 2 \(complete\)"):
        train(cfg, CPU)
    ck = load_checkpoint(str(tiny.ckpt / "checkpoint-last.pth"))
    assert ck.epoch == 2 and not ck.in_progress


def test_the_optimiser_is_fused_on_cuda_so_the_grad_scaler_reads_nothing(tiny, monkeypatch):
    """On CUDA, AdamW(fused=True) takes the grad scaler's inf check on the device: no .item() a step."""
    from types import SimpleNamespace

    from engine.training import training_model
    made = []
    real = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: made.append(kw) or real(params, **{
        k: v for k, v in kw.items() if k != "fused"}))
    cfg = load_config(tiny.write())
    training_model(cfg, SimpleNamespace(device=torch.device("cpu"), world_size=1, cuda=True), 512, None)
    training_model(cfg, CPU, 512, None)
    assert [kw["fused"] for kw in made] == [True, None]


def test_what_a_folder_or_log_holds_besides_a_run_is_read_as_it_is(trained, tmp_path):
    """--resume auto where the folder holds checkpoints but no checkpoint-last.pth; a log whose lines
    are not all JSON run lines (an older version's, a cut line): only lines naming a run_id count."""
    folder = tmp_path / "o"
    folder.mkdir()
    shutil.copy(trained.ckpt / "checkpoint-0.pth", folder / "checkpoint-0.pth")
    proc = run_inprocess("main.py", "--config", trained.config, "--output_dir", str(folder), "--resume", "auto",
                         check=False)
    assert proc.returncode == 2 and "holds checkpoints (checkpoint-0.pth) but no checkpoint-last.pth" in last(proc)
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "log.txt").write_text('epoch 0 loss 0.5\n{"epoch": 0}\n[1, 2]\n{"run_id": "0123456789abcdef", "ep\n')
    cfg = trained.write("own-log.yaml", output_dir=str(tmp_path / "new"), log_dir=str(logs),
                        train={"epochs": 1})
    run_inprocess("main.py", "--config", cfg)  # nothing in that log names a run: it is taken
    with open(logs / "log.txt", "a") as f:
        f.write('{"epoch": 5, "run_id": "fedcba9876543210"}\n')
    proc = run_inprocess("main.py", "--config", cfg, "--resume", "auto", "--epochs", "2", check=False)
    assert proc.returncode == 2 and "holds the log of another run (run fedcba98)" in last(proc)


def test_too_few_images_for_one_batch_and_a_pre_ckpt_of_another_width_are_refused_in_one_line(trained, tmp_path):
    cfg = trained.write("few.yaml", output_dir=str(tmp_path / "few"), train={"subset": 20, "batch_size": 32})
    proc = run_inprocess("main.py", "--config", cfg, check=False)
    assert proc.returncode == 2 and "20 training images give no full batch of 32 x 1 process(es) x 1 " \
                                    "accumulation; lower --batch_size" in last(proc)
    wide = trained.write("wide.yaml", output_dir=str(tmp_path / "wide"), lfdn={"model_channels": 96})
    proc = run_inprocess("main.py", "--config", wide, "--pre_ckpt_path", str(trained.ckpt / "checkpoint-last.pth"),
                         check=False)
    assert proc.returncode == 2 and "(--pre_ckpt_path) does not fit the LFDN of this config: " in last(proc)
    assert "size mismatch" in last(proc)
    assert not (tmp_path / "wide" / "checkpoint-0.pth").exists()


def test_a_checkpoint_that_cannot_be_written_says_so_and_keeps_the_earlier_ones(tiny, monkeypatch):
    import engine.training as training_module
    cfg = load_config(tiny.write(train={"epochs": 2, "save_every": 1}))
    real = training_module.save_checkpoint
    calls = []

    def full_disk(payload, path):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(payload, path)

    monkeypatch.setattr(training_module, "save_checkpoint", full_disk)
    with pytest.raises(UserError, match=r"cannot write checkpoint .*checkpoint-1.pth'?: no space left on device; "
                                        r"the checkpoints written before are left as they were"):
        train(cfg, CPU)
    assert load_checkpoint(str(tiny.ckpt / "checkpoint-0.pth")).epoch == 0
    assert load_checkpoint(str(tiny.ckpt / "checkpoint-last.pth")).epoch == 0
