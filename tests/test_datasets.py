"""datasets/: sets by spec string (the registry of kinds, folders, the sets that ship with packages,
class filters) and the image path (resize, 8/16/32-bit images, links)."""
import csv
import gzip
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from datasets import build_dataset, build_datasets, random_subset
from datasets.images import ArrayImages, SubsetImages, resize_batch, resized, to_rgb_resized
from datasets.torchvision_sets import DEBIAN_FASHION_MNIST, read_idx_images
from errors import UserError, one_line
from models.features import BackboneId
from store.feature_cache import cache_key
from tests.helpers import (
    _digit_png,
    error_line,
    run_inprocess,
    save_digits,
    save_images,
    try_evaluate,
)


def save_flat_images(folder, n):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(os.path.join(folder, f"{i}.png"))


def test_class_filters_select_by_index_range_list_and_name(tmp_path):
    target = load_digits().target
    for spec, classes in (("digits@3", [3]), ("digits@0-4", [0, 1, 2, 3, 4]), ("digits@0,1,8", [0, 1, 8]),
                          ("digits@3-3", [3]), ("digits@7-9", [7, 8, 9]), ("digits@9", [9])):  # bounds included
        ds = build_dataset(spec, "test", str(tmp_path), 16)
        expected = np.flatnonzero(np.isin(target, classes))
        assert len(ds) == len(expected) and sorted(set(ds.labels.tolist())) == classes
        assert np.array_equal(ds[0].numpy(), build_dataset("digits", "test", str(tmp_path), 16)[int(expected[0])].numpy())
        assert ds.name == spec
    a, b = build_dataset("digits@3", "test", str(tmp_path), 16), build_dataset("digits@4", "test", str(tmp_path), 16)
    assert a.identity() != b.identity()  # so their cached features can never be mixed up
    for cls in ("cat", "dog"):
        for i in range(2 if cls == "cat" else 3):
            os.makedirs(tmp_path / "pets" / cls, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / "pets" / cls / f"{i}.png")
    assert len(build_dataset("folder:pets@dog", "test", str(tmp_path), 16)) == 3
    assert len(build_dataset("folder:pets@cat,dog", "test", str(tmp_path), 16)) == 5


@pytest.mark.parametrize("spec,message", [
    ("digits@10", "unknown class '10'; the classes are 0=0, 1=1"),
    ("digits@4-2", "unknown class '4-2'"),
    ("digits@8-10", "unknown class '8-10'"),
    ("digits@-1", "unknown class '-1'"),
    ("folder:pets@bird", "unknown class 'bird'; the classes are 0=cat, 1=dog"),
    ("photos@1", "photos has no classes"),
])
def test_a_bad_class_list_is_one_line_naming_the_valid_classes(tmp_path, spec, message):
    for cls in ("cat", "dog"):
        os.makedirs(tmp_path / "pets" / cls)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "pets" / cls / "0.png")
    with pytest.raises(UserError) as e:
        build_dataset(spec, "test", str(tmp_path), 16)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_fashion_mnist_classes_when_the_data_is_there():
    try:
        shirt = build_dataset("fashion-mnist@6", "test", "./data", 16, download=False)
    except UserError:
        pytest.skip("Fashion-MNIST is not installed here")
    assert len(shirt) == 1000 and shirt.classes[6] == "Shirt"
    assert len(build_dataset("fashion-mnist@Shirt", "test", "./data", 16, download=False)) == 1000


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


