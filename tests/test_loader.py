"""utils/loader.py: decoding workers (their number, /dev/shm) and their life cycle under stop signals."""
import logging
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import pytest

import utils.loader as loader
from experiment.config import load_config
from store.checkpoint import (
    load_checkpoint,
)
from tests.helpers import ROOT


def test_workers_per_rank_share_the_nodes_cores(tiny, monkeypatch):
    cfg = load_config(tiny.write(num_workers=None))
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert cfg.workers(True, 1) == 8 and cfg.workers(True, 4) == 3 and cfg.workers(True, 16) == 1
    assert cfg.workers(False, 1) == 0


def test_decoding_workers_fit_dev_shm_shared_by_the_nodes_processes(monkeypatch):
    monkeypatch.setattr(loader.shutil, "disk_usage", lambda _: SimpleNamespace(free=64 * 2 ** 20))
    batch = 64 * 224 * 224 * 3  # 9.6 MB: two per worker, half of 64 MB free
    assert loader.shm_workers(8, batch) == 1
    assert loader.shm_workers(8, 64 * 32 * 32 * 3) == 8
    small = 32 * 32 * 32 * 3  # 98 KB batches: 163 fit in 32 MB, so 4 processes of 8 workers each fit, 32 do not
    assert loader.shm_workers(8, small, local_processes=4) == 8
    assert loader.shm_workers(8, small, local_processes=32) == 5  # per node, not per rank
    monkeypatch.undo()
    assert loader.shm_workers(8, small, folder=os.path.join(os.sep, "no", "such", "shm")) == 8  # no /dev/shm: as asked


def test_sigterm_to_the_workers_first_then_the_group_saves_and_exits_143(tiny):
    """Slurm signals every process of a job step (its cgroup), in no set order; torchrun's agent and
    Kubernetes the process group. Workers that died of it first would end the run with "DataLoader
    worker killed by signal" before the save: what a process group of their own (the simpler
    mechanism, docs/OPERATIONS.md) gives, measured. Ours ignore it."""
    cfg = tiny.write(num_workers=2, train={"epochs": 40, "subset": 256, "batch_size": 16, "cache_features": False,
                                           "save_every": 1000})
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "main.py", "--config", cfg], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_txt, start = tiny.ckpt / "log.txt", time.time()
    while not (log_txt.is_file() and log_txt.read_text().strip()):
        assert proc.poll() is None and time.time() - start < 120, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    workers = []
    while not workers:  # inside the next epoch, workers running
        assert proc.poll() is None and time.time() - start < 120
        workers = psutil.Process(proc.pid).children()
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped: SIGTERM received" in err and "killed by signal" not in err
    ck = load_checkpoint(str(tiny.ckpt / "checkpoint-last.pth"))
    assert 1 <= ck.epoch < 39


def test_a_process_that_exits_with_a_loader_left_open_does_not_wait_on_its_workers():
    """The workers ignore SIGTERM, which multiprocessing's exit handler sends them before it waits for
    them: without our handler (SIGKILL first) an error that leaves a loader open hung the exit."""
    script = (
        "import torch\n"
        "from utils.loader import image_loader, decoded\n"
        "class DS(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 100\n"
        "    def __getitem__(self, i): return torch.zeros(4)\n"
        "it = decoded(image_loader(DS(), 4, 2))\n"
        "next(it)\n"
        "raise SystemExit(3)  # an error, with the loader's iterator still referenced\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=60, capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr[-1000:]


def test_the_exit_handler_is_registered_once_by_the_first_loader_with_workers(monkeypatch):
    """A process that builds loaders for every set and epoch registers one exit handler, not one each;
    a loader without workers (nothing to kill) registers none."""
    registered = []
    monkeypatch.setattr(loader, "_exit_handler", [])  # as in a fresh process
    monkeypatch.setattr(loader.atexit, "register", registered.append)
    data = list(range(8))
    loader.image_loader(data, 4, 0)
    assert registered == []
    for _ in range(3):
        loader.image_loader(data, 4, 2)
    assert registered == [loader._kill_workers_at_exit]


def test_dev_shm_that_holds_every_worker_leaves_the_count_and_says_nothing(monkeypatch, caplog):
    features = loader
    batch = 10 * 2 ** 20
    monkeypatch.setattr(features.shutil, "disk_usage", lambda _: SimpleNamespace(free=2 * 2 * batch * 4))
    monkeypatch.setattr(features, "_said_shm", [])
    with caplog.at_level(logging.WARNING, logger="dlsr"):
        assert features.shm_workers(4, batch) == 4  # exactly enough: half the free space holds 4 x 2 batches
    assert not [r for r in caplog.records if "/dev/shm" in r.message]
    with caplog.at_level(logging.WARNING, logger="dlsr"):
        assert features.shm_workers(5, batch) == 4
    said = [r.message for r in caplog.records if "decoding with 4 worker(s) each instead of 5" in r.message]
    assert len(said) == 1 and "each queues ~20 MB" in said[0] and "has 160 MB free for 1 process(es)" in said[0]


def test_the_loader_sizes_its_workers_by_the_bytes_of_one_decoded_batch(monkeypatch):
    asked = []
    monkeypatch.setattr(loader, "shm_workers", lambda n, batch_bytes, local: asked.append((n, batch_bytes, local)) or 1)
    made = loader.image_loader(list(range(8)), 16, 3, 224, local_processes=2)
    assert asked == [(3, 16 * 224 * 224 * 3, 2)] and made.num_workers == 1  # uint8 RGB: 3 bytes a pixel
    loader.image_loader(list(range(8)), 16, 0, 224)
    assert len(asked) == 1  # no workers, nothing to size
    loader.image_loader(list(range(8)), 16, 3, 224)
    assert asked[-1] == (3, 16 * 224 * 224 * 3, 1)  # unless told otherwise, this process has /dev/shm to itself


class _Failing:
    """Four items; the third cannot be read (as a broken image file)."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 2:
            raise ValueError("cannot read item 2")
        return i


def test_an_error_or_a_loop_left_early_ends_the_workers_at_once(monkeypatch):
    """Not when the iterator is collected: an error's traceback keeps it, collected later its queues
    may be gone, the workers (deaf to SIGTERM) stayed until exit and each cost a 5 s join."""
    import multiprocessing
    monkeypatch.setattr(multiprocessing.process, "_children", set())  # ours only
    with pytest.raises(ValueError, match="item 2") as caught:
        for _ in loader.decoded(loader.image_loader(_Failing(), 1, 2)):
            pass
    assert caught.value.__traceback__ is not None and multiprocessing.active_children() == []
    for n, _ in enumerate(loader.decoded(loader.image_loader(list(range(100)), 1, 2))):
        if n == 3:
            break  # the generator is closed when the loop leaves it
    assert multiprocessing.active_children() == []
