"""The sets torchvision knows, read in torchvision's layouts under ``data_path`` (downloaded where there
is internet): cifar10, cifar100, svhn, mnist, fashion-mnist (also from the gzipped IDX files of
Debian's dataset-fashion-mnist package, in its folder or copied to <data_path>/fashion-mnist/),
kmnist, celeba."""
import gzip
import os

import numpy as np

from datasets.images import ArrayImages, PILImages
from datasets.kind import DatasetMissing, Kind
from errors import UserError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# torchvision's FashionMNIST.classes
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


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
        idx = idx_folder(data_path) if cls_name == "FashionMNIST" and not _has_mnist_raw(data_path, cls_name) else None
        if idx is not None:
            prefix = "train" if split == "train" else "t10k"
            return ArrayImages("fashion-mnist", read_idx_images(os.path.join(idx, f"{prefix}-images-idx3-ubyte.gz")),
                               size, read_idx_labels(os.path.join(idx, f"{prefix}-labels-idx1-ubyte.gz")),
                               FASHION_MNIST_CLASSES)
        try:
            ds = _torchvision(cls_name, data_path, layout, download, train=split == "train")
        except DatasetMissing as e:
            if cls_name == "FashionMNIST":
                raise DatasetMissing(f"{e}; on Debian, `apt-get install dataset-fashion-mnist` also works") from None
            raise
        return ArrayImages(cls_name.lower(), ds.data.numpy(), size, ds.targets.numpy(), ds.classes)
    return build


def idx_folder(data_path: str):
    """Where Fashion-MNIST's four gzipped IDX files lie in Debian's layout: <data_path>/fashion-mnist/
    (a copy, e.g. tools/gpu_bundle.py's), else Debian's own folder; None where neither holds them."""
    for folder in (os.path.join(data_path, "fashion-mnist"), DEBIAN_FASHION_MNIST):
        if os.path.isfile(os.path.join(folder, "t10k-images-idx3-ubyte.gz")):
            return folder
    return None


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


def _celeba(arg, split, data_path, size, download):
    ds = _torchvision("CelebA", data_path, "celeba/img_align_celeba/ and celeba/list_eval_partition.txt "
                      "(torchvision CelebA layout), or use folder:PATH", download, split=split, target_type=[])
    return PILImages("celeba", ds, size, fingerprint=f"celeba|{split}|{len(ds)}|{os.path.abspath(data_path)}")


KINDS = (
    Kind("cifar10", _cifar("CIFAR10", "cifar-10-batches-py"), "cifar10"),
    Kind("cifar100", _cifar("CIFAR100", "cifar-100-python"), "cifar100"),
    Kind("svhn", _svhn, "svhn"),
    Kind("mnist", _mnist_like("MNIST"), "mnist"),
    Kind("fashion-mnist", _mnist_like("FashionMNIST"), "fashion-mnist"),
    Kind("kmnist", _mnist_like("KMNIST"), "kmnist"),
    Kind("celeba", _celeba, "celeba"),
)
