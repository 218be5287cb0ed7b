"""The Python API of DLSR: detectors in pytorch-ood's shape.

    from dlsr import DLSRDetector, KNNDetector, MahalanobisDetector

    detector = DLSRDetector.from_checkpoint("checkpoint/checkpoint-last.pth")
    detector.calibrate(id_loader)              # thresholds accepting 95% of these ID images
    scores = detector(images)                  # (B,) headline score, higher = more OOD
    flags = detector.is_ood(images)            # (B,) bool, at the calibrated threshold

What counts as images: ``dlsr.inputs.CONTRACT`` (docs/USAGE.md, "Images in").
"""
from dlsr.detector import DLSRDetector, FeatureDetector, KNNDetector, MahalanobisDetector
from dlsr.inputs import CONTRACT, IMAGE_RULE, as_uint8_images

__all__ = ["DLSRDetector", "KNNDetector", "MahalanobisDetector", "FeatureDetector", "as_uint8_images", "CONTRACT",
           "IMAGE_RULE"]
