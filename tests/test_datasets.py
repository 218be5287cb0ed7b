"""Datasets by spec: folders searched recursively in path order and identified by content, missing and
empty sets, unreadable images named, the offline sets, IDX files, Debian's Fashion-MNIST, seeded
subsets, and the batched resize equal to PIL image by image."""
import gzip
import os

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import build_dataset, build_datasets, random_subset
from datasets.images import ArrayImages, SubsetImages, resize_batch, resized
from datasets.registry import DEBIAN_FASHION_MNIST, read_idx_images
from errors import UserError, one_line


def save_images(folder, n, size=(20, 30), start=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(os.path.join(folder, f"{start + i:03d}.png"))


def test_folder_is_searched_recursively_in_path_order(tmp_path):
    save_images(tmp_path / "LSUN" / "b", 2, start=10)
    save_images(tmp_path / "LSUN" / "a", 3)
    (tmp_path / "LSUN" / "notes.txt").write_text("not an image")
    ds = build_dataset("folder:LSUN", "test", str(tmp_path), 48)
    assert len(ds) == 5
    assert [os.path.relpath(f, tmp_path / "LSUN") for f in ds.files] == \
        ["a/000.png", "a/001.png", "a/002.png", "b/010.png", "b/011.png"]
    x = ds[4]
    assert x.shape == (48, 48, 3) and x.dtype == torch.uint8


def test_folder_identity_follows_content(tmp_path):
    save_images(tmp_path / "F", 2)
    before = build_dataset("folder:F", "test", str(tmp_path), 32).identity()
    save_images(tmp_path / "F", 1, size=(5, 5), start=1)  # rewrite one file
    after = build_dataset("folder:F", "test", str(tmp_path), 32).identity()
    assert before["n"] == after["n"] and before["content"] != after["content"]


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        build_dataset("folder:empty", "test", str(tmp_path), 32)
    found, missing = build_datasets({"A": "folder:nowhere", "C10": "cifar10", "S": "svhn", "D": "digits"},
                                    "test", str(tmp_path), 32, download=False)
    assert list(found) == ["D"]
    assert "nowhere" in missing["A"] and "folder of images" in missing["A"]
    assert "cifar-10-batches-py" in missing["C10"] and str(tmp_path) in missing["C10"]
    assert "test_32x32.mat" in missing["S"]


def test_unreadable_image_is_named(tmp_path):
    save_images(tmp_path / "bad", 1)
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"not a jpeg")
    ds = build_dataset("folder:bad", "test", str(tmp_path), 32)
    with pytest.raises(UserError) as e:
        ds[1]
    assert str(tmp_path / "bad" / "broken.jpg") in one_line(e.value)


def test_one_line_of_an_error_re_raised_by_a_dataloader_worker(tmp_path):
    save_images(tmp_path / "bad", 1)
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"not a jpeg")
    ds = build_dataset("folder:bad", "test", str(tmp_path), 32)
    with pytest.raises(UserError) as e:
        list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1))
    line = one_line(e.value)
    assert line.startswith("cannot read image") and "broken.jpg" in line and "\n" not in line


def test_offline_sets():
    digits = build_dataset("digits", "test", "./nowhere", 16)
    assert len(digits) == 1797
    assert digits.array.max() == 255 and digits.array.min() == 0
    assert digits[0].shape == (16, 16)
    photos = build_dataset("photos:50", "test", "./nowhere", 16)
    assert len(photos) == 50 and photos[0].shape == (16, 16, 3)
    g1 = build_dataset("noise:gaussian:20", "test", "./nowhere", 16)
    g2 = build_dataset("noise:gaussian:20", "test", "./nowhere", 16)
    gt = build_dataset("noise:gaussian:20", "train", "./nowhere", 16)
    assert np.array_equal(g1.array, g2.array) and not np.array_equal(g1.array, gt.array)
    assert len(build_dataset("noise:uniform", "test", "./nowhere", 16)) == 1000


@pytest.mark.parametrize("spec,msg", [("imagenet", "unknown dataset 'imagenet'"), ("noise:pink", "noise:gaussian"),
                                      ("photos:x", "image count"), ("folder:", "needs a path")])
def test_bad_specs(spec, msg):
    with pytest.raises(UserError, match=msg):
        build_dataset(spec, "test", "./nowhere", 16)


def test_idx_reader_and_grayscale_to_rgb(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = b"".join(int(v).to_bytes(4, "big") for v in (2051, 2, 3, 4))
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + images.tobytes())
    assert np.array_equal(read_idx_images(str(path)), images)
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00" * 20)
    with pytest.raises(UserError, match="not an IDX"):
        read_idx_images(str(bad))


@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_the_debian_package(tmp_path):
    test = build_dataset("fashion-mnist", "test", str(tmp_path), 32, download=False)
    assert len(test) == 10000
    x = test[0]
    assert x.shape == (32, 32) and x.dtype == torch.uint8  # grayscale; normalize() copies it to RGB
    assert len(build_dataset("fashion-mnist", "train", str(tmp_path), 32, download=False)) == 60000


def test_random_subset_is_fixed():
    base = build_dataset("noise:uniform:100", "test", "./nowhere", 8)
    a, b = random_subset(base, 10), random_subset(base, 10)
    assert a.indices == b.indices == sorted(a.indices) and len(a) == 10
    assert a.fingerprint() != base.fingerprint()
    assert random_subset(base, None) is base and random_subset(base, 500) is base


@pytest.mark.parametrize("channels", [(), (3,)])
def test_batched_resize_equals_pil_image_by_image(channels):
    rng = np.random.default_rng(0)
    # Up, down, mixed and unchanged sides. (100, 30) -> 16 and (64, 20) -> 16 shrink the height more
    # than twice as much as the width: recent Pillow resizes those vertical pass first.
    for shape in [(28, 28), (32, 41), (40, 30), (100, 30), (30, 100), (64, 20), (16, 16)]:
        for size in (16, 64):
            a = rng.integers(0, 256, (70, *shape, *channels), dtype=np.uint8)  # 70 images: two groups at 64 px
            expected = np.stack([resized(Image.fromarray(x), size) for x in a])
            assert np.array_equal(resize_batch(a, size), expected), (shape, size)


def test_loader_batches_equal_single_images():
    base = ArrayImages("x", np.random.default_rng(1).integers(0, 256, (12, 28, 28), dtype=np.uint8), 64)
    sub = SubsetImages(base, [5, 1, 9, 3, 11])
    batch = next(iter(torch.utils.data.DataLoader(sub, batch_size=5)))
    assert batch.shape == (5, 64, 64)
    assert torch.equal(batch, torch.stack([torch.from_numpy(resized(base.load(i), 64)) for i in (5, 1, 9, 3, 11)]))
    assert torch.equal(sub[2], base[9])
