"""Image sets as the extractor consumes them: resized uint8 (S, S, 3) tensors ((S, S) for grayscale arrays).

REFERENCE §1: PIL -> RGB -> Resize([S, S]) bilinear -> ToTensor -> Normalize. The per-image part
(decode and resize) runs here, in DataLoader workers; ToTensor + Normalize are done once per batch
by ``MultiLayerFeatures.normalize`` (bit-identical, a test checks it). Grayscale images are resized
in "L" mode and then copied to three channels, which gives the same bytes as converting first.
"""
import hashlib
import os
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from utils.errors import UserError


def resized(img: Image.Image, size: int) -> np.ndarray:
    """PIL image (L or RGB; other modes become RGB) -> uint8 (size, size[, 3]).

    What torchvision's Resize([size, size]) does to a PIL image (tests check it bit for bit),
    without importing torchvision in every worker.
    """
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return np.array(img.resize((size, size), Image.BILINEAR))


def to_rgb_resized(img: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> uint8 (size, size, 3) tensor."""
    arr = resized(img, size)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return torch.from_numpy(arr)


class ImageSet(torch.utils.data.Dataset):
    """Base: ``load(i)`` gives a PIL image; ``fingerprint()`` identifies the content for caches."""

    name: str = ""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_rgb_resized(self.load(i), self.image_size)

    def identity(self) -> dict:
        return {"name": self.name, "n": len(self), "content": self.fingerprint()}


class ArrayImages(ImageSet):
    """In-memory uint8 images: (N, H, W) grayscale or (N, H, W, 3) RGB."""

    def __init__(self, name: str, array: np.ndarray, image_size: int):
        super().__init__(image_size)
        if array.dtype != np.uint8 or array.ndim not in (3, 4) or len(array) == 0:
            raise ValueError(f"{name}: expected a non-empty uint8 (N, H, W[, 3]) array, got {array.dtype} {array.shape}")
        self.name = name
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def load(self, i: int) -> Image.Image:
        a = self.array[i]
        return Image.fromarray(a, mode="L" if a.ndim == 2 else "RGB")

    def __getitem__(self, i: int) -> torch.Tensor:
        # A grayscale set stays one channel here: the batched normalize copies it to three.
        return torch.from_numpy(resized(self.load(i), self.image_size))

    def fingerprint(self) -> str:
        h = hashlib.sha1(str(self.array.shape).encode())
        h.update(np.ascontiguousarray(self.array).data)
        return h.hexdigest()


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class FolderImages(ImageSet):
    """Every image file below ``root`` (any depth: ImageFolder class folders or a flat folder), sorted by path."""

    def __init__(self, name: str, root: str, image_size: int):
        super().__init__(image_size)
        self.name = name
        self.root = root
        self.files = sorted(
            os.path.join(d, f) for d, _, fs in os.walk(root, followlinks=True) for f in fs
            if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not self.files:
            raise UserError(f"{name}: no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> Image.Image:
        path = self.files[i]
        try:
            with Image.open(path) as img:
                img.load()
                return img
        except Exception as e:
            raise UserError(f"cannot read image {path}: {e.__class__.__name__}: {e}") from None

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for f in self.files:
            st = os.stat(f)
            h.update(f"{os.path.relpath(f, self.root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


class PILImages(ImageSet):
    """A torchvision dataset whose items are (PIL image, target), e.g. CelebA."""

    def __init__(self, name: str, dataset, image_size: int, fingerprint: str):
        super().__init__(image_size)
        self.name = name
        self.dataset = dataset
        self._fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, i: int) -> Image.Image:
        return self.dataset[i][0]

    def fingerprint(self) -> str:
        return self._fingerprint


class SubsetImages(ImageSet):
    """A fixed subset of another set (e.g. a training subset); part of the cache identity."""

    def __init__(self, base: ImageSet, indices: Sequence[int]):
        super().__init__(base.image_size)
        self.base = base
        self.indices = list(indices)
        self.name = base.name

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> Image.Image:
        return self.base.load(self.indices[i])

    def fingerprint(self) -> str:
        h = hashlib.sha1(self.base.fingerprint().encode())
        h.update(np.asarray(self.indices, dtype=np.int64).tobytes())
        return h.hexdigest()


def random_subset(base: ImageSet, n: Optional[int], seed: int = 0) -> ImageSet:
    """The same ``n`` images every time (seeded permutation, kept in dataset order); all if n is None."""
    if n is None or n >= len(base):
        return base
    if n <= 0:
        raise UserError(f"subset size must be positive, got {n}")
    idx = np.sort(np.random.default_rng(seed).permutation(len(base))[:n])
    return SubsetImages(base, idx.tolist())
