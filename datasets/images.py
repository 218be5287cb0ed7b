"""Image sets as the extractor consumes them: resized uint8 (S, S, 3) tensors ((S, S) for grayscale arrays).

docs/METHOD.md §1: PIL -> RGB -> Resize([S, S]) bilinear -> ToTensor -> Normalize. Decoding and
resizing run here (in DataLoader workers where there are any); ToTensor + Normalize are done once
per batch by ``MultiLayerFeatures.normalize`` (bit-identical, a test checks it). Grayscale images
are resized in "L" mode and copied to three channels later, which gives the same bytes as
converting first. In-memory arrays are resized a group of images per PIL call (``resize_batch``).
"""
import hashlib
import os
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from errors import UserError


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def eight_bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale (a 16-bit PNG or TIFF) scaled to 8 bits by its high byte, as Pillow itself
    reduces 16-bit RGB files; PIL's convert("RGB") would clip it to white instead. 32-bit integer
    or float pixels (modes I and F) have no defined 8-bit scale: refused, with the reason."""
    if img.mode in SIXTEEN_BIT_MODES:
        return Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8), mode="L")
    if img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "floating-point"
        raise UserError(f"{kind} pixels (PIL mode {img.mode}) have no defined 8-bit scale; save the image with "
                        f"8- or 16-bit channels")
    return img


def resized(img: Image.Image, size: int) -> np.ndarray:
    """PIL image (L or RGB; 16-bit grayscale scaled to 8 bits; other modes become RGB) -> uint8 (size, size[, 3]).

    What torchvision's Resize([size, size]) does to a PIL image (tests check it bit for bit),
    without importing torchvision in every worker.
    """
    img = eight_bit(img)
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return np.array(img.resize((size, size), Image.BILINEAR))


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (B, H, W) or (B, H, W, 3) -> (B, size, size[, 3]), equal bit for bit to ``resized`` on each image.

    Pillow's bilinear resize is two separable passes, horizontal then vertical, through an 8-bit
    intermediate image, with weights that depend only on the input and output lengths. Rows are
    independent in the first pass and columns in the second, so a group of images goes through the
    first stacked vertically and through the second side by side: two PIL calls per group.
    Recent Pillow runs the vertical pass first when the height shrinks more than twice as much as
    the width; such images (never square ones) are resized one by one.
    """
    b, h, w = images.shape[:3]
    if h - size > 0 and h - size > 2 * (w - size):
        return np.stack([resized(Image.fromarray(x), size) for x in images])
    group = max(1, 4096 // size)  # wider than ~4096 px, Pillow's vertical pass slows down (measured)
    if b <= group:
        return _resize_group(images, size)
    return np.concatenate([_resize_group(images[i:i + group], size) for i in range(0, b, group)])


def _resize_group(images: np.ndarray, size: int) -> np.ndarray:
    b, h, w = images.shape[:3]
    c = images.shape[3:]  # () or (3,)
    if w != size:  # (B*H, W) -> (B*H, size)
        tall = Image.fromarray(np.ascontiguousarray(images).reshape(b * h, w, *c))
        images = np.asarray(tall.resize((size, b * h), Image.BILINEAR)).reshape(b, h, size, *c)
    if h != size:  # (H, B*size) -> (size, B*size)
        wide = Image.fromarray(np.ascontiguousarray(np.swapaxes(images, 0, 1)).reshape(h, b * size, *c))
        images = np.swapaxes(np.asarray(wide.resize((b * size, size), Image.BILINEAR)).reshape(size, b, size, *c), 0, 1)
    return np.require(images, requirements=["C", "W"])  # torch.from_numpy wants a writable array


def to_rgb_resized(img: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> uint8 (size, size, 3) tensor."""
    arr = resized(img, size)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return torch.from_numpy(arr)


def read_text_lines(path: str) -> list:
    """The lines of a text file list, as text editors read it: UTF-8, a byte-order mark at the start
    dropped, bytes that are not UTF-8 kept as the OS's file-name bytes (surrogateescape); line ends
    "\n" or "\r\n" (the "\r" is removed). Raises OSError."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        return [line.removesuffix("\r") for line in f.read().split("\n")]


class ImageSet(torch.utils.data.Dataset):
    """Base: ``load(i)`` gives a PIL image; ``fingerprint()`` identifies the content for caches.

    A labelled set also has ``labels`` (N,) class indices and ``classes`` (their names), which
    class filters (``SPEC@CLASSES``) select by.
    """

    name: str = ""
    labels: Optional[np.ndarray] = None
    classes: Optional[list] = None
    no_classes_reason: str = "it has no classes"  # said when a class filter finds none

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

    def __init__(self, name: str, array: np.ndarray, image_size: int, labels=None, classes=None):
        super().__init__(image_size)
        if array.dtype != np.uint8 or array.ndim not in (3, 4) or len(array) == 0:
            raise ValueError(f"{name}: expected a non-empty uint8 (N, H, W[, 3]) array, got {array.dtype} {array.shape}")
        self.name = name
        self.array = array
        if labels is not None:
            self.labels, self.classes = np.asarray(labels, dtype=np.int64), list(classes)

    def __len__(self) -> int:
        return len(self.array)

    def load(self, i: int) -> Image.Image:
        a = self.array[i]
        return Image.fromarray(a, mode="L" if a.ndim == 2 else "RGB")

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list:
        """DataLoader's batched fetch. A grayscale set stays one channel: normalize copies it to three."""
        return list(torch.from_numpy(resize_batch(self.array[np.asarray(indices)], self.image_size)))

    def fingerprint(self) -> str:
        h = hashlib.sha1(str(self.array.shape).encode())
        h.update(np.ascontiguousarray(self.array).data)
        return h.hexdigest()


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def list_images(root: str) -> list:
    """Every file with an image extension below ``root``, sorted by path. Links are followed, but
    each real folder is visited once, so a link loop (``loop -> ..``) cannot repeat or hang the walk."""
    seen, files = set(), []
    for d, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        files += [os.path.join(d, f) for f in names if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files)


class ListedImages(ImageSet):
    """Image files below ``root``, in the order given: the content of a folder (``FolderImages``) or
    of an image list (``datasets/openood.py``). Its identity is each file's path below ``root``, size
    and modification time, in order: a file rewritten in place gives another cache key."""

    def __init__(self, name: str, root: str, files: Sequence[str], image_size: int, labels=None, classes=None):
        super().__init__(image_size)
        self.name, self.root, self.files = name, root, list(files)
        if labels is not None:
            self.labels, self.classes = np.asarray(labels, dtype=np.int64), list(classes)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> Image.Image:
        path = self.files[i]
        try:
            with Image.open(path) as img:
                img.load()
                return img
        except Exception as e:
            raise UserError(f"cannot read image {path!r}: {e.__class__.__name__}: {e}") from None

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for f in self.files:
            try:
                st = os.stat(f)
            except OSError as e:
                raise UserError(f"cannot read image {f!r}: {(e.strerror or str(e)).lower()} "
                                f"(a broken link?)") from None
            h.update(f"{os.path.relpath(f, self.root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


class FolderImages(ListedImages):
    """Every image file below ``root`` (any depth: ImageFolder class folders or a flat folder), sorted by path."""

    def __init__(self, name: str, root: str, image_size: int):
        files = list_images(root)
        if not files:
            raise UserError(f"{name}: no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        # ImageFolder classes: the first folder level below root (files directly in root have none, -1).
        tops = [os.path.relpath(f, root).split(os.sep) for f in files]
        classes = sorted({t[0] for t in tops if len(t) > 1})
        index = {c: i for i, c in enumerate(classes)}
        super().__init__(name, root, files, image_size, [index[t[0]] if len(t) > 1 else -1 for t in tops], classes)
        self.no_classes_reason = ("the folder has no class subfolders (its images lie directly in it; sort them "
                                  "into one subfolder per class)")


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
        if base.labels is not None:
            self.labels, self.classes = base.labels[np.asarray(self.indices, dtype=np.int64)], base.classes

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> Image.Image:
        return self.base.load(self.indices[i])

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.base[self.indices[i]]

    def __getitems__(self, indices: Sequence[int]) -> list:
        mapped = [self.indices[i] for i in indices]
        if callable(getattr(self.base, "__getitems__", None)):
            return self.base.__getitems__(mapped)
        return [self.base[i] for i in mapped]

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
