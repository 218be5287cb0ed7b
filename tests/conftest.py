import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(2)


@pytest.fixture
def tiny(tmp_path):
    """A tiny experiment: real Lite0 weights at 32 px, a small LFDN, digits as ID; returns helpers.Tiny."""
    from tests.helpers import Tiny
    return Tiny(tmp_path)
