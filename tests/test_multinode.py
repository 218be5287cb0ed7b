"""Two nodes of one rank each over localhost, each with its own cache folder: training and evaluation
(ranks forked with torchrun's variables, tests.helpers.run_forked_ranks), and a SIGTERM to one rank
of a two-node run."""
import contextlib
import os
import signal

import numpy as np
import pytest
import torch

from store.checkpoint import (
    load_checkpoint,
)
from tests.helpers import Tiny, run_forked_ranks, run_inprocess, start_forked_ranks



@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process with batch 32: the reference run, which also fills cache folder A."""
    t = Tiny(tmp_path_factory.mktemp("nodes"))
    t.one = t.write("one.yaml", output_dir=str(t.tmp / "one"), cache_dir=str(t.tmp / "A"),
                    train={"epochs": 1, "batch_size": 32})
    t.two = t.write("two.yaml", train={"epochs": 1, "batch_size": 16})
    run_inprocess("main.py", "--config", t.one)
    t.eval_args = ["--pretrained_ldm_ckpt", str(t.tmp / "one" / "checkpoint-last.pth"), "--evaluate", "--no_plots"]
    with one_thread():
        run_inprocess("test_mse_mfsim.py", *t.eval_args, "--pretrained_ldm_cfg", t.one, "--output_dir",
                      str(t.tmp / "r1"))
    return t


@contextlib.contextmanager
def one_thread():
    """One thread, as each node process: the LFDN's matrix products round alike only with the same threading."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cache_files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("holder", [0])  # node 1 as the holder: the evaluation test below
def test_training_on_two_nodes_when_one_node_holds_the_cache(single, holder):
    t = single
    empty = t.tmp / f"empty-train-{holder}"
    caches = [t.tmp / "A", empty] if holder == 0 else [empty, t.tmp / "A"]
    outs = run_forked_ranks("main.py", [["--config", t.two, "--cache_dir", str(c), "--output_dir",
                                         str(t.tmp / f"two-{holder}-node{i}")] for i, c in enumerate(caches)], per_node=1)
    assert "train features: 256 x 512 (from cache)" in outs[0].stderr  # nobody extracted
    a = load_checkpoint(str(t.tmp / "one" / "checkpoint-last.pth"))
    b = load_checkpoint(str(t.tmp / f"two-{holder}-node0" / "checkpoint-last.pth"))
    assert a.ema["num_updates"] == b.ema["num_updates"] == 8
    for k in a.model:
        assert torch.allclose(a.model[k], b.model[k], rtol=1e-4, atol=1e-6), k
        assert torch.allclose(a.ema["weights"][k], b.ema["weights"][k], rtol=1e-4, atol=1e-6), k
    # The node that lacked the file now has it, as it was sent: the same key, features and image keys.
    assert [n for n in cache_files(empty) if "-train-" in n] == [n for n in cache_files(t.tmp / "A") if "-train-" in n]
    name = next(n for n in cache_files(empty) if "-train-" in n)
    sent, got = torch.load(t.tmp / "A" / name), torch.load(empty / name)
    assert sent.keys() == got.keys() == {"key", "features", "image_keys"} and got["key"] == sent["key"]
    assert torch.equal(got["features"], sent["features"]) and torch.equal(got["image_keys"], sent["image_keys"])


@pytest.mark.parametrize("holder", [1, None])  # node 0 as the holder: the training test above
def test_evaluation_on_two_nodes_when_one_or_no_node_holds_the_cache(single, holder):
    # With no holder, both ranks extract: backbone batches, their gathering (rank blocks
    # interleaved) and the reconstruction batches must all line up with one process.
    t = single
    empty = t.tmp / f"empty-eval-{holder}"
    caches = {0: [t.tmp / "A", empty], 1: [empty, t.tmp / "A"], None: [empty, t.tmp / "B-empty"]}[holder]
    out = t.tmp / f"r2-{holder}"
    run_forked_ranks("test_mse_mfsim.py", [[*t.eval_args, "--pretrained_ldm_cfg", t.one, "--cache_dir", str(c),
                                            "--output_dir", str(out if i == 0 else t.tmp / "unused")]
                                           for i, c in enumerate(caches)], per_node=1)
    for name in ("ID", "gauss", "photos"):
        assert np.array_equal(np.load(t.tmp / "r1" / "scores" / f"{name}.npy"), np.load(out / "scores" / f"{name}.npy"))
    assert len([n for n in cache_files(empty) if "-test-" in n]) == 3


