"""The second reliability battery: preemption (SIGTERM / SIGUSR1 mid-epoch, resume to the same
weights, log.txt without repeats), checkpoint-last refreshed after epochs, the ID training set
taken from the checkpoint, predict.py's output checks, lock and part files, 16-bit images, and
the smaller messages (a Lite0 checkpoint with a b4 config, a class filter on a flat folder)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from datasets import build_dataset, random_subset
from datasets.registry import DEBIAN_FASHION_MNIST
from errors import Preempted, UserError
from tests.helpers import ROOT, run_inprocess, run_script
from utils.checkpoint import load_checkpoint
from utils.config import load_config
from utils.distributed import DistContext
from utils.training import Trainer, keep_log_before, train

CPU = DistContext(0, 1, 0, torch.device("cpu"))
needs_fmnist = pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST),
                                  reason="Debian's dataset-fashion-mnist is not installed")


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


def _wait_for(predicate, proc, timeout=120):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


SIGNAL_RUN = dict(train={"epochs": 6, "save_every": 10, "subset": 512, "batch_size": 16})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run the signalled ones must end equal to."""
    from tests.helpers import Tiny
    t = Tiny(tmp_path_factory.mktemp("signals"))
    run_inprocess("main.py", "--config", t.write("ref.yaml", output_dir=str(t.tmp / "ref"), **SIGNAL_RUN))
    return t.tmp / "ref" / "checkpoint-last.pth"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_to_main_py_saves_exits_143_and_resume_loses_nothing(tiny, uninterrupted, sig):
    config = tiny.write("run.yaml", output_dir=str(tiny.tmp / "run"), **SIGNAL_RUN)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "main.py", "--config", config], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tiny.tmp / "run" / "log.txt"
    _wait_for(lambda: log.is_file() and len(log.read_text().splitlines()) >= 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith(f"stopped: {sig.name} received: ") and "--resume" in last_line
    stopped = load_checkpoint(str(tiny.tmp / "run" / "checkpoint-last.pth"))
    assert stopped.epoch >= 1
    run_inprocess("main.py", "--config", config, "--resume", str(tiny.tmp / "run" / "checkpoint-last.pth"))
    assert_equal_weights(weights(tiny.tmp / "run" / "checkpoint-last.pth"), weights(uninterrupted))
    epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert epochs == list(range(6))


def digits_train_knn(z_train: np.ndarray, z_test: np.ndarray) -> np.ndarray:
    """kNN (k = 1) written independently: Euclidean distance between L2-normalised vectors."""
    a = z_train / np.linalg.norm(z_train, axis=1, keepdims=True)
    b = z_test / np.linalg.norm(z_test, axis=1, keepdims=True)
    return np.sqrt(np.maximum(2 - 2 * (b @ a.T), 0)).min(axis=1)


@needs_fmnist
def test_baselines_are_fitted_on_the_set_the_checkpoint_was_trained_on(tiny):
    """Trained on Fashion-MNIST classes 0-4 (a subset of 300), evaluated with a config that names
    digits: kNN must be fitted on the checkpoint's 300 Fashion-MNIST images, whose train and test
    splits differ."""
    trained = tiny.write("trained.yaml", train={"dataset": "fashion-mnist@0-4", "subset": 300, "epochs": 1})
    run_inprocess("main.py", "--config", trained)
    other = tiny.write("other.yaml", eval={"dataset": "fashion-mnist@0", "ood": {"shirt": "fashion-mnist@6"}})
    out = tiny.tmp / "eval"
    proc = run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(tiny.ckpt / "checkpoint-last.pth"),
                         "--pretrained_ldm_cfg", other, "--baselines", "knn", "--knn_k", "1", "--no_plots",
                         "--save_features", "--output_dir", str(out))
    said = [line for line in proc.stderr.splitlines() if "ID training set" in line]
    assert len(said) == 1 and "digits (a subset of 256)" in said[0] and "fashion-mnist@0-4 (a subset of 300)" in said[0]
    from utils.detector import KNNDetector
    right = random_subset(build_dataset("fashion-mnist@0-4", "train", "", 32), 300)
    images = torch.stack([right[i] for i in range(len(right))])
    z_train = KNNDetector(other, device="cpu").features(images)[0].numpy()
    for name in ("ID", "shirt"):
        expected = digits_train_knn(z_train, np.load(out / "features" / f"{name}.npy"))
        np.testing.assert_allclose(np.load(out / "scores" / f"{name}.npy")["kNN_k1"], expected, rtol=1e-4, atol=1e-4)


