"""errors.py: the one-line message of an error, also when a DataLoader worker re-raised it."""
import pytest
import torch

from datasets import build_dataset
from errors import UserError, one_line
from tests.helpers import save_images


def test_one_line_of_an_error_re_raised_by_a_dataloader_worker(tmp_path):
    save_images(tmp_path / "bad", 1)
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"not a jpeg")
    ds = build_dataset("folder:bad", "test", str(tmp_path), 32)
    with pytest.raises(UserError) as e:
        list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1))
    line = one_line(e.value)
    assert line.startswith("cannot read image") and "broken.jpg" in line and "\n" not in line