def test_offline_sets():
    digits = build_dataset("digits", "test", "./nowhere", 16)
    assert len(digits) == 1797
    assert digits.array.max() == 255 and digits.array.min() == 0
    assert digits[0].shape == (16, 16)
    photos = build_dataset("photos:50", "test", "./nowhere", 16)
    assert len(photos) == 50 and photos[0].shape == (16, 16, 3)
    reference = load_digits()
    for spec, n in (("digits:453", 453), ("digits:1797", 1797), ("digits:1", 1)):  # the first N, labels with them
        first = build_dataset(spec, "train", "./nowhere", 8)
        assert np.array_equal(first.array, np.round(reference.images[:n] * (255.0 / 16.0)).astype(np.uint8)), spec
        assert np.array_equal(first.labels, reference.target[:n]), spec
    threes = build_dataset("digits:100@3", "test", "./nowhere", 8)  # the first 100, then the class
    assert len(threes) == int((reference.target[:100] == 3).sum()) and set(threes.labels) == {3}
    for spec, says in (("digits:1798", "digits:1798: scikit-learn's digits are 1797 images"),
                       ("digits:0", "the image count (after the last ':') must be positive, got 0"),
                       ("digits:all", "expected an image count, got 'all'")):
        with pytest.raises(UserError) as e:
            build_dataset(spec, "test", "./nowhere", 8)
        assert says in str(e.value), spec
    g1 = build_dataset("noise:gaussian:20", "test", "./nowhere", 16)
    g2 = build_dataset("noise:gaussian:20", "test", "./nowhere", 16)
    gt = build_dataset("noise:gaussian:20", "train", "./nowhere", 16)
    assert np.array_equal(g1.array, g2.array) and not np.array_equal(g1.array, gt.array)
    assert len(build_dataset("noise:uniform", "test", "./nowhere", 16)) == 1000
    assert len(build_dataset("photos", "test", "./nowhere", 16)) == 1000  # the documented default counts


@pytest.mark.parametrize("split,seed", [("test", 0), ("train", 1)])
def test_photo_crops_and_noise_are_the_same_sets_in_every_version(split, seed):
    """photos:N is N 96 px crops, the i-th from photograph i mod 2 at a corner drawn uniformly from
    NumPy's generator seeded 0 for the test split, 1 for any other. Cached features, calibration
    records and published tables name the set by its spec, so its images must not move."""
    from sklearn.datasets import load_sample_images
    pictures = load_sample_images().images  # (427, 640, 3) twice
    rng = np.random.default_rng(seed)
    expected = []
    for i in range(7):
        p = pictures[i % 2]
        top, left = rng.integers(0, p.shape[0] - 96), rng.integers(0, p.shape[1] - 96)
        expected.append(p[top:top + 96, left:left + 96])
    assert np.array_equal(build_dataset("photos:7", split, "./nowhere", 16).array, np.stack(expected))
    # noise:KIND:N: N 32x32 RGB images, Gaussian (mean 127.5, sd 64, clipped) or uniform on [0, 256)
    gauss = np.clip(np.random.default_rng(seed).normal(127.5, 64.0, (5, 32, 32, 3)), 0, 255).astype(np.uint8)
    uniform = np.random.default_rng(seed).uniform(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    assert np.array_equal(build_dataset("noise:gaussian:5", split, "./nowhere", 16).array, gauss)
    assert np.array_equal(build_dataset("noise:uniform:5", split, "./nowhere", 16).array, uniform)


@pytest.mark.parametrize("found", [True, False])
def test_digits_and_photos_are_scikit_learns_read_without_importing_it(monkeypatch, found):
    """The files scikit-learn ships, read as its loaders read them; where the package's layout
    differs (no file found), its own loaders."""
    import sklearn.datasets
    from sklearn.datasets import load_sample_images

    import datasets.synthetic as synthetic
    reference, expected = load_digits(), load_sample_images().images
    if not found:
        monkeypatch.setattr(synthetic, "_sklearn_file", lambda *parts: "")
    else:
        assert synthetic._sklearn_file("data", "digits.csv.gz")
        for name in ("load_digits", "load_sample_images"):  # the files are read by our code, not by these
            monkeypatch.setattr(sklearn.datasets, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} called"))
    images, target = synthetic._digits()
    assert images.dtype == reference.images.dtype and np.array_equal(images, reference.images)
    assert target.dtype == reference.target.dtype and np.array_equal(target, reference.target)
    digits = build_dataset("digits", "test", "./nowhere", 8)
    assert np.array_equal(digits.array, np.round(reference.images * (255.0 / 16.0)).astype(np.uint8))
    photos = synthetic._sample_photos()
    assert len(photos) == len(expected) == 2
    assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(photos, expected))


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