def test_a_lite0_checkpoint_with_a_b4_config_names_the_checkpoints_backbone(trained):
    proc = run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                         "--pretrained_ldm_cfg", "config/Config.yaml", "--output_dir", str(trained.tmp / "b4"),
                         check=False)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "trained on efficientnet-lite0 features at 32 px" in line
    assert "efficientnet-b4" in line and "weights" not in line


def test_a_class_filter_on_a_flat_folder_says_it_has_no_class_subfolders(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match="has no class subfolders"):
        build_dataset(f"folder:{tmp_path}@cat", "test", "", 16)


def _digit_png(path, bits=8):
    img = np.round(load_digits().images[5] * (255.0 / 16.0)).astype(np.uint8)
    if bits == 16:
        Image.fromarray(img.astype(np.uint16) * 256 + 100).save(path)  # high byte = the 8-bit image
    else:
        Image.fromarray(img).save(path)
    return img


def test_predict_output_checked_before_work_locked_and_parts_unique(trained, tmp_path):
    ckpt = str(trained.ckpt / "checkpoint-last.pth")
    (tmp_path / "imgs").mkdir()
    _digit_png(tmp_path / "imgs" / "d8.png")
    _digit_png(tmp_path / "imgs" / "d16.png", bits=16)
    cache = tmp_path / "cache"
    args = ("--checkpoint", ckpt, "--images", str(tmp_path / "imgs"), "--cache_dir", str(cache))
    (tmp_path / "folder.csv").mkdir()
    proc = run_inprocess("predict.py", *args, "--output", str(tmp_path / "folder.csv"), check=False)
    assert proc.returncode == 2 and "is a folder; name a file in it" in proc.stderr.splitlines()[-1]
    assert not cache.exists() or not os.listdir(cache)  # nothing computed, not even the calibration
    (tmp_path / "summary.json").mkdir()  # the JSON that goes beside the CSV
    proc = run_inprocess("predict.py", *args, "--output", str(tmp_path / "summary.csv"), check=False)
    assert proc.returncode == 2 and "summary.json' is a folder" in proc.stderr.splitlines()[-1]
    stale = tmp_path / "new" / "deeper" / "p.csv.part-0"
    stale.parent.mkdir(parents=True)
    stale.write_text("another run's part\n")
    run_inprocess("predict.py", *args, "--output", str(tmp_path / "new" / "deeper" / "p.csv"))
    assert stale.read_text() == "another run's part\n"  # another run's part file is not ours
    rows = (tmp_path / "new" / "deeper" / "p.csv").read_text().splitlines()
    r16, r8 = (row.split(",") for row in sorted(rows[1:]))
    assert r16[0].endswith("d16.png") and r8[0].endswith("d8.png")
    assert r16[1:3] == r8[1:3] and r16[4] == ""  # the 16-bit image scores as its 8-bit high byte does
    from utils.rundir import lock_beside
    with lock_beside(str(tmp_path / "new" / "deeper" / "p.csv"), "held"):  # our own lock, held by this process
        proc = run_script("predict.py", *args, "--output", str(tmp_path / "new" / "deeper" / "p.csv"), check=False)
    assert proc.returncode == 2 and "is in use by another run" in proc.stderr.strip().splitlines()[-1]


def test_sixteen_bit_images_scale_and_32_bit_ones_are_refused(tmp_path):
    from datasets.images import resized
    img = _digit_png(tmp_path / "g16.png", bits=16)
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
        assert np.array_equal(resized(im, 8), img)
    with pytest.raises(UserError, match="no defined 8-bit scale"):
        resized(Image.fromarray(np.zeros((8, 8), np.float32)), 8)
