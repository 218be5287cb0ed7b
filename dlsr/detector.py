"""The Python API: DLSR and the same-feature baselines as detectors in pytorch-ood's shape.

    detector = DLSRDetector.from_checkpoint("checkpoint/checkpoint-last.pth")
    detector.calibrate(id_loader)              # thresholds accepting 95% of these ID images
    scores = detector(images)                  # (B,) headline score, higher = more OOD
    flags = detector.is_ood(images)            # (B,) bool, at the calibrated threshold

    knn = KNNDetector("config/demo.yaml", k=1).fit(train_loader)   # the baseline, on the same features

Where pytorch-ood is installed, every detector here is a ``pytorch_ood.api.FeaturesDetector``,
so ``Benchmark.evaluate(detector)`` and ``OODMetrics`` take it unchanged. Images come as the
ecosystem gives them, by the contract of ``dlsr/inputs.py``: arrays or tensors (uint8, or ToTensor's
floats in [0, 1]), lists of single images, DataLoader ``(x, y)`` batches, PIL images or file paths.

The detectors change no process-wide setting: where fp32 must be exact on CUDA, each call that
computes holds ``utils.precision.exact_fp32``, which restores the caller's TF32 switches.

DLSR trains through the same trainer as ``main.py`` (checkpoints into ``cfg.output_dir``) and
scores through the same engine as the evaluation scripts and ``predict.py``, so an image gets the
same scores from all of them; the baselines are the evaluation tables' own code (``Baselines``).
"""
import functools
import os
import re
from typing import Dict, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from dlsr.inputs import Images, as_uint8_images
from engine.extraction import image_batch_features, mode_of, vector_keys
from engine.factory import build_extractor
from engine.prediction import DEFAULT_TPR, thresholds_at, warn_if_few
from engine.scorer import Scorer
from engine.training import train
from experiment.config import DEFAULT_CONFIG, Config, load_config
from experiment.run import run_config
from models.features import MultiLayerFeatures
from scoring.baselines import Baselines
from scoring.scores import score_types
from store.checkpoint import load_checkpoint
from utils.distributed import DistContext, resolve_device
from utils.precision import exact_fp32

try:  # pytorch-ood is optional: without it the detectors work the same, as plain classes
    from pytorch_ood.api import FeaturesDetector as _Base
except ImportError:
    _Base = object


def _exact_fp32(method):
    """Run ``method`` with IEEE fp32 on a CUDA device (TF32 off), the caller's switches restored after."""
    @functools.wraps(method)
    def scoped(self, *args, **kwargs):
        with exact_fp32(self.ctx.device):
            return method(self, *args, **kwargs)
    return scoped


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
        """Scores of images (any form of ``dlsr.inputs.CONTRACT``): the headline score (B,), or every
        score type by name."""
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

    @_exact_fp32
    def _features(self, images: Images):
        batch = as_uint8_images(images, self.cfg.backbone.input_size)
        return image_batch_features(self._extractor(), batch, self.ctx, mode_of(self.cfg, self.ctx),
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
        if self.score not in score_types():
            raise ValueError(f"score must be one of {score_types()}, got {score!r}")
        self.scorer: Optional[Scorer] = None
        self._wrote: Optional[str] = None  # the output folder this detector's last fit wrote

    @classmethod
    def from_checkpoint(cls, path: str, config: Union[str, Config, None] = None, device: Optional[str] = None,
                        score: Optional[str] = None) -> "DLSRDetector":
        """A trained detector from a checkpoint of ours or of the authors'. What the run is comes from the
        checkpoint; the settings to score with from ``config`` (a YAML path or a Config), else the
        checkpoint's stored config (the authors' files: config/Config.yaml), as in the scripts
        (``experiment.run.run_config``)."""
        run = run_config({"end": load_checkpoint(path)}, config)
        det = cls(run.cfg, device, score)
        det.scorer = Scorer.from_checkpoints(run, det.ctx)
        det.extractor = det.scorer.extractor
        return det

    @_exact_fp32
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

    @_exact_fp32
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


def checked_device(device: str) -> str:
    if not (device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device)):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device
