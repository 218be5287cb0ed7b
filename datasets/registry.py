"""Datasets by spec string, one registry for training and evaluation.

Specs: ``cifar10 cifar100 svhn mnist fashion-mnist kmnist celeba`` (torchvision layouts under
``data_path``), ``folder:PATH`` (every image below PATH; relative paths are looked up under
``data_path`` first, then the working directory), and sets that need no download: ``digits``
(scikit-learn's 8x8 handwritten digits), ``photos[:N]`` (N seeded crops of scikit-learn's two
sample photographs, default 1000), ``noise:gaussian[:N]`` and ``noise:uniform[:N]`` (N seeded
32x32 RGB noise images, default 1000).
"""
import gzip
import os
from typing import Callable, Dict, Tuple

import numpy as np

from datasets import openood
from datasets.images import ArrayImages, FolderImages, ImageSet, PILImages, SubsetImages
from errors import UserError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
SPLITS = ("train", "test", "val")  # val: OpenOOD's ID validation lists only


class DatasetMissing(UserError):
    """A requested set is not on disk (and could not be downloaded); the message names path and layout."""


def build_dataset(spec: str, split: str, data_path: str, image_size: int, download: bool = True) -> ImageSet:
    """Spec string -> ImageSet yielding uint8 (S, S, 3) tensors. Raises DatasetMissing / UserError.

    ``SPEC@CLASSES`` keeps the images of some classes of a labelled set: indices and ranges
    (``fashion-mnist@0-4``, ``cifar10@0,1,8``) or class names (``folder:PATH@cat,dog``).
    """
    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}")
    base_spec, at, class_list = spec.rpartition("@") if "@" in spec else (spec, "", "")
    kind, _, arg = base_spec.partition(":")
    if kind not in BUILDERS:
        raise UserError(f"unknown dataset {spec!r}; known: {', '.join(KNOWN_SPECS)}")
    if split == "val" and kind != "openood":
        raise UserError(f"{spec} has no validation split (only openood:BENCH sets have one)")
    try:
        ds = BUILDERS[kind](arg, split, data_path, image_size, download)
    except DatasetMissing:
        raise
    except UserError as e:  # a malformed spec: say which, where the message does not
        raise (e if base_spec in str(e) else UserError(f"dataset {spec!r}: {e}")) from None
    if at:
        ds = select_classes(ds, base_spec, class_list)
    ds.name = spec
    return ds


def select_classes(ds: ImageSet, spec: str, class_list: str) -> ImageSet:
    """The images of ``ds`` whose class is in ``class_list`` ("0-4", "0,1,8", "cat,dog"), in dataset order."""
    if ds.labels is None:
        raise UserError(f"{spec} has no classes to select with @{class_list}")
    if not ds.classes:
        raise UserError(f"{spec}@{class_list}: the folder has no class subfolders (its images lie directly in it), "
                        f"so there is no class to select; use {spec} without @{class_list}, or sort the images "
                        f"into one subfolder per class")
    valid = ", ".join(f"{i}={c}" for i, c in enumerate(ds.classes))
    wanted = set()
    for item in (x.strip() for x in class_list.split(",")):
        lo, dash, hi = item.partition("-")
        if item in ds.classes:
            wanted.add(ds.classes.index(item))
        elif item.isdigit() and int(item) < len(ds.classes):
            wanted.add(int(item))
        elif dash and lo.isdigit() and hi.isdigit() and int(lo) <= int(hi) < len(ds.classes):
            wanted.update(range(int(lo), int(hi) + 1))
        else:
            raise UserError(f"{spec}@{class_list}: unknown class {item!r}; the classes are {valid}")
    indices = np.flatnonzero(np.isin(ds.labels, sorted(wanted)))
    if len(indices) == 0:
        raise UserError(f"{spec}@{class_list}: no images in these classes")
    return SubsetImages(ds, indices.tolist())


