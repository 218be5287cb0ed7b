"""The Python API: DLSR and the same-feature baselines as detectors in pytorch-ood's shape.

    detector = DLSRDetector.from_checkpoint("checkpoint/checkpoint-last.pth")
    detector.calibrate(id_loader)              # thresholds accepting 95% of these ID images
    scores = detector(images)                  # (B,) headline score, higher = more OOD
    flags = detector.is_ood(images)            # (B,) bool, at the calibrated threshold

    knn = KNNDetector("config/demo.yaml", k=1).fit(train_loader)   # the baseline, on the same features

Where pytorch-ood is installed, every detector here is a ``pytorch_ood.api.FeaturesDetector``,
so ``Benchmark.evaluate(detector)`` and ``OODMetrics`` take it unchanged. Images come as the
ecosystem gives them (``as_uint8_images``): uint8 arrays or tensors, float tensors in [0, 1]
from torchvision's ``ToTensor``, DataLoader ``(x, y)`` batches, PIL images or file paths.

DLSR trains through the same trainer as ``main.py`` (checkpoints into ``cfg.output_dir``) and
scores through the same engine as the evaluation scripts and ``predict.py``, so an image gets the
same scores from all of them; the baselines are the evaluation tables' own code (``Baselines``).
"""
import os
import re
from typing import Dict, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from datasets.images import resize_batch, to_rgb_resized
from models.features import MultiLayerFeatures
from utils.baselines import Baselines
from utils.checkpoint import config_of, load_checkpoint
from utils.config import DEFAULT_CONFIG, Config, load_config
from utils.distributed import DistContext, resolve_device
from utils.evaluation import SCORE_TYPES, Scorer
from utils.features import compute_mode, image_batch_features, vector_keys
from utils.model_factory import build_extractor
from utils.prediction import DEFAULT_TPR, thresholds_at, warn_if_few
from utils.training import train

try:  # pytorch-ood is optional: without it the detectors work the same, as plain classes
    from pytorch_ood.api import FeaturesDetector as _Base
except ImportError:
    _Base = object

Images = Union[torch.Tensor, np.ndarray, list, tuple]
ACCEPTED = ("image arrays or tensors by the rule of docs/USAGE.md (one image: (H, W), (H, W, C), (C, H, W); "
            "batches: (B, H, W), (B, H, W, C), (B, C, H, W); C = 1, 3 or 4; uint8, or floats in [0, 1]); a DataLoader "
            "batch (x, y, ...); or a list of PIL images, file paths or single images")


