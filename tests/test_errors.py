"""errors.py: the one-line message of an error, also when a DataLoader worker re-raised it."""
import pytest
import torch

from datasets import build_dataset
from errors import UserError, load_refusal, one_line
from tests.helpers import save_images


def test_one_line_of_an_error_re_raised_by_a_dataloader_worker(tmp_path):
    save_images(tmp_path / "bad", 1)
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"not a jpeg")
    ds = build_dataset("folder:bad", "test", str(tmp_path), 32)
    with pytest.raises(UserError) as e:
        list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1))
    line = one_line(e.value)
    assert line.startswith("cannot read image") and "broken.jpg" in line and "\n" not in line


def test_a_word_longer_than_the_limit_keeps_its_ends_and_says_how_much_was_left_out():
    from errors import LONG_WORD
    path = "/data/" + "a" * 150 + "middle" + "z" * 150 + ".png"
    line = one_line(UserError(f"cannot read image {path}: truncated"))
    word = path + ":"  # a word runs to the next space
    assert line == f"cannot read image {word[:80]}...({len(word) - 160} characters)...{word[-80:]} truncated"
    fits = "b" * LONG_WORD
    assert one_line(UserError(f"x {fits} y")) == f"x {fits} y"  # at the limit: kept whole
    assert one_line(UserError("two\nlines")) == "two\\nlines" and one_line(UserError("")) == "UserError"
    assert one_line(UserError("a\rname\r\n")) == "a\\rname"  # a carriage return shown escaped too (ends stripped)
    assert one_line(UserError("bad\r\nname")) == "bad\\r\\nname"


def test_a_refused_load_is_told_by_the_global_it_asks_for_else_its_first_line():
    import pickle
    torch_says = ("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely "
                  "succeed\n\n\nTrying to load unsupported GLOBAL posix.system whose module posix is blocked.\n\nCheck")
    assert load_refusal(pickle.UnpicklingError(torch_says)) == \
        "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
    assert load_refusal(pickle.UnpicklingError("\n  invalid load key, 'n'.\nmore")) == "invalid load key, 'n'."
    assert load_refusal(EOFError()) == "EOFError"
