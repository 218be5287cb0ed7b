"""The GPU path without a GPU (issue 28): every collective receives tensors on the run's device
(NCCL takes CUDA tensors only), every rank issues the same sequence of collectives, TF32 is off
and the device is in the keys, ``.to()`` moves all state, device choice under torchrun, and a
SIGTERM to the process group of a run with decoding workers saves instead of crashing.

A CUDA device cannot be had here, so a context on the ``meta`` device stands in for it: a tensor
left on the CPU (what NCCL refuses) is then on another device than the context's, as on a GPU."""
import copy
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import utils.distributed as distributed
from errors import UserError
from tests.helpers import ROOT, run_inprocess, run_script
from utils.checkpoint import load_checkpoint
from utils.config import load_config
from utils.distributed import (COLLECTIVE_LOG_ENV, DistContext, all_reduce_mean, all_reduce_sum, barrier,
                               broadcast_from, gather_interleaved, resolve_device)
from utils.features import cache_key, compute_mode, precision_tag
from utils.model_factory import build_extractor

FAKE_GPU = torch.device("meta")


class DeviceCheckingCollectives:
    """Stands in for torch.distributed: refuses, as NCCL does, any tensor not on ``device``."""

    def __init__(self, device):
        self.device, self.calls = device, []

    def _check(self, op, tensors):
        for t in tensors:
            assert t.device == self.device, f"{op} got a tensor on {t.device}, the run is on {self.device}"
        self.calls.append(op)

    def all_gather(self, parts, t):
        self._check("all_gather", [t, *parts])

    def all_reduce(self, t):
        self._check("all_reduce", [t])

    def broadcast(self, t, src):
        self._check("broadcast", [t])

    def barrier(self):
        self._check("barrier", [])


@pytest.fixture
def fake_gpu_run(monkeypatch):
    fake = DeviceCheckingCollectives(FAKE_GPU)
    monkeypatch.setattr(distributed, "dist", fake)
    return DistContext(0, 2, 0, FAKE_GPU), fake


def test_collectives_hand_over_cpu_tensors_on_the_runs_device(fake_gpu_run):
    """The first torchrun extraction on GPUs crashed: image keys (CPU int64) went to all_gather as they were."""
    ctx, fake = fake_gpu_run
    keys = torch.arange(10, dtype=torch.int64)  # (N,) on the CPU, as image_keys gives them
    feats = torch.zeros(10, 4, device=FAKE_GPU)
    assert gather_interleaved(keys[:5], 10, ctx, block=5).dtype == torch.int64
    assert gather_interleaved(feats[:5], 10, ctx, block=5).device == FAKE_GPU
    broadcast_from(torch.zeros(3), 1, ctx)
    all_reduce_sum(torch.zeros(3, dtype=torch.float64), ctx)
    all_reduce_mean(torch.zeros(2), ctx)
    barrier(ctx)
    assert fake.calls == ["all_gather", "all_gather", "broadcast", "all_reduce", "all_reduce", "barrier"]


def test_no_module_calls_torch_distributed_collectives_but_the_one_that_checks_devices():
    offenders = []
    for folder in ("utils", "models", "datasets"):
        for path in Path(ROOT, folder).glob("*.py"):
            if path.name == "distributed.py":
                continue
            text = path.read_text()
            for op in ("all_reduce(", "all_gather(", "broadcast(", "barrier(", "reduce_scatter(", "gather("):
                if f"dist.{op}" in text:
                    offenders.append(f"{path.name}: dist.{op}")
    assert offenders == []


def test_fp32_on_cuda_is_true_fp32_and_the_device_is_in_the_keys(tiny, monkeypatch):
    cfg = load_config(tiny.write())
    cfg.amp = False
    switches = [torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul]
    before = [s.fp32_precision for s in switches]
    try:
        for switch in switches:
            switch.fp32_precision = "tf32"  # cuDNN's default on Ampere and Hopper
        gpu = DistContext(0, 1, 0, torch.device("cuda", 0))
        assert compute_mode(cfg, gpu) == "fp32"
        assert [s.fp32_precision for s in switches] == ["ieee"] * 3
    finally:
        for switch, value in zip(switches, before):
            switch.fp32_precision = value
    cfg.amp = True
    assert compute_mode(cfg, gpu) == "fp16-autocast"
    ext = build_extractor(cfg)
    assert precision_tag("fp32", ext, gpu.device) == "cuda-fp32"
    assert precision_tag("fp32", ext, torch.device("cpu")) == "cpu-fp32"
    from datasets import build_dataset
    ds = build_dataset("noise:uniform:4", "test", tiny.cfg["data_path"], 32)
    bid = ext.backbone_id(32)
    assert cache_key(bid, ds, "test", precision_tag("fp32", ext, "cuda"), 8) != \
        cache_key(bid, ds, "test", precision_tag("fp32", ext, "cpu"), 8)


