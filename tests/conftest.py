import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Two cores: one pytest process uses both; under pytest-xdist (-n 2) each worker takes one.
WORKER_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


# The test files that take longest (measured with --durations; docs/USAGE.md, "Tests"), longest first.
# pytest-xdist hands each worker whole files (--dist loadfile) in collection order; by default it first
# sorts the files by their number of tests, which put the slowest files (few, long tests) last and left
# one worker running alone at the end. Here the slow files go first and the rest keep their order.
SLOWEST_FIRST = ("test_submitit_train.py", "test_training.py", "test_detector.py", "test_two_ranks.py",
                 "test_end_to_end.py", "test_prediction.py", "test_evaluation.py", "test_bench_scripts.py",
                 "test_multinode.py", "test_features.py", "test_loader.py", "test_run.py", "test_scorer.py",
                 "test_openood.py", "test_report.py", "test_datasets.py", "test_extending.py", "test_checkpoint.py",
                 "test_extraction.py", "test_cli.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order set below
        config.option.loadscopereorder = False
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(config.option, "numprocesses", None):
        # A process that runs tests. pytest-xdist's controller runs none: it imports neither torch
        # nor the library (seconds of start-up on the cores its workers start on).
        import torch
        torch.set_num_threads(WORKER_THREADS)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FIRST)))  # stable: a file's tests stay in order


@pytest.fixture
def tiny(tmp_path):
    """A tiny experiment: real Lite0 weights at 32 px, a small LFDN, digits as ID; returns helpers.Tiny."""
    from tests.helpers import Tiny
    return Tiny(tmp_path)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One tiny training run (tests.helpers.Tiny, 3 epochs on digits) shared by the evaluation and prediction tests."""
    from tests.helpers import Tiny, run_inprocess
    t = Tiny(tmp_path_factory.mktemp("trained"))
    t.config = t.write()
    run_inprocess("main.py", "--config", t.config)
    return t


@pytest.fixture(scope="session")
def detector(trained):
    from dlsr.detector import DLSRDetector
    return DLSRDetector.from_checkpoint(str(trained.ckpt / "checkpoint-last.pth"), device="cpu")


@pytest.fixture(scope="session")
def tiny_shared(tmp_path_factory):
    """A tiny config whose feature cache is shared by the tests of this module."""
    from tests.helpers import Tiny
    return Tiny(tmp_path_factory.mktemp("honoured"))


@pytest.fixture(scope="session")
def baseline(trained):
    from tests.helpers import run_inprocess
    out = trained.tmp / "honoured-default"
    if not out.exists():
        run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                      "--pretrained_ldm_cfg", trained.config, "--output_dir", str(out), "--no_plots")
    return out


@pytest.fixture(scope="session")
def oo(tmp_path_factory):
    """A miniature root, and a tiny run trained on openood:cifar10 with the preset's OOD sets and groups."""
    import yaml

    from tests.helpers import PRESET, Tiny, make_openood_root, run_inprocess
    tmp = tmp_path_factory.mktemp("openood")
    t = Tiny(tmp)
    t.root = tmp / "OpenOOD"
    t.lists = make_openood_root(str(t.root))
    preset = yaml.safe_load(open(PRESET))
    t.config = t.write(data_path=str(t.root), train={"dataset": preset["train"]["dataset"], "subset": None,
                                                    "epochs": 2, "batch_size": 32},
                       eval={"dataset": preset["eval"]["dataset"], "ood": preset["eval"]["ood"],
                             "groups": preset["eval"]["groups"], "fpr95": "ood_positive"})
    cfg = yaml.safe_load(open(t.config))
    cfg["eval"]["ood"] = preset["eval"]["ood"]  # in the preset's order (Tiny.write sorts the keys)
    with open(t.config, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    run_inprocess("main.py", "--config", t.config)
    t.ckpt_path = str(t.ckpt / "checkpoint-last.pth")
    run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", t.ckpt_path, "--output_dir", str(tmp / "res"),
                  "--no_plots", "--baselines", "knn", "--knn_k", "1")
    t.res = tmp / "res"
    return t