class FeatureDetector(_Base):
    """What every detector here shares: the config and device, images -> standardised features,
    calibration and verdicts. Subclasses fit and score features (``fit_features`` /
    ``predict_features``); higher score = more OOD."""

    requires_fit = True

    def __init__(self, config: Union[str, Config] = DEFAULT_CONFIG, device: Optional[str] = None):
        self.cfg = load_config(config) if isinstance(config, str) else config
        self.ctx = DistContext(0, 1, 0, resolve_device(checked_device(device or self.cfg.device)))
        self.extractor: Optional[MultiLayerFeatures] = None
        self.thresholds: Optional[Dict[str, float]] = None
        self.score = ""  # the headline score type, set by the subclass

    # ------------------------------------------------------------------ images in

    def fit(self, loader: Iterable):
        """Fit on ID images: ``loader`` yields image batches in any accepted form (labels ignored)."""
        z = [self._features(batch)[0] for batch in loader]
        if not z:
            raise ValueError(f"{type(self).__name__}.fit: the loader gave no images")
        return self.fit_features(torch.cat(z))

    def predict(self, images: Images, all_scores: bool = False) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """Scores of a batch of images (see ``as_uint8_images`` for the forms): the headline score (B,),
        or every score type by name."""
        z, keys = self._features(images)
        return self.predict_features(z, keys=keys, all_scores=all_scores)

    def features(self, images: Images):
        """(standardised vectors (B, D) on the device, image keys (B,)) of a batch of images."""
        return self._features(images)

    def calibrate(self, loader: Iterable, tpr: float = DEFAULT_TPR) -> Dict[str, float]:
        """Thresholds that accept a fraction ``tpr`` of the ID images in ``loader``; sets ``self.thresholds``."""
        if not 0 < tpr < 1:
            raise ValueError(f"tpr must be between 0 and 1 (exclusive), got {tpr}")
        parts = [self.predict(batch, all_scores=True) for batch in loader]
        if not parts:
            raise ValueError(f"{type(self).__name__}.calibrate: the loader gave no images")
        scores = {t: torch.cat([p[t] for p in parts]).numpy() for t in parts[0]}
        warn_if_few(len(next(iter(scores.values()))), tpr, f"{type(self).__name__}.calibrate")
        self.thresholds = thresholds_at(scores, tpr)
        return self.thresholds

    def is_ood(self, images: Images) -> torch.Tensor:
        """(B,) bool: the headline score above its calibrated threshold."""
        if self.thresholds is None:
            raise RuntimeError(f"{type(self).__name__}: call calibrate(loader) before is_ood()")
        return self.predict(images) > self.thresholds[self.score]

    def __call__(self, images: Images) -> torch.Tensor:
        """``predict(images)``, as pytorch-ood's detectors are called."""
        return self.predict(images)

    def to(self, device: Union[str, torch.device]) -> "FeatureDetector":
        """Move the detector (backbone, networks, fitted state) to ``device``."""
        self.ctx = DistContext(0, 1, 0, resolve_device(checked_device(str(device))))
        if self.extractor is not None:
            self.extractor.to(self.ctx.device)
        return self

    # ------------------------------------------------------------------ helpers

    def _extractor(self) -> MultiLayerFeatures:
        if self.extractor is None:
            self.extractor = build_extractor(self.cfg).to(self.ctx.device)
        return self.extractor

    def _features(self, images: Images):
        batch = as_uint8_images(images, self.cfg.backbone.input_size)
        return image_batch_features(self._extractor(), batch, self.ctx, compute_mode(self.cfg, self.ctx),
                                    self.cfg.extract_batch_size)

    def _checked(self, z: torch.Tensor, width: int, what: str) -> torch.Tensor:
        """``z`` as float32 (N, width) on the device, or a ValueError in the user's terms."""
        z = torch.as_tensor(z)
        if z.dim() != 2 or z.shape[1] != width:
            raise ValueError(f"{type(self).__name__}.{what}: expected standardised feature vectors (N, {width}) "
                             f"(the width of {self.cfg.backbone.name}'s features), got shape {tuple(z.shape)}")
        if len(z) == 0:
            raise ValueError(f"{type(self).__name__}.{what}: no feature vectors given (shape {tuple(z.shape)})")
        bad = (~torch.isfinite(z)).any(dim=1).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"{type(self).__name__}.{what}: {len(bad)} feature vector(s) hold NaN or inf (rows "
                             f"{', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''}); they cannot be "
                             f"scored, nor counted as in-distribution")
        return z.to(self.ctx.device, torch.float32)