def test_resolve_device_under_torchrun(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda", local_rank=1, world_size=2) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=3, world_size=4) == torch.device("cuda", 3)
    with pytest.raises(UserError, match="names one GPU.*CUDA_VISIBLE_DEVICES"):
        resolve_device("cuda:1", local_rank=0, world_size=2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # one process: the GPU asked for
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.distributed_context("cuda:1") as ctx:
        assert ctx.device == torch.device("cuda", 1)
    assert chosen == [torch.device("cuda", 1)]  # the current device follows, so kernels go there too


def test_workers_per_rank_share_the_nodes_cores(tiny, monkeypatch):
    cfg = load_config(tiny.write(num_workers=None))
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert cfg.workers(True, 1) == 8 and cfg.workers(True, 4) == 3 and cfg.workers(True, 16) == 1
    assert cfg.workers(False, 1) == 0


def test_decoding_workers_fit_dev_shm(tmp_path, monkeypatch):
    from utils import features
    monkeypatch.setattr(features.shutil, "disk_usage", lambda _: SimpleNamespace(free=64 * 2 ** 20))
    batch = 64 * 224 * 224 * 3  # 9.6 MB: two per worker, half of 64 MB free
    assert features.shm_workers(8, batch) == 1
    assert features.shm_workers(8, 64 * 32 * 32 * 3) == 8


def test_to_moves_every_piece_of_scoring_state(tiny):
    from utils.detector import DLSRDetector
    det = DLSRDetector(tiny.write(train={"epochs": 1, "subset": 64}, eval={"layer_norm": True}))
    z = torch.randn(64, 512)
    det.fit_features(z)
    det.predict_features(z[:4])  # computes the layer statistics
    det.to("cpu")
    assert det.predict_features(z[:4]).shape == (4,)
    scorer = copy.deepcopy(det.scorer)
    assert scorer._layer_stats and scorer.train_z is not None
    scorer.mode = "fp16-autocast"  # as it was on a GPU
    scorer.to(DistContext(0, 1, 0, FAKE_GPU))
    tensors = [*scorer.extractor.parameters(), *scorer.extractor.buffers(), scorer.train_z,
               *[p for m in scorer.models.values() for p in m.parameters()],
               *[t for stats in scorer._layer_stats.values() for pair in stats for t in pair]]
    assert all(t.device == FAKE_GPU for t in tensors)
    assert scorer.mode == "fp32" and scorer.ctx.device == FAKE_GPU  # the arithmetic follows the device


# ------------------------------------------------------------------ two ranks, every collective recorded

def sequences(stem):
    files = sorted(Path(stem).parent.glob(Path(stem).name + ".rank*"))
    return [f.read_text().splitlines() for f in files]


def assert_same_sequence(stem):
    seqs = sequences(stem)
    assert len(seqs) == 2 and seqs[0], "no collectives recorded"
    assert seqs[0] == seqs[1], "the ranks issued different collectives"
    return seqs[0]


def run_recorded(tmp_path, name, script, *args):
    stem = str(tmp_path / f"{name}.collectives")
    os.environ[COLLECTIVE_LOG_ENV] = stem
    try:
        run_script(script, *args, torchrun=2)
    finally:
        del os.environ[COLLECTIVE_LOG_ENV]
    return assert_same_sequence(stem)


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    from tests.helpers import Tiny
    t = Tiny(tmp_path_factory.mktemp("ranked"))
    # Training from images on two ranks (no cache): each step's one all-reduce, saves and barriers.
    t.config = t.write(train={"epochs": 2, "subset": 96, "batch_size": 16, "cache_features": False},
                       eval={"ood": {"few": "noise:gaussian:20"}, "batch_size": 64})
    seq = run_recorded(t.tmp, "train", "main.py", "--config", t.config)
    # 3 steps an epoch (96 / (16 x 2)) of one all-reduce each, and the output folder check (ranks_holding)
    assert seq.count("all_reduce (2,) torch.float32") == 2 * 3 + 1
    # From cached features (extracted by both ranks together: the keys and features gathered).
    seq = run_recorded(t.tmp, "train-cached", "main.py", "--config", t.config, "--epochs", "1", "--output_dir",
                       str(t.tmp / "cached"), "--opt", "train.cache_features=true")
    assert sum(line.startswith("all_gather") for line in seq) == 2
    return t


@pytest.mark.parametrize("warm", [False, True])
def test_two_rank_evaluation_with_layer_norm_and_draws_equals_one_process(ranked, warm):
    """20 OOD images in batches of 64: rank 1 gets no reconstruction batch; the layer statistics
    need the training features (a collective cache decision) all the same."""
    t = ranked
    ckpt = str(t.ckpt / "checkpoint-last.pth")
    common = ["--pretrained_ldm_ckpt", ckpt, "--pretrained_ldm_cfg", t.config, "--layer_norm", "--noise_draws", "2",
              "--no_plots", "--baselines", "knn", "--cache_dir", str(t.tmp / ("warm" if warm else "cold"))]
    if warm:
        run_inprocess("test_mse_mfsim.py", *common, "--output_dir", str(t.tmp / "warm-fill"))
    seq = run_recorded(t.tmp, f"eval-{warm}", "test_mse_mfsim.py", *common, "--output_dir", str(t.tmp / f"e2-{warm}"))
    assert any(line.startswith("all_gather") for line in seq) != warm  # extraction only when cold
    run_inprocess("test_mse_mfsim.py", *common, "--output_dir", str(t.tmp / f"e1-{warm}"))
    for name in ("ID", "few"):
        one = np.load(t.tmp / f"e1-{warm}" / "scores" / f"{name}.npy")
        two = np.load(t.tmp / f"e2-{warm}" / "scores" / f"{name}.npy")
        assert one.dtype.names == two.dtype.names and "kNN_k1" in one.dtype.names
        for field in one.dtype.names:
            assert np.allclose(one[field], two[field], rtol=1e-4, atol=1e-4), (name, field)  # threads round apart


def test_two_rank_predict_with_layer_norm_on_three_files_finishes_and_equals_one_process(ranked, tmp_path):
    """The review's hang: 3 files in chunks of 64, so rank 1 scores none; calibration included."""
    from tests.test_predict import save_digits
    t = ranked
    save_digits(tmp_path / "img", [1, 2, 3])
    common = ["--checkpoint", str(t.ckpt / "checkpoint-last.pth"), "--images", str(tmp_path / "img"),
              "--layer_norm", "--noise_draws", "2", "--calibration", "digits@0"]
    run_recorded(tmp_path, "predict", "predict.py", *common, "--output", str(tmp_path / "two.csv"),
                 "--cache_dir", str(tmp_path / "c2"))
    run_inprocess("predict.py", *common, "--output", str(tmp_path / "one.csv"), "--cache_dir", str(tmp_path / "c1"))
    rows = [list(csv.DictReader(open(tmp_path / f"{n}.csv"))) for n in ("one", "two")]
    assert [r["path"] for r in rows[0]] == [r["path"] for r in rows[1]] and len(rows[0]) == 3
    for a, b in zip(*rows):
        assert np.isclose(float(a["MFsim"]), float(b["MFsim"]), rtol=1e-4, atol=1e-4) and a["is_ood"] == b["is_ood"]


# ------------------------------------------------------------------ preemption with decoding workers

def test_sigterm_to_the_process_group_with_decoding_workers_saves_and_exits_143(tiny):
    """torchrun's agent and SLURM signal the whole group: the workers must not die first."""
    cfg = tiny.write(num_workers=2, train={"epochs": 40, "subset": 256, "batch_size": 16, "cache_features": False,
                                           "save_every": 1000})
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "main.py", "--config", cfg], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_txt, start = tiny.ckpt / "log.txt", time.time()
    while not (log_txt.is_file() and log_txt.read_text().strip()):
        assert proc.poll() is None and time.time() - start < 120, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    time.sleep(0.3)  # inside the next epoch, workers running
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped: SIGTERM received" in err and "killed by signal" not in err
    ck = load_checkpoint(str(tiny.ckpt / "checkpoint-last.pth"))
    assert 1 <= ck.epoch < 39


def test_a_training_step_reads_the_device_once(tiny, monkeypatch):
    """Each read of a device value (item, tolist, bool, float) by our code is a wait for the GPU: one a
    step, the loss and the stop flag together. (PyTorch's own reads are not counted: AdamW's step
    counters live on the CPU; under AMP the grad scaler reads one flag.)"""
    from utils.training import build_trainer
    cfg = load_config(tiny.write(train={"batch_size": 16, "subset": 64}))
    trainer = build_trainer(cfg, DistContext(0, 1, 0, torch.device("cpu")), features=torch.randn(64, 512))
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _original=original, _name=name, **k):
            if sys._getframe(1).f_code.co_filename.startswith(ROOT + os.sep + "utils"):
                reads.append(_name)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counting)
    stats = trainer.train_one_epoch(0)
    monkeypatch.undo()
    assert stats["steps"] == 4 and reads == ["tolist"] * 4


def test_a_process_that_exits_with_a_loader_left_open_does_not_wait_on_its_workers():
    """The workers ignore SIGTERM, which multiprocessing's exit handler sends them before it waits for
    them: without our handler (SIGKILL first) an error that leaves a loader open hung the exit."""
    script = (
        "import torch\n"
        "from utils.features import image_loader, decoded\n"
        "from utils.distributed import DistContext\n"
        "class DS(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 100\n"
        "    def __getitem__(self, i): return torch.zeros(4)\n"
        "it = decoded(image_loader(DS(), DistContext(0, 1, 0, torch.device('cpu')), 4, 2))\n"
        "next(it)\n"
        "raise SystemExit(3)  # an error, with the loader's iterator still referenced\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=60, capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr[-1000:]
