"""The Python API, in pytorch-ood's fit / predict shape. ``from utils.detector import DLSRDetector``.

    detector = DLSRDetector.from_checkpoint("checkpoint/checkpoint-last.pth")
    detector.calibrate(id_loader)              # thresholds accepting 95% of these ID images
    scores = detector.predict(images)          # (B,) headline score, higher = more OOD
    flags = detector.is_ood(images)            # (B,) bool, at the calibrated threshold

Training goes through the same trainer as ``main.py`` (checkpoints into ``cfg.output_dir``); scoring
through the same engine as the evaluation scripts and ``predict.py``, so an image gets the same
scores from all of them.
"""
import os
from typing import Dict, Iterable, Optional, Union

import numpy as np
import torch
from PIL import Image

from datasets.images import resize_batch, to_rgb_resized
from utils.checkpoint import config_of, load_checkpoint
from utils.config import DEFAULT_CONFIG, Config, load_config
from utils.distributed import DistContext, resolve_device
from utils.evaluation import SCORE_TYPES, Scorer
from utils.features import digest64
from utils.prediction import DEFAULT_TPR, thresholds_at

Images = Union[torch.Tensor, np.ndarray, list]


class DLSRDetector:
    """Unsupervised OOD detector: train on ID images (or features), score new ones. Higher = more OOD.

    ``config``: a YAML path or a ``Config``; ``device`` (auto, cpu, cuda, cuda:N) and ``score`` (the
    headline score, MFsim or MSE) default to the config's ``device`` and ``eval.similarity_type``.
    """

    def __init__(self, config: Union[str, Config] = DEFAULT_CONFIG, device: Optional[str] = None,
                 score: Optional[str] = None):
        self.cfg = load_config(config) if isinstance(config, str) else config
        self.score = score or self.cfg.eval.similarity_type
        if self.score not in SCORE_TYPES:
            raise ValueError(f"score must be one of {SCORE_TYPES}, got {score!r}")
        self.ctx = DistContext(0, 1, 0, resolve_device(device or self.cfg.device))
        self.scorer: Optional[Scorer] = None
        self.thresholds: Optional[Dict[str, float]] = None

    @classmethod
    def from_checkpoint(cls, path: str, config: Union[str, Config, None] = None, device: Optional[str] = None,
                        score: Optional[str] = None) -> "DLSRDetector":
        """A trained detector from a checkpoint of ours (its stored config is used) or of the authors' (give ``config``)."""
        ckpt = load_checkpoint(path)
        det = cls(config_of(ckpt, config, f"config={DEFAULT_CONFIG!r} (or the config it was trained with)"),
                  device, score)
        det.scorer = Scorer.from_checkpoints(det.cfg, det.ctx, {"end": ckpt}, path)
        return det

    # ------------------------------------------------------------------ training

    def fit(self, loader: Iterable) -> "DLSRDetector":
        """Train on ID images: ``loader`` yields image batches (see ``predict`` for the forms accepted)."""
        from utils.model_factory import build_extractor
        extractor = build_extractor(self.cfg).to(self.ctx.device)
        z = torch.cat([self._features(batch, extractor)[0] for batch in loader])
        return self.fit_features(z, extractor)

    def fit_features(self, z: torch.Tensor, extractor=None) -> "DLSRDetector":
        """Train on standardised ID feature vectors z (N, D), through the trainer of ``main.py``."""
        from utils.training import train
        trainer = train(self.cfg, self.ctx, features=z, extractor=extractor)
        self.scorer = Scorer(self.cfg, self.ctx, trainer.extractor, trainer.diffusion, {"end": trainer.ema.module})
        self.thresholds = None
        return self

    # ------------------------------------------------------------------ scoring

    def predict(self, images: Images, all_scores: bool = False) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """Scores of a batch of images: uint8 (B, H, W[, 3]) array or tensor (resized to the config's size),
        or a list of PIL images or file paths. Returns the headline score (B,), or all scores."""
        z, keys = self.features(images)
        return self.predict_features(z, keys, all_scores)

    def features(self, images: Images):
        """(standardised vectors (B, D) on the device, image keys (B,)) of a batch of images."""
        return self._features(images)

    def predict_features(self, z: torch.Tensor, keys: Optional[torch.Tensor] = None,
                         all_scores: bool = False) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """Scores of standardised vectors z (B, D). ``keys`` (B,) int64 seed each vector's noise (the
        image digests that ``predict`` uses); by default a digest of each vector's own bytes does."""
        scorer = self._ready()
        z = z.to(self.ctx.device, torch.float32)
        if keys is None:
            keys = torch.tensor([digest64(row) for row in z.cpu().numpy()], dtype=torch.int64)
        scores = {t: torch.from_numpy(v) for t, v in scorer.scores(z, keys).items()}
        return scores if all_scores else scores[self.score]

    def calibrate(self, loader: Iterable, tpr: float = DEFAULT_TPR) -> Dict[str, float]:
        """Thresholds that accept a fraction ``tpr`` of the ID images in ``loader``; sets ``self.thresholds``."""
        if not 0 < tpr < 1:
            raise ValueError(f"tpr must be between 0 and 1, got {tpr}")
        parts = [self.predict(batch, all_scores=True) for batch in loader]
        scores = {t: torch.cat([p[t] for p in parts]).numpy() for t in SCORE_TYPES}
        self.thresholds = thresholds_at(scores, tpr)
        return self.thresholds

    def is_ood(self, images: Images) -> torch.Tensor:
        """(B,) bool: the headline score above its calibrated threshold."""
        if self.thresholds is None:
            raise RuntimeError("DLSRDetector: call calibrate(loader) before is_ood()")
        return self.predict(images) > self.thresholds[self.score]

    # ------------------------------------------------------------------ helpers

    def _ready(self) -> Scorer:
        if self.scorer is None:
            raise RuntimeError("DLSRDetector is not fitted: call fit(loader), fit_features(z) or "
                               "DLSRDetector.from_checkpoint(path) before predicting")
        return self.scorer

    def _features(self, images: Images, extractor=None):
        size = self.cfg.backbone.input_size
        batch = _as_uint8_batch(images, size)
        if extractor is None:
            return self._ready().image_features(batch)
        from utils.features import compute_mode, image_batch_features
        return image_batch_features(extractor, batch, self.ctx, compute_mode(self.cfg, self.ctx),
                                    self.cfg.extract_batch_size)


def _as_uint8_batch(images: Images, size: int) -> torch.Tensor:
    """Any accepted image batch -> uint8 (B, size, size[, 3]), resized as every image of the project is."""
    if isinstance(images, (list, tuple)):
        out = []
        for im in images:
            if isinstance(im, (str, os.PathLike)):
                with Image.open(im) as opened:
                    opened.load()
                    out.append(to_rgb_resized(opened, size))
            elif isinstance(im, Image.Image):
                out.append(to_rgb_resized(im, size))
            else:
                out.append(_as_uint8_batch(torch.as_tensor(np.asarray(im))[None], size)[0])
        return torch.stack(out) if out else torch.empty(0, size, size, 3, dtype=torch.uint8)
    arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] != 3):
        raise ValueError(f"expected uint8 images (B, H, W) or (B, H, W, 3), got {arr.dtype} {arr.shape}")
    if arr.shape[1:3] != (size, size):
        arr = resize_batch(arr, size)
    return torch.from_numpy(np.ascontiguousarray(arr))