def build_datasets(specs: Dict[str, str], split: str, data_path: str, image_size: int,
                   download: bool = True) -> Tuple[Dict[str, ImageSet], Dict[str, str]]:
    """Build every named set; return (sets found, {name: why missing}) so all gaps are reported at once."""
    found, missing = {}, {}
    for name, spec in specs.items():
        try:
            found[name] = build_dataset(spec, split, data_path, image_size, download)
        except DatasetMissing as e:
            missing[name] = str(e)
    return found, missing


# --------------------------------------------------------------------------- torchvision layouts

def _torchvision(cls_name: str, root: str, layout: str, download: bool, **kwargs):
    import torchvision.datasets as tvd  # here: about 1 s to import, and only these sets need it
    cls = getattr(tvd, cls_name)
    try:
        return cls(root=root, download=False, **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        first = e
    if download:
        try:
            return cls(root=root, download=True, **kwargs)
        except Exception as e:
            first = e
    reason = f"{first.__class__.__name__}: {first}".splitlines()[0]
    tail = "; automatic download failed" if download else " (download disabled)"
    raise DatasetMissing(f"not found under {os.path.abspath(root)}: expected {layout}{tail} ({reason})")


def _cifar(cls_name: str, folder: str):
    def build(arg, split, data_path, size, download):
        ds = _torchvision(cls_name, data_path, f"{folder}/ (torchvision {cls_name} layout)", download,
                          train=split == "train")
        return ArrayImages(cls_name.lower(), ds.data, size, ds.targets, ds.classes)
    return build


def _svhn(arg, split, data_path, size, download):
    root = os.path.join(data_path, "SVHN")
    ds = _torchvision("SVHN", root, f"{split}_32x32.mat (torchvision SVHN layout)", download, split=split)
    return ArrayImages("svhn", np.ascontiguousarray(ds.data.transpose(0, 2, 3, 1)), size, ds.labels,
                       [str(i) for i in range(10)])


def _mnist_like(cls_name: str):
    def build(arg, split, data_path, size, download):
        layout = (f"{cls_name}/raw/{'train' if split == 'train' else 't10k'}-images-idx3-ubyte[.gz] "
                  f"(torchvision {cls_name} layout)")
        if cls_name == "FashionMNIST" and not _has_mnist_raw(data_path, cls_name) and os.path.isdir(DEBIAN_FASHION_MNIST):
            prefix = "train" if split == "train" else "t10k"
            return ArrayImages("fashion-mnist", read_idx_images(
                os.path.join(DEBIAN_FASHION_MNIST, f"{prefix}-images-idx3-ubyte.gz")), size,
                read_idx_labels(os.path.join(DEBIAN_FASHION_MNIST, f"{prefix}-labels-idx1-ubyte.gz")),
                FASHION_MNIST_CLASSES)
        try:
            ds = _torchvision(cls_name, data_path, layout, download, train=split == "train")
        except DatasetMissing as e:
            if cls_name == "FashionMNIST":
                raise DatasetMissing(f"{e}; on Debian, `apt-get install dataset-fashion-mnist` also works") from None
            raise
        return ArrayImages(cls_name.lower(), ds.data.numpy(), size, ds.targets.numpy(), ds.classes)
    return build


def _has_mnist_raw(data_path: str, cls_name: str) -> bool:
    raw = os.path.join(data_path, cls_name, "raw")
    return os.path.isdir(raw) and any(f.startswith("t10k-images") for f in os.listdir(raw))


def read_idx_images(path: str) -> np.ndarray:
    """An IDX image file (optionally gzipped) -> uint8 (N, H, W)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic, n, h, w = (int.from_bytes(data[i:i + 4], "big") for i in range(0, 16, 4))
    if magic != 2051 or len(data) != 16 + n * h * w:
        raise UserError(f"{path} is not an IDX image file")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, h, w)


def read_idx_labels(path: str) -> np.ndarray:
    """An IDX label file (optionally gzipped) -> uint8 (N,)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic, n = (int.from_bytes(data[i:i + 4], "big") for i in range(0, 8, 4))
    if magic != 2049 or len(data) != 8 + n:
        raise UserError(f"{path} is not an IDX label file")
    return np.frombuffer(data, dtype=np.uint8, offset=8)


# torchvision's FashionMNIST.classes
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


def _celeba(arg, split, data_path, size, download):
    ds = _torchvision("CelebA", data_path, "celeba/img_align_celeba/ and celeba/list_eval_partition.txt "
                      "(torchvision CelebA layout), or use folder:PATH", download, split=split, target_type=[])
    return PILImages("celeba", ds, size, fingerprint=f"celeba|{split}|{len(ds)}|{os.path.abspath(data_path)}")


# --------------------------------------------------------------------------- folders

def _folder(arg, split, data_path, size, download):
    if not arg:
        raise UserError("folder: needs a path, e.g. folder:LSUN or folder:/data/iSUN")
    candidates = [arg] if os.path.isabs(arg) else [os.path.join(data_path, arg), arg]
    for path in candidates:
        if os.path.isdir(path):
            return FolderImages(f"folder:{arg}", path, size)
    where = " or ".join(os.path.abspath(c) for c in candidates)
    raise DatasetMissing(f"no folder at {where}: expected a folder of images (any depth, e.g. an ImageFolder)")


# --------------------------------------------------------------------------- sets that ship with packages

def _count(arg: str, default: int) -> int:
    if not arg:
        return default
    try:
        n = int(arg)
    except ValueError:
        raise UserError(f"expected an image count, got {arg!r}") from None
    if n <= 0:
        raise UserError(f"the image count (after the last ':') must be positive, got {n}")
    return n


def _split_seed(split: str) -> int:
    # Train and test draws of the synthetic sets differ, so a set is never scored on its own training images.
    return 0 if split == "test" else 1


def _digits(arg, split, data_path, size, download):
    from sklearn.datasets import load_digits  # here: scikit-learn takes ~2 s to import
    digits = load_digits()  # images (1797, 8, 8), values 0..16
    return ArrayImages("digits", np.round(digits.images * (255.0 / 16.0)).astype(np.uint8), size, digits.target,
                       [str(i) for i in range(10)])


def _photos(arg, split, data_path, size, download):
    from sklearn.datasets import load_sample_images  # here: scikit-learn takes ~2 s to import
    n = _count(arg, 1000)
    photos = load_sample_images().images  # two (427, 640, 3) uint8 photographs
    rng = np.random.default_rng(_split_seed(split))
    crops = np.empty((n, 96, 96, 3), dtype=np.uint8)
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - 96), rng.integers(0, p.shape[1] - 96)
        crops[i] = p[y:y + 96, x:x + 96]
    return ArrayImages("photos", crops, size)