def test_sigterm_to_one_rank_stops_both_after_a_save_and_the_resumed_run_equals_an_uninterrupted_one(single):
    """A preemption that reaches one rank only: the ranks agree (the request travels with the loss's
    all-reduce), rank 0 writes checkpoint-last.pth, every rank exits 143; resumed, the run ends with
    the weights of an uninterrupted run (one process at the same global batch: equal to the rounding
    of the ranks' sums, as in the training test above; the bit-for-bit resume of one process is
    test_training's, of a two-task job test_submitit_train's). The ranks, each its own node, are
    forked with torchrun's variables (torchrun's own handling of a signal: test_two_ranks.py)."""
    t = single
    cfg = t.write("long.yaml", train={"epochs": 7, "batch_size": 16, "save_every": 100})

    reference = t.write("long-one.yaml", output_dir=str(t.tmp / "full"), cache_dir=str(t.tmp / "A"),
                        train={"epochs": 7, "batch_size": 32, "save_every": 100})
    with one_thread():
        run_inprocess("main.py", "--config", reference)
    stopped = t.tmp / "stopped"
    ranks = start_forked_ranks("main.py", [["--config", cfg, "--cache_dir", str(t.tmp / "A"), "--output_dir",
                                            str(stopped if i == 0 else t.tmp / "stopped-node1")] for i in range(2)],
                               per_node=1)
    log = stopped / "log.txt"
    ranks.until(lambda: log.is_file() and len(log.read_text().splitlines()) >= 2, timeout=200)
    os.kill(ranks.pids[1], signal.SIGTERM)
    results = ranks.wait(timeout=300, check=False)
    assert [r.returncode for r in results] == [143, 143], [r.stderr[-2000:] for r in results]
    assert "stopped: SIGTERM received" in results[1].stderr, results[1].stderr[-2000:]
    ck = load_checkpoint(str(stopped / "checkpoint-last.pth"))
    assert 1 <= ck.epoch < 6
    run_forked_ranks("main.py", [["--config", cfg, "--cache_dir", str(t.tmp / "A"), "--output_dir",
                                  str(stopped if i == 0 else t.tmp / "stopped-node1"), "--resume",
                                  str(stopped / "checkpoint-last.pth")] for i in range(2)], per_node=1)
    a = load_checkpoint(str(t.tmp / "full" / "checkpoint-last.pth"))
    b = load_checkpoint(str(stopped / "checkpoint-last.pth"))
    assert a.epoch == b.epoch == 6 and a.ema["num_updates"] == b.ema["num_updates"] == 7 * 8  # no step lost or repeated
    for k in a.model:
        assert torch.allclose(a.model[k], b.model[k], rtol=1e-4, atol=1e-6), k
        assert torch.allclose(a.ema["weights"][k], b.ema["weights"][k], rtol=1e-4, atol=1e-6), k


def test_predict_on_two_nodes_when_only_node_1_holds_the_calibration_record(single, tmp_path):
    """The record is sent from the node that holds it (rank 1) to the one that does not, which stores
    it: the same thresholds, flags and scores as one process, and the same record on both disks."""
    import csv
    import json

    from tests.helpers import save_digits
    t = single
    folder = tmp_path / "img"
    save_digits(folder, range(1500, 1512))
    common = ["--checkpoint", str(t.tmp / "one" / "checkpoint-last.pth"), "--images", str(folder)]
    with one_thread():
        run_inprocess("predict.py", *common, "--cache_dir", str(tmp_path / "held"), "--output", str(tmp_path / "one.csv"))
    records = list((tmp_path / "held").glob("calibration-*.json"))
    assert len(records) == 1
    run_forked_ranks("predict.py", [[*common, "--cache_dir", str(tmp_path / c), "--output", str(tmp_path / "two.csv")]
                                    for c in ("empty", "held")], per_node=1)
    stored = list((tmp_path / "empty").glob("calibration-*.json"))
    assert [p.name for p in stored] == [records[0].name]
    assert json.loads(stored[0].read_text()) == json.loads(records[0].read_text())
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["thresholds"] == one["thresholds"] and two["calibration"] == one["calibration"]
    rows = [list(csv.DictReader(open(tmp_path / f"{n}.csv"))) for n in ("one", "two")]
    assert rows[0] == rows[1] and len(rows[0]) == 12
