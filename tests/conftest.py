import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Two cores: one pytest process uses both; under pytest-xdist (-n 2) each worker takes one.
WORKER_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
torch.set_num_threads(WORKER_THREADS)


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
