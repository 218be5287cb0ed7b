"""The API's old address, kept so that ``from utils.detector import DLSRDetector`` goes on working;
the API lives in the ``dlsr`` package (``from dlsr import DLSRDetector``). The one import of this
folder that points up: utils/ otherwise holds leaves only."""
from dlsr.detector import DLSRDetector, FeatureDetector, KNNDetector, MahalanobisDetector  # noqa: F401
from dlsr.inputs import IMAGE_RULE, as_uint8_images, image_count  # noqa: F401