def test_link_loops_are_walked_once(tmp_path):
    save_flat_images(tmp_path / "img", 5)
    os.symlink(".", tmp_path / "img" / "self")
    assert len(build_dataset("folder:img", "test", str(tmp_path), 32)) == 5
    (tmp_path / "img" / "loop").mkdir()
    os.symlink("..", tmp_path / "img" / "loop" / "up")
    os.symlink(".", tmp_path / "img" / "loop" / "self")
    start = time.perf_counter()
    assert len(build_dataset("folder:img/loop", "test", str(tmp_path), 32)) == 5  # up -> img: its 5 images, once
    assert time.perf_counter() - start < 30


def test_a_broken_link_is_one_line_naming_it(trained, tmp_path):
    save_flat_images(tmp_path / "data" / "b", 2)
    os.symlink("nowhere", tmp_path / "data" / "b" / "dead.jpg")
    line = error_line(try_evaluate(trained, tmp_path / "out", "--data_path", str(tmp_path / "data"), "--dataset", "digits",
                               "--ood", "b=folder:b"))
    assert "dead.jpg" in line and "broken link" in line


def test_32_bit_integer_images_are_refused_as_floating_point_ones_are(trained, tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    Image.fromarray(np.full((8, 8), 70000, np.int32), mode="I").save(folder / "int32.tif")
    Image.fromarray(np.full((8, 8), 0.5, np.float32), mode="F").save(folder / "float.tif")
    save_digits(folder, [1])
    run_inprocess("predict.py", "--checkpoint", str(trained.ckpt / "checkpoint-last.pth"), "--images", str(folder),
                  "--output", str(tmp_path / "p.csv"))
    rows = {os.path.basename(r["path"]): r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    assert "32-bit integer pixels (PIL mode I)" in rows["int32.tif"]["error"] and rows["int32.tif"]["MSE"] == ""
    assert "floating-point pixels (PIL mode F)" in rows["float.tif"]["error"]
    assert rows["d0001.png"]["error"] == ""


def test_a_folder_whose_images_changed_gets_a_new_cache_key(tmp_path):
    from datasets import build_dataset
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(folder / f"{i}.ppm")  # fixed size: header + pixels
    bid = BackboneId("efficientnet-lite0", "w", 32, 512, (0, 1, 2, 3, 4), (16, 40, 112, 432, 512))

    def key():
        return cache_key(bid, build_dataset(f"folder:{folder}", "test", str(tmp_path), 32), "test", "cpu-fp32", 8)
    before = key()
    size = os.path.getsize(folder / "1.ppm")
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(folder / "1.ppm")
    assert os.path.getsize(folder / "1.ppm") == size  # same names, count and sizes: only the content changed
    st = os.stat(folder / "1.ppm")
    os.utime(folder / "1.ppm", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert key() != before


def test_a_class_filter_on_a_flat_folder_says_it_has_no_class_subfolders(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match="has no class subfolders"):
        build_dataset(f"folder:{tmp_path}@cat", "test", "", 16)


def test_sixteen_bit_images_scale_and_32_bit_ones_are_refused(tmp_path):
    from datasets.images import resized
    img = _digit_png(tmp_path / "g16.png", bits=16)
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
        assert np.array_equal(resized(im, 8), img)
    with pytest.raises(UserError, match="no defined 8-bit scale"):
        resized(Image.fromarray(np.zeros((8, 8), np.float32)), 8)


def test_cifar_svhn_and_mnist_in_torchvisions_layouts_are_read_image_for_image(tmp_path, monkeypatch):
    """Miniature files in torchvision's layouts (its md5 checks switched off: the files are ours):
    each split's own images, in order, with their labels, at their own size."""
    import pickle

    import scipy.io
    import torchvision.datasets as tvd
    import torchvision.datasets.cifar
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tvd.SVHN, "_check_integrity", lambda self: True)
    rng = np.random.default_rng(0)
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = 3 if name == "test_batch" else 2
        batches[name] = (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n).tolist())
        with open(cifar / name, "wb") as f:
            pickle.dump({"data": batches[name][0].reshape(n, -1), "labels": batches[name][1]}, f)
    with open(cifar / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    test = build_dataset("cifar10", "test", str(tmp_path), 32)
    assert len(test) == 3 and test.labels.tolist() == batches["test_batch"][1]
    assert all(torch.equal(test[i], torch.from_numpy(batches["test_batch"][0][i].transpose(1, 2, 0))) for i in range(3))
    train = build_dataset("cifar10", "train", str(tmp_path), 32)
    assert len(train) == 10 and torch.equal(train[9], torch.from_numpy(batches["data_batch_5"][0][1].transpose(1, 2, 0)))

    svhn = tmp_path / "SVHN"
    svhn.mkdir()
    x = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    scipy.io.savemat(svhn / "test_32x32.mat", {"X": x, "y": np.array([[10], [1], [2], [3]], np.uint8)})
    s = build_dataset("svhn", "test", str(tmp_path), 32)
    assert len(s) == 4 and s.labels.tolist() == [0, 1, 2, 3]  # SVHN's 10 is the digit 0
    assert all(torch.equal(s[i], torch.from_numpy(np.ascontiguousarray(x[..., i]))) for i in range(4))

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = {p: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for p, n in (("train", 5), ("t10k", 3))}
    for prefix, ims in images.items():
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            (2051).to_bytes(4, "big") + len(ims).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + ims.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            (2049).to_bytes(4, "big") + len(ims).to_bytes(4, "big") + bytes(range(len(ims))))
    for split, prefix in (("test", "t10k"), ("train", "train")):
        m = build_dataset("mnist", split, str(tmp_path), 28)
        assert len(m) == len(images[prefix]) and m.labels.tolist() == list(range(len(images[prefix])))
        assert torch.equal(m[1], torch.from_numpy(images[prefix][1]))  # grayscale: (H, W), made RGB later
    one = build_dataset("mnist@1", "test", str(tmp_path), 28)  # the test labels are 0, 1, 2: one image of class 1
    assert len(one) == 1 and torch.equal(one[0], torch.from_numpy(images["t10k"][1]))
    with pytest.raises(UserError, match="mnist@9: no images in these classes"):
        build_dataset("mnist@9", "test", str(tmp_path), 28)
    with pytest.raises(UserError, match=r"mnist has no validation split \(only openood:"):
        build_dataset("mnist", "val", str(tmp_path), 28)
    with pytest.raises(UserError, match=r"split must be one of \('train', 'test', 'val'\), got 'valid'"):
        build_dataset("mnist", "valid", str(tmp_path), 28)


def test_a_subset_reads_its_base_images_by_its_own_indices_however_they_are_asked_for(tmp_path):
    digits = build_dataset("digits", "test", "", 8)
    sub = random_subset(digits, 50, seed=3)
    inner = SubsetImages(sub, [49, 0, 7])  # a subset of a subset: the base has __getitems__
    expected = [digits[sub.indices[i]] for i in (49, 0, 7)]
    assert all(torch.equal(a, b) for a, b in zip(inner.__getitems__([0, 1, 2]), expected))
    assert all(torch.equal(inner[i], e) for i, e in enumerate(expected))
    assert inner.labels.tolist() == [int(digits.labels[sub.indices[i]]) for i in (49, 0, 7)]
    assert np.array_equal(np.asarray(inner.load(2)), np.asarray(digits.load(sub.indices[7])))
    save_images(tmp_path / "f", 4)
    folder = build_dataset(f"folder:{tmp_path / 'f'}", "test", "", 8)
    assert not callable(getattr(folder, "__getitems__", None))
    picked = SubsetImages(folder, [3, 1])
    assert all(torch.equal(a, folder[i]) for a, i in zip(picked.__getitems__([0, 1]), (3, 1)))
    with pytest.raises(UserError, match="subset size must be positive, got 0"):
        random_subset(digits, 0)
    assert random_subset(digits, len(digits)) is digits and random_subset(digits, None) is digits
    for bad in (np.zeros((0, 8, 8), np.uint8), np.zeros((2, 8), np.uint8), np.zeros((2, 8, 8), np.float32)):
        with pytest.raises(ValueError, match=r"x: expected a non-empty uint8 \(N, H, W\[, 3\]\) array"):
            ArrayImages("x", bad, 8)


def test_a_set_not_on_disk_is_downloaded_where_asked_and_else_named_with_its_layout(tmp_path, monkeypatch):
    """torchvision's class is asked without download first; with download allowed, once more with it.
    What fails is one line: the folder, the layout expected, and the first line of the reason."""
    import torchvision.datasets as tvd
    asked = []

    class CIFAR10:
        online = True

        def __init__(self, root, download, train):
            asked.append((root, download, train))
            if not download:
                raise RuntimeError("Dataset not found or corrupted.\nYou can use download=True to download it")
            if not self.online:
                raise OSError("[Errno -3] Temporary failure in name resolution\nmore")
            self.data = np.full((2, 32, 32, 3), 7, np.uint8)
            self.targets, self.classes = [1, 0], ["a", "b"]
    monkeypatch.setattr(tvd, "CIFAR10", CIFAR10)
    got = build_dataset("cifar10", "train", str(tmp_path), 32, download=True)
    assert asked == [(str(tmp_path), False, True), (str(tmp_path), True, True)]
    assert len(got) == 2 and got.labels.tolist() == [1, 0] and int(got[0].max()) == 7
    CIFAR10.online = False
    with pytest.raises(UserError) as e:
        build_dataset("cifar10", "test", str(tmp_path), 32, download=True)
    assert str(e.value) == (f"not found under {tmp_path}: expected cifar-10-batches-py/ (torchvision CIFAR10 layout); "
                            "automatic download failed (OSError: [Errno -3] Temporary failure in name resolution)")
    asked.clear()
    with pytest.raises(UserError) as e:
        build_dataset("cifar10", "test", str(tmp_path), 32, download=False)
    assert asked == [(str(tmp_path), False, False)]
    assert str(e.value).endswith("layout) (download disabled) (RuntimeError: Dataset not found or corrupted.)")


def test_fashion_mnist_nowhere_names_debians_package_too(tmp_path, monkeypatch):
    from datasets import torchvision_sets
    monkeypatch.setattr(torchvision_sets, "DEBIAN_FASHION_MNIST", str(tmp_path / "debian"))
    with pytest.raises(UserError) as e:
        build_dataset("fashion-mnist", "test", str(tmp_path), 32, download=False)
    assert str(e.value).startswith(f"not found under {tmp_path}: expected FashionMNIST/raw/t10k-images-idx3-ubyte[.gz]")
    assert str(e.value).endswith("; on Debian, `apt-get install dataset-fashion-mnist` also works")
    with pytest.raises(UserError) as e:
        build_dataset("mnist", "test", str(tmp_path), 32, download=False)
    assert "Debian" not in str(e.value)


def test_celeba_is_read_through_torchvision_as_pil_images(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    from PIL import Image
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(3)]

    class CelebA:
        def __init__(self, root, download, split, target_type):
            assert (root, download, split, target_type) == (str(tmp_path), False, "test", [])

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return Image.fromarray(pixels[i]), 0
    monkeypatch.setattr(tvd, "CelebA", CelebA)
    ds = build_dataset("celeba", "test", str(tmp_path), 32)
    assert len(ds) == 3 and ds.name == "celeba"
    assert torch.equal(ds[2], to_rgb_resized(Image.fromarray(pixels[2]), 32))
    assert ds.fingerprint() == f"celeba|test|3|{tmp_path}"


def test_an_idx_label_file_is_checked_as_the_image_file_is(tmp_path):
    from datasets.torchvision_sets import read_idx_labels
    good = tmp_path / "l.gz"
    with gzip.open(good, "wb") as f:
        f.write((2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([4, 0, 9]))
    assert read_idx_labels(str(good)).tolist() == [4, 0, 9]
    plain = tmp_path / "l"
    plain.write_bytes((2049).to_bytes(4, "big") + (2).to_bytes(4, "big") + bytes([1, 2]))
    assert read_idx_labels(str(plain)).tolist() == [1, 2]
    for name, data in (("images-as-labels", (2051).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\x00"),
                       ("short", (2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + b"\x00")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=f"{name} is not an IDX label file"):
            read_idx_labels(str(tmp_path / name))
