"""Sets that need no download: ``digits[:N]`` (the first N of scikit-learn's 1797 8x8 handwritten
digits, default all), ``photos[:N]`` (N seeded 96 px crops of scikit-learn's two sample photographs,
default 1000), ``noise:gaussian[:N]`` and ``noise:uniform[:N]`` (N seeded 32x32 RGB noise images,
default 1000). The photos' and the noise's train and test draws differ, so those sets are never
scored on their own training images; the digits are one fixed set, the same in both splits."""
import glob
import importlib.util
import os

import numpy as np

from datasets.images import ArrayImages
from datasets.kind import Kind
from errors import UserError


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
    return 0 if split == "test" else 1


def _sklearn_file(*parts: str) -> str:
    """A data file scikit-learn ships, found without importing scikit-learn (which takes ~2 s: a
    training process needs the digits, not scikit-learn); '' where the package or file is missing."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.origin:
        return ""
    path = os.path.join(os.path.dirname(spec.origin), "datasets", *parts)
    return path if os.path.exists(path) else ""


def _digits():
    """scikit-learn's digits as load_digits() reads them: images (1797, 8, 8) in 0..16, targets."""
    path = _sklearn_file("data", "digits.csv.gz")
    if not path:
        from sklearn.datasets import load_digits  # another layout of the package: its own reader
        data = load_digits()
        return data.images, data.target
    table = np.loadtxt(path, delimiter=",")  # 64 pixels then the label, as load_digits reads it
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def _sample_photos():
    """scikit-learn's two sample photographs as load_sample_images() reads them (sorted by name)."""
    folder = _sklearn_file("images")
    paths = sorted(glob.glob(os.path.join(folder, "*.jpg"))) if folder else []
    if not paths:
        from sklearn.datasets import load_sample_images
        return load_sample_images().images
    from PIL import Image
    pictures = []
    for path in paths:
        with Image.open(path) as image:
            pictures.append(np.asarray(image))
    return pictures


def digits(arg, split, data_path, size, download):
    images, target = _digits()
    n = _count(arg, len(images))
    if n > len(images):
        raise UserError(f"digits:{n}: scikit-learn's digits are {len(images)} images")
    return ArrayImages("digits", np.round(images[:n] * (255.0 / 16.0)).astype(np.uint8), size, target[:n],
                       [str(i) for i in range(10)])


def photos(arg, split, data_path, size, download):
    n = _count(arg, 1000)
    pictures = _sample_photos()  # two (427, 640, 3) uint8 photographs
    rng = np.random.default_rng(_split_seed(split))
    crops = np.empty((n, 96, 96, 3), dtype=np.uint8)
    for i in range(n):
        p = pictures[i % len(pictures)]
        y, x = rng.integers(0, p.shape[0] - 96), rng.integers(0, p.shape[1] - 96)
        crops[i] = p[y:y + 96, x:x + 96]
    return ArrayImages("photos", crops, size)


def noise(arg, split, data_path, size, download):
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


KINDS = (
    Kind("digits", digits, "digits[:N]"),
    Kind("photos", photos, "photos[:N]"),
    Kind("noise", noise, "noise:gaussian[:N]|noise:uniform[:N]"),
)