def _noise(arg, split, data_path, size, download):
    kind, _, count = arg.partition(":")
    n = _count(count, 1000)
    rng = np.random.default_rng(_split_seed(split))
    if kind == "gaussian":
        a = np.clip(rng.normal(127.5, 64.0, (n, 32, 32, 3)), 0, 255)
    elif kind == "uniform":
        a = rng.uniform(0, 256, (n, 32, 32, 3))
    else:
        raise UserError(f"noise:{arg}: expected noise:gaussian[:N] or noise:uniform[:N]")
    return ArrayImages(f"noise:{kind}", a.astype(np.uint8), size)


def _openood(arg, split, data_path, size, download):
    try:
        return openood.build(arg, split, data_path, size, download)
    except openood.MissingData as e:
        raise DatasetMissing(str(e)) from None


BUILDERS: Dict[str, Callable[..., ImageSet]] = {
    "cifar10": _cifar("CIFAR10", "cifar-10-batches-py"),
    "cifar100": _cifar("CIFAR100", "cifar-100-python"),
    "svhn": _svhn,
    "mnist": _mnist_like("MNIST"),
    "fashion-mnist": _mnist_like("FashionMNIST"),
    "kmnist": _mnist_like("KMNIST"),
    "celeba": _celeba,
    "folder": _folder,
    "digits": _digits,
    "photos": _photos,
    "noise": _noise,
    "openood": _openood,
}
KNOWN_SPECS = ("cifar10", "cifar100", "svhn", "mnist", "fashion-mnist", "kmnist", "celeba", "folder:PATH",
               "openood:BENCH[/SET]",
               "digits", "photos[:N]", "noise:gaussian[:N]", "noise:uniform[:N]")
