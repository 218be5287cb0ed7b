"""What the Python API reads as images: one contract, stated once (``CONTRACT``, docs/USAGE.md
"Images in"), checked at the API's boundary and trusted inside.

- An **array or tensor** is one image or a batch by its shape (``IMAGE_RULE``).
- A **list or tuple** is a batch of single images (file paths, PIL images, or arrays holding one
  image each) - unless its first item is itself a batch of images (or a 3-D array beside 1-D label
  arrays, which are never images): then it is a **DataLoader batch** ``(x, y, ...)``, whose ``x`` is
  the images and whose other items must be one value or one row per image (labels, one-hot labels,
  indices; ignored). What can be read both ways is refused, naming the ways out (``loader_batch``).
- A **PIL image** or a **file path** alone is one image.

Values: uint8 0..255, or floats in [0, 1] (torchvision's ToTensor) rounded back to uint8.
"""
import os
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from datasets.images import resize_batch, to_rgb_resized

Images = Union[torch.Tensor, np.ndarray, list, tuple, Image.Image, str, os.PathLike]
CHANNELS = (1, 3, 4)
IMAGE_RULE = ("One image or a batch: (H, W) is one grayscale image; (H, W, C) and (C, H, W) with C = 1, 3 or 4 "
              "are one image (where both axes could be C, the smaller is; equal: the last); any other 3-D array is "
              "a batch (B, H, W) of grayscale images (give a batch of 1, 3 or 4 of them as (B, 1, H, W)); "
              "(B, H, W, C) and (B, C, H, W) are batches, C chosen the same way. uint8 values 0..255, or floats in "
              "[0, 1] (ToTensor's; rounded to the nearest of 0..255). RGBA loses its alpha channel, as predict.py's "
              "file reader does.")
CONTRACT = ("an array or tensor (one image or a batch by its shape); a list or tuple of single images (paths, PIL "
            "images or one-image arrays); a DataLoader batch (x, y, ...) whose x is a batch; or one PIL image or "
            "file path")


