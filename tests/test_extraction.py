"""engine/extraction.py: extraction in decode batches, backbone batch by batch, and the image keys."""
import numpy as np
import pytest
import torch

from datasets.images import ArrayImages
from engine.extraction import extract_features
from experiment.config import Config
from models.features import MultiLayerFeatures
from utils.distributed import DistContext


def test_extraction_decodes_in_large_batches_but_runs_the_backbone_batch_by_batch():
    # Lite0's outputs for one image alone differ at rounding level from the same image inside a
    # batch, so equality here means the backbone saw one image at a time (extract batch 1),
    # although the loader decoded all ten together.
    f = MultiLayerFeatures("efficientnet-lite0")
    images = ArrayImages("x", np.random.default_rng(2).integers(0, 256, (10, 28, 28), dtype=np.uint8), 32)
    cfg = Config(extract_batch_size=1, num_workers=0)
    cfg.backbone.input_size = 32
    got, _ = extract_features(f, images, DistContext(0, 1, 0, torch.device("cpu")), cfg, "fp32", "test")
    with torch.no_grad():
        x = f.normalize(torch.stack([images[i] for i in range(10)]))
        expected = torch.cat([f(x[i:i + 1]) for i in range(10)])
        if torch.equal(f(x), expected):
            pytest.skip("on this CPU, batch size does not change the backbone's outputs: nothing to tell apart")
    assert torch.equal(got, expected)


def test_an_rgb_image_with_equal_r_and_g_but_another_b_is_not_its_grayscale():
    from engine.extraction import digest64, image_keys
    rng = np.random.default_rng(0)
    plane = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    other = plane.copy()
    other[0, 0] ^= 1
    gray_rgb = np.stack([plane, plane, plane], -1)
    rg_same = np.stack([plane, plane, other], -1)   # B differs
    rb_same = np.stack([plane, other, plane], -1)   # G differs
    keys = image_keys(torch.from_numpy(np.stack([gray_rgb, rg_same, rb_same]))).tolist()
    assert keys[0] == digest64(plane)  # an RGB image of three equal planes is its grayscale
    assert keys[1] == digest64(rg_same) != digest64(plane)
    assert keys[2] == digest64(rb_same) != digest64(plane)


def test_the_decode_batch_is_a_multiple_of_the_backbone_batch():
    from engine.extraction import DECODE_BATCH, decode_batch_size
    for b in range(1, 3 * DECODE_BATCH):
        d = decode_batch_size(b)
        assert d % b == 0 and d >= b and (b > DECODE_BATCH or d > DECODE_BATCH - b)