class DLSRDetector(FeatureDetector):
    """Unsupervised OOD detector: train on ID images (or features), score new ones. Higher = more OOD.

    ``config``: a YAML path or a ``Config``; ``device`` (auto, cpu, cuda, cuda:N) and ``score`` (the
    headline score, MFsim or MSE) default to the config's ``device`` and ``eval.similarity_type``.
    """

    def __init__(self, config: Union[str, Config] = DEFAULT_CONFIG, device: Optional[str] = None,
                 score: Optional[str] = None):
        super().__init__(config, device)
        self.score = score or self.cfg.eval.similarity_type
        if self.score not in SCORE_TYPES:
            raise ValueError(f"score must be one of {SCORE_TYPES}, got {score!r}")
        self.scorer: Optional[Scorer] = None
        self._wrote: Optional[str] = None  # the output folder this detector's last fit wrote

    @classmethod
    def from_checkpoint(cls, path: str, config: Union[str, Config, None] = None, device: Optional[str] = None,
                        score: Optional[str] = None) -> "DLSRDetector":
        """A trained detector from a checkpoint of ours (its stored config is used) or of the authors' (give ``config``)."""
        ckpt = load_checkpoint(path)
        det = cls(config_of(ckpt, config, f"config={DEFAULT_CONFIG!r} (or the config it was trained with)"),
                  device, score)
        source = (f"config={config!r}" if isinstance(config, str) else "the config given" if config is not None
                  else f"the config stored in {path}")
        det.scorer = Scorer.from_checkpoints(det.cfg, det.ctx, {"end": ckpt}, source)
        det.extractor = det.scorer.extractor
        return det

    def fit_features(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> "DLSRDetector":
        """Train on standardised ID feature vectors x (N, D) through the trainer of ``main.py``
        (pytorch-ood's ``fit_features(x, y)``; the labels are not used)."""
        z = self._checked(x, self._extractor().feature_dim, "fit_features")
        # A refit replaces this detector's own checkpoints; another run's are refused, as main.py does.
        refit = self._wrote == os.path.abspath(self.cfg.output_dir)
        trainer = train(self.cfg, self.ctx, features=z, extractor=self.extractor, overwrite=refit)
        self._wrote = os.path.abspath(self.cfg.output_dir)
        self.scorer = Scorer(self.cfg, self.ctx, trainer.extractor, trainer.diffusion, {"end": trainer.ema.module})
        self.scorer.train_z = z  # eval.layer_norm's statistics come from these
        self.thresholds = None
        return self

    def predict_features(self, x: torch.Tensor, keys: Optional[torch.Tensor] = None,
                         all_scores: bool = False) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """Scores of standardised vectors x (B, D). ``keys`` (B,) int64 seed each vector's noise (the
        image digests that ``predict`` uses); by default a digest of each vector's own bytes does."""
        scorer = self._ready()
        z = self._checked(x, scorer.extractor.feature_dim, "predict_features")
        keys = vector_keys(z) if keys is None else _checked_keys(keys, len(z))
        scores = {t: torch.from_numpy(v) for t, v in scorer.scores(z, keys).items()}
        return scores if all_scores else scores[self.score]

    def to(self, device: Union[str, torch.device]) -> "DLSRDetector":
        super().to(device)
        if self.scorer is not None:
            self.scorer.to(self.ctx)
        return self

    def _ready(self) -> Scorer:
        if self.scorer is None:
            raise RuntimeError("DLSRDetector is not fitted: call fit(loader), fit_features(z) or "
                               "DLSRDetector.from_checkpoint(path) before predicting")
        return self.scorer


def _checked_keys(keys, n: int) -> torch.Tensor:
    """``keys`` as (n,) int64 on the CPU, or a ValueError: one integer per vector (``features()``'s image keys)."""
    k = torch.as_tensor(keys) if not isinstance(keys, torch.Tensor) else keys
    if k.dim() != 1 or len(k) != n or k.dtype.is_floating_point or k.dtype.is_complex or k.dtype == torch.bool:
        raise ValueError(f"DLSRDetector.predict_features: keys must be one integer per vector, shape ({n},) "
                         f"(the image keys that features() returns), got {k.dtype} of shape {tuple(k.shape)}")
    return k.to("cpu", torch.int64)


class _BaselineDetector(FeatureDetector):
    """A same-feature baseline of the evaluation tables (docs/METHOD.md §7a) as a detector: fitted on
    ID features, one score per vector (``Baselines``, the code behind the tables)."""

    name = ""

    def __init__(self, config: Union[str, Config] = DEFAULT_CONFIG, device: Optional[str] = None,
                 ks: Sequence[int] = ()):
        super().__init__(config, device)
        self.ks = list(ks)
        self.baselines: Optional[Baselines] = None

    def fit_features(self, x: torch.Tensor, y: Optional[torch.Tensor] = None):
        """Fit on standardised ID feature vectors x (N, D); the labels are not used."""
        z = self._checked(x, self._extractor().feature_dim, "fit_features")
        self.baselines = Baselines(z, [self.name], self.ks)
        self.thresholds = None
        return self

    def predict_features(self, x: torch.Tensor, keys: Optional[torch.Tensor] = None,
                         all_scores: bool = False) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """Scores of standardised vectors x (B, D); ``keys`` is accepted for symmetry with DLSR and unused."""
        if self.baselines is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(loader) or fit_features(z) first")
        z = self._checked(x, self._extractor().feature_dim, "predict_features")
        scores = {t: torch.from_numpy(np.asarray(v)) for t, v in self.baselines.scores(z).items()}
        return scores if all_scores else scores[self.score]

    def to(self, device: Union[str, torch.device]):
        super().to(device)
        if self.baselines is not None:
            self.baselines.to(self.ctx.device)
        return self


class KNNDetector(_BaselineDetector):
    """kNN: the distance of the L2-normalised feature vector to its k-th nearest L2-normalised ID
    training vector (Sun et al., ICML 2022). Score type ``kNN_k<k>``."""

    name = "knn"

    def __init__(self, config: Union[str, Config] = DEFAULT_CONFIG, k: int = 1, device: Optional[str] = None):
        if isinstance(k, bool) or not float(k).is_integer() or int(k) < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        super().__init__(config, device, [int(k)])
        self.score = f"kNN_k{int(k)}"


class MahalanobisDetector(_BaselineDetector):
    """The squared Mahalanobis distance to one Gaussian fitted on the ID training vectors (Ledoit-Wolf
    shrinkage). Score type ``Mahalanobis``."""

    name = "mahalanobis"

    def __init__(self, config: Union[str, Config] = DEFAULT_CONFIG, device: Optional[str] = None):
        super().__init__(config, device)
        self.score = "Mahalanobis"


# ---------------------------------------------------------------------- images as the ecosystem gives them

CHANNELS = (1, 3, 4)
IMAGE_RULE = ("One image or a batch: (H, W) is one grayscale image; (H, W, C) and (C, H, W) with C = 1, 3 or 4 "
              "are one image (where both axes could be C, the smaller is; equal: the last); any other 3-D array is "
              "a batch (B, H, W) of grayscale images (give a batch of 1, 3 or 4 of them as (B, 1, H, W)); "
              "(B, H, W, C) and (B, C, H, W) are batches, C chosen the same way. uint8 values 0..255, or floats in [0, 1] (ToTensor's; rounded to the nearest of "
              "0..255). RGBA loses its alpha channel, as predict.py's file reader does.")


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


def as_uint8_images(images: Images, size: int) -> torch.Tensor:
    """Any accepted image batch -> uint8 (B, size, size[, 3]), resized as every image of the project is.

    Arrays and tensors follow ``IMAGE_RULE`` (docs/USAGE.md, "One image, one score"): one image, or a
    batch. Floats in [0, 1] (torchvision's ToTensor) are rounded back to the uint8 pixels, so they
    score as the uint8 image does. A DataLoader batch ``(x, y, ...)`` (labels, one-hot labels,
    indices: one per image) is its ``x``; a list holds PIL images, file paths or single images.
    Anything else is a ValueError that names what was received and states the rule.
    """
    if isinstance(images, (list, tuple)):
        if _is_loader_batch(images):
            x = images[0]  # a batch by its labels' count: a 3-D x is (B, H, W) grayscale, whatever B is
            return as_uint8_images(x[:, None] if x.ndim == 3 else x, size)
        if not images:
            raise ValueError("no images given (an empty list)")
        return torch.stack([_one_image(im, size) for im in images])
    if not isinstance(images, (torch.Tensor, np.ndarray)):
        raise ValueError(f"cannot read images from a {type(images).__name__}; accepted: {ACCEPTED}")
    if isinstance(images, torch.Tensor):
        t = images.detach().cpu()
        arr = (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()
    else:
        arr = np.asarray(images)
    if arr.size == 0:
        raise ValueError(f"no images given (a batch of shape {tuple(images.shape)})")
    arr = _channels_last_uint8(arr)
    if arr.shape[1:3] != (size, size):
        arr = resize_batch(arr, size)
    return torch.from_numpy(np.ascontiguousarray(arr))


def image_count(shape: tuple) -> int:
    """How many images an array of ``shape`` holds by ``IMAGE_RULE`` (0 where the rule cannot read it)."""
    if len(shape) == 2:
        return 1
    if len(shape) == 3:
        return 1 if shape[-1] in CHANNELS or shape[0] in CHANNELS else shape[0]
    if len(shape) == 4 and (shape[-1] in CHANNELS or shape[1] in CHANNELS):
        return shape[0]
    return 0


def _is_loader_batch(items) -> bool:
    """A DataLoader batch (x, y, ...): an image batch x (B, ...) and beside it only per-image values
    (labels, one-hot labels, indices: 1-D or 2-D, B rows), never an image (a list of images has none of these)."""
    if len(items) < 2 or not isinstance(items[0], (torch.Tensor, np.ndarray)) or items[0].ndim < 3:
        return False
    n = len(items[0])
    for extra in items[1:]:
        if isinstance(extra, (list, tuple)) and not any(isinstance(e, (torch.Tensor, np.ndarray)) for e in extra):
            extra = np.asarray(extra)
        if not isinstance(extra, (torch.Tensor, np.ndarray)) or extra.ndim not in (1, 2) or len(extra) != n:
            return False
    return True


def checked_device(device: str) -> str:
    if not (device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device)):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device


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
    raise ValueError(f"cannot read an image from a {type(im).__name__} in the list; accepted: {ACCEPTED}")


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