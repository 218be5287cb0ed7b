"""Two gloo ranks (forked with torchrun's variables, tests.helpers.run_forked_ranks) with every
collective recorded (tests/record_collectives): the ranks issue the same sequence and equal one
process; and one rank under tools.torchrun itself."""
import csv

import numpy as np
import pytest

from tests.helpers import Tiny, run_forked_ranks, run_inprocess, run_recorded, save_digits



@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
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


def test_two_rank_evaluation_with_layer_norm_and_draws_equals_one_process(ranked):
    """A reconstruction batch (4096) larger than every set (the ID set: 178 images): rank 1 gets no
    batch in any set; the layer statistics of both draws need the training features (a collective
    cache decision) all the same, before any rank's loop. Two ranks with a cold cache (they extract
    together) and with the warm one the reference left, each against one process."""
    t = ranked
    ckpt = str(t.ckpt / "checkpoint-last.pth")
    common = ["--pretrained_ldm_ckpt", ckpt, "--pretrained_ldm_cfg", t.config, "--layer_norm", "--noise_draws", "2",
              "--no_plots", "--baselines", "knn", "--batch_size", "4096", "--dataset", "digits@0"]
    run_inprocess("test_mse_mfsim.py", *common, "--cache_dir", str(t.tmp / "warm"), "--output_dir", str(t.tmp / "e1"))
    for warm in (False, True):
        seq = run_recorded(t.tmp, f"eval-{warm}", "test_mse_mfsim.py", *common, "--cache_dir",
                           str(t.tmp / ("warm" if warm else "cold")), "--output_dir", str(t.tmp / f"e2-{warm}"))
        assert any(line.startswith("all_gather") for line in seq) != warm  # extraction only when cold
        # the ranks split each set's reconstruction batches and sum their rows: (images, scores) in float64
        assert [line for line in seq if line.endswith("torch.float64")] == \
            ["all_reduce (178, 2) torch.float64", "all_reduce (20, 2) torch.float64"], seq
        for name in ("ID", "few"):
            one = np.load(t.tmp / "e1" / "scores" / f"{name}.npy")
            two = np.load(t.tmp / f"e2-{warm}" / "scores" / f"{name}.npy")
            assert one.dtype.names == two.dtype.names and "kNN_k1" in one.dtype.names
            for field in one.dtype.names:  # threads round apart
                assert np.allclose(one[field], two[field], rtol=1e-4, atol=1e-4), (warm, name, field)


def test_two_rank_predict_with_layer_norm_on_three_files_finishes_and_equals_one_process(ranked, tmp_path):
    """The review's hang: 3 files in chunks of 64, so rank 1 scores none; run after a one-process
    predict into the same cache, so the calibration record is read from disk (no collective there)
    and only the layer statistics, prepared before the chunks, need the ranks together."""

    t = ranked
    save_digits(tmp_path / "img", [1, 2, 3])
    common = ["--checkpoint", str(t.ckpt / "checkpoint-last.pth"), "--images", str(tmp_path / "img"),
              "--layer_norm", "--noise_draws", "2", "--calibration", "digits@0", "--cache_dir", str(tmp_path / "c")]
    proc = run_inprocess("predict.py", *common, "--output", str(tmp_path / "one.csv"))
    assert "calibration (computed)" in proc.stderr
    run_recorded(tmp_path, "predict", "predict.py", *common, "--output", str(tmp_path / "two.csv"))
    rows = [list(csv.DictReader(open(tmp_path / f"{n}.csv"))) for n in ("one", "two")]
    assert [r["path"] for r in rows[0]] == [r["path"] for r in rows[1]] and len(rows[0]) == 3
    for a, b in zip(*rows):
        assert np.isclose(float(a["MFsim"]), float(b["MFsim"]), rtol=1e-4, atol=1e-4) and a["is_ood"] == b["is_ood"]


def test_predict_on_two_ranks_over_several_chunks_equals_one_process(trained, tmp_path):
    folder = tmp_path / "img"
    save_digits(folder, range(37))
    ckpt = str(trained.ckpt / "checkpoint-last.pth")
    # A backbone batch of 6 that does not divide the reconstruction batch of 8: chunks of lcm = 24 files
    # (24, 13): rank 0 writes the first, rank 1 the second, and the merge reads them back in 24s.
    sizes = ["--batch_size", "8", "--opt", "extract_batch_size=6"]
    run_forked_ranks("predict.py", [["--checkpoint", ckpt, "--images", str(folder), "--output", str(tmp_path / "two.csv"),
                                     *sizes, "--cache_dir", str(tmp_path / "c")]] * 2)
    run_inprocess("predict.py", "--checkpoint", ckpt, "--images", str(folder), "--output", str(tmp_path / "one.csv"),
                  *sizes, "--cache_dir", str(tmp_path / "c"))
    one, two = (list(csv.DictReader(open(tmp_path / f"{n}.csv"))) for n in ("one", "two"))
    assert [r["path"] for r in two] == [r["path"] for r in one] == sorted(r["path"] for r in one)
    for a, b in zip(one, two):
        assert np.isclose(float(a["MFsim"]), float(b["MFsim"]), rtol=1e-4, atol=1e-5), a["path"]
        assert np.isclose(float(a["MSE"]), float(b["MSE"]), rtol=1e-4), a["path"]
    assert len({r["MFsim"] for r in two}) > 30  # each row its own scores, not a neighbour's


def test_one_rank_under_torchrun_forms_a_group_and_a_group_sigterm_reads_143(tiny, trained, tmp_path):
    """A launched run is distributed whatever its size (one GPU runs NCCL's path); and a SIGTERM to
    the whole process group, which ends plain torchrun with status 1, ends tools.torchrun with 143."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from store.checkpoint import load_checkpoint
    from tests.helpers import ROOT, collective_sequences, recording_env
    cfg = tiny.write(train={"epochs": 40, "subset": 256, "batch_size": 16, "save_every": 1000},
                     cache_dir=trained.cfg["cache_dir"])  # its training features: the signal comes after an epoch
    stem = str(tmp_path / "one.collectives")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **recording_env(stem)}
    proc = subprocess.Popen([sys.executable, "-m", "tools.torchrun", "--standalone", "--nproc_per_node=1", "main.py",
                             "--config", cfg], cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log_txt, start = tiny.ckpt / "log.txt", time.time()
    while not (log_txt.is_file() and log_txt.read_text().strip()):
        assert proc.poll() is None and time.time() - start < 120, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the agent and the rank, as a scheduler does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped: SIGTERM received" in err and "torchrun: SIGTERM received" in err and "Traceback" not in err
    (seq,) = collective_sequences(stem)
    assert "process group: gloo, 1 rank(s)" in err and seq.count("all_reduce (2,) torch.float32") >= 16
    ck = load_checkpoint(str(tiny.ckpt / "checkpoint-last.pth"))
    assert ck.epoch >= 1 and json.loads(log_txt.read_text().splitlines()[0])["epoch"] == 0