def as_uint8_images(images: Images, size: int) -> torch.Tensor:
    """Any input of the contract -> uint8 (B, size, size[, 3]), resized as every image of the project
    is. Anything else is a ValueError naming what was received and the contract."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return _one_image(images, size)[None]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given (an empty list)")
        if loader_batch(images):
            x = images[0]  # a DataLoader batch's x is a batch: a 3-D one is (B, H, W) grayscale
            return as_uint8_images(x[:, None] if x.ndim == 3 else x, size)
        return torch.stack([_one_image(im, size) for im in images])
    if not isinstance(images, (torch.Tensor, np.ndarray)):
        raise ValueError(f"cannot read images from a {type(images).__name__}; accepted: {CONTRACT}")
    arr = _numpy(images)
    if arr.size == 0:
        raise ValueError(f"no images given (a batch of shape {tuple(images.shape)})")
    arr = _channels_last_uint8(arr)
    if arr.shape[1:3] != (size, size):
        arr = resize_batch(arr, size)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _numpy(images) -> np.ndarray:
    if isinstance(images, np.ndarray):
        return images
    if images.device.type == "meta":
        raise ValueError(f"a tensor on the meta device holds no values (shape {tuple(images.shape)}); pass one "
                         f"with its data, on the CPU or a GPU")
    t = images.detach().cpu()
    return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()


def image_count(shape: tuple) -> int:
    """How many images an array of ``shape`` holds by ``IMAGE_RULE`` (0 where the rule cannot read it)."""
    if len(shape) == 2:
        return 1
    if len(shape) == 3:
        return 1 if shape[-1] in CHANNELS or shape[0] in CHANNELS else shape[0]
    if len(shape) == 4 and (shape[-1] in CHANNELS or shape[1] in CHANNELS):
        return shape[0]
    return 0


def _is_batch(x) -> bool:
    """Whether ``x`` is an array or tensor holding a batch by ``IMAGE_RULE`` (4-D, or 3-D with no channel axis)."""
    return isinstance(x, (torch.Tensor, np.ndarray)) and (x.ndim == 4 or (x.ndim == 3 and image_count(x.shape) != 1))


def _per_image(extra, n: int):
    """``extra`` as an array if it holds one value or one row per image of a batch of ``n``, else None."""
    if isinstance(extra, (list, tuple)) and not any(isinstance(e, (torch.Tensor, np.ndarray, Image.Image, str))
                                                    for e in extra):
        extra = np.asarray(extra)
    if isinstance(extra, (torch.Tensor, np.ndarray)) and extra.ndim in (1, 2) and len(extra) == n:
        return extra
    return None


def loader_batch(items) -> bool:
    """Whether a list or tuple is a DataLoader batch (x, y, ...) rather than a list of single images:

    1. its first item is a batch by ``IMAGE_RULE``: the other items must be one value or one row per
       image (labels, one-hot labels, indices), or a ValueError names the way out;
    2. its first item is a 3-D array the rule reads as one image, and every other item is a 1-D array
       of its first axis's length: a 1-D array is never an image, so this is a batch of 1, 3 or 4
       grayscale images (B, H, W) with labels or indices;
    3. as 2, but with 2-D items of that many rows, and a first axis of 1, 3 or 4: a grayscale batch with
       one-hot labels, or a list of images? Refused, naming both ways out;
    4. anything else is a list of single images.
    """
    first, rest = items[0], items[1:]
    if _is_batch(first):
        n = len(first)
        for i, extra in enumerate(rest, 1):
            if _per_image(extra, n) is None:
                what = (f"shape {tuple(extra.shape)}" if isinstance(extra, (torch.Tensor, np.ndarray))
                        else f"a {type(extra).__name__}")
                raise ValueError(f"a list or tuple whose first item is a batch of {n} images (shape "
                                 f"{tuple(first.shape)}) is read as a DataLoader batch (x, y, ...), but item {i} "
                                 f"({what}) is not one value or row per image; pass the batch alone, or a list of "
                                 f"single images")
        return True
    if not (isinstance(first, (torch.Tensor, np.ndarray)) and first.ndim == 3 and rest):
        return False
    n = first.shape[0]
    extras = [_per_image(extra, n) for extra in rest]
    if all(e is not None and e.ndim == 1 for e in extras):
        return True
    if n in CHANNELS and all(e is not None for e in extras):
        raise ValueError(f"ambiguous images: a first item of shape {tuple(first.shape)} beside items of "
                         f"{', '.join(str(tuple(e.shape)) for e in extras)} may be a DataLoader batch of {n} "
                         f"grayscale images with one-hot labels, or a list of single images; pass the batch alone as "
                         f"({n}, 1, H, W), or wrap each image in its own list item with a channel axis")
    return False


def _one_image(im, size: int) -> torch.Tensor:
    """A path, a PIL image or one array image -> uint8 (size, size, 3)."""
    if isinstance(im, (str, os.PathLike)):
        try:
            with Image.open(im) as opened:
                opened.load()
                return to_rgb_resized(opened, size)
        except (OSError, ValueError) as e:  # missing, unreadable, not an image
            raise ValueError(f"cannot read the image file {os.fspath(im)!r}: {getattr(e, 'strerror', None) or e}") \
                from None
    if isinstance(im, Image.Image):
        return to_rgb_resized(im, size)
    if isinstance(im, (torch.Tensor, np.ndarray)):
        one = as_uint8_images(im, size)
        if len(one) != 1:
            raise ValueError(f"a list item holds {len(one)} images (shape {tuple(im.shape)}); give a list of "
                             f"single images, or the batch itself")
        out = one[0]
        return out if out.dim() == 3 else out[..., None].expand(size, size, 3)
    raise ValueError(f"cannot read an image from a {type(im).__name__} in the list; accepted: {CONTRACT}")


def _channel_axis(first: int, last: int) -> Optional[str]:
    """Which of two candidate axes holds the channels: the one of size 1, 3 or 4; where both are,
    the smaller ((B, 1, H, 4) is grayscale, (B, 3, 4, 4) is RGB); equal sizes: the last."""
    fits = [name for name, n in (("first", first), ("last", last)) if n in CHANNELS]
    if len(fits) == 2:
        return "first" if first < last else "last"
    return fits[0] if fits else None


def _floats_to_uint8(arr: np.ndarray) -> np.ndarray:
    """[0, 1] floats (ToTensor's) -> uint8, rounded to nearest: the inverse of ToTensor's x / 255."""
    arr = arr.astype(np.float32, copy=False)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 1:
        what = ("NaN or inf" if not (np.isfinite(lo) and np.isfinite(hi)) else
                f"values down to {lo:.6g}" if lo < 0 else f"values up to {hi:.9g}")
        hint = (" (they look normalised, e.g. by Normalize(mean, std): pass the images before normalising; "
                "the backbone normalises them itself)" if np.isfinite(lo) and lo < 0 else "")
        raise ValueError(f"float images must hold values between 0 and 1 (ToTensor's range); got {arr.dtype} "
                         f"{tuple(arr.shape)} with {what}, outside it{hint}")
    return np.rint(arr * 255.0).astype(np.uint8)


def _channels_last_uint8(arr: np.ndarray) -> np.ndarray:
    """Images in any layout of ``IMAGE_RULE`` -> uint8 (B, H, W) or (B, H, W, 3)."""
    shape = tuple(arr.shape)
    if arr.dtype.kind == "f":
        arr = _floats_to_uint8(arr)
    elif arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0..255) or float in [0, 1]; got {arr.dtype} {shape}. {IMAGE_RULE}")
    if arr.ndim == 2:  # one grayscale image
        arr = arr[None, ..., None]
    elif arr.ndim == 3:
        axis = _channel_axis(shape[0], shape[-1])
        if axis == "last":  # one (H, W, C) image
            arr = arr[None]
        elif axis == "first":  # one (C, H, W) image (torchvision's read_image, PILToTensor, ToTensor)
            arr = arr.transpose(1, 2, 0)[None]
        else:  # a batch (B, H, W) of grayscale images
            arr = arr[..., None]
    elif arr.ndim == 4:
        axis = _channel_axis(shape[1], shape[-1])
        if axis == "first":  # (B, C, H, W)
            arr = arr.transpose(0, 2, 3, 1)
        elif axis is None:
            raise ValueError(f"cannot read images of shape {shape}: no axis of 1, 3 or 4 channels. {IMAGE_RULE}")
    else:
        raise ValueError(f"cannot read images of shape {shape}. {IMAGE_RULE}")
    channels = arr.shape[-1]
    if channels == 1:
        return arr[..., 0]
    return arr[..., :3]  # RGBA: the alpha channel is dropped, as predict.py's reader (PIL's convert("RGB")) does
