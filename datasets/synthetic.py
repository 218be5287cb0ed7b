"""Sets that need no download: ``digits`` (scikit-learn's 8x8 handwritten digits), ``photos[:N]`` (N
seeded 96 px crops of scikit-learn's two sample photographs, default 1000), ``noise:gaussian[:N]`` and
``noise:uniform[:N]`` (N seeded 32x32 RGB noise images, default 1000). Train and test draws differ,
so a set is never scored on its own training images."""
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


def digits(arg, split, data_path, size, download):
    from sklearn.datasets import load_digits  # here: scikit-learn takes ~2 s to import
    data = load_digits()  # images (1797, 8, 8), values 0..16
    return ArrayImages("digits", np.round(data.images * (255.0 / 16.0)).astype(np.uint8), size, data.target,
                       [str(i) for i in range(10)])


def photos(arg, split, data_path, size, download):
    from sklearn.datasets import load_sample_images  # here: scikit-learn takes ~2 s to import
    n = _count(arg, 1000)
    pictures = load_sample_images().images  # two (427, 640, 3) uint8 photographs
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
    Kind("digits", digits, "digits"),
    Kind("photos", photos, "photos[:N]"),
    Kind("noise", noise, "noise:gaussian[:N]|noise:uniform[:N]"),
)
