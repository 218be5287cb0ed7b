"""dlsr/inputs.py: what the API reads as images (the contract), by hand."""
import numpy as np
import pytest
import torch
from PIL import Image

from dlsr.detector import DLSRDetector, KNNDetector
from dlsr.inputs import as_uint8_images
from tests.helpers import digits_uint8


@pytest.fixture(scope="module")
def det(trained):
    return DLSRDetector.from_checkpoint(str(trained.ckpt / "checkpoint-last.pth"), device="cpu")


API_CASES = {
    "NaN floats": (lambda d: d.predict(torch.full((2, 3, 8, 8), float("nan"))), "NaN or inf"),
    "int16 images": (lambda d: d.predict(np.zeros((2, 8, 8), np.int16)), "must be uint8 .* got int16"),
    "bool images": (lambda d: d.predict(np.zeros((2, 8, 8), bool)), "got bool"),
    "a 1-D array": (lambda d: d.predict(np.zeros(8, np.uint8)), "cannot read images of shape \\(8,\\)"),
    "a 5-D array": (lambda d: d.predict(np.zeros((1, 1, 3, 8, 8), np.uint8)), "shape \\(1, 1, 3, 8, 8\\)"),
    "an empty batch": (lambda d: d.predict(np.zeros((0, 8, 8, 3), np.uint8)), "no images given"),
    "a missing file in a list": (lambda d: d.predict(["/nonexistent-dlsr.png"]), "cannot read the image file"),
    "a generator": (lambda d: d.predict(x for x in [np.zeros((8, 8), np.uint8)]), "from a generator"),
    "a 1-D feature vector": (lambda d: d.predict_features(torch.randn(512)), "got shape \\(512,\\)"),
    "tpr of 1 in calibrate": (lambda d: d.calibrate([np.zeros((5, 8, 8), np.uint8)], tpr=1.0), "exclusive"),
    "an unknown score": (lambda d: DLSRDetector(d.cfg, device="cpu", score="LR"),
                         r"score must be one of \('MSE', 'MFsim'\), got 'LR'"),
}


def test_totensor_floats_and_uint8_images_get_equal_scores(detector):
    digits = digits_uint8()[:40]
    floats = torch.from_numpy(digits).float().div(255)[:, None]  # (B, 1, 8, 8), as ToTensor gives them
    rgb = np.repeat(digits[..., None], 3, axis=-1)
    rgb_floats = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255  # (B, 3, 8, 8)
    reference = detector.predict(digits)
    assert torch.equal(detector.predict(floats), reference)
    assert torch.equal(detector.predict(rgb_floats), reference)  # gray as RGB: the same image, the same key
    assert torch.equal(detector(digits), reference)  # pytorch-ood's call form


def test_one_image_without_a_batch_axis_gets_one_score(detector):
    digits = digits_uint8()
    rgb = np.repeat(digits[7][..., None], 3, axis=-1)  # (8, 8, 3): one image, not 8 grayscale ones
    one = detector.predict(rgb)
    assert one.shape == (1,) and torch.equal(one, detector.predict(digits[7:8]))
    assert torch.equal(detector.predict(digits[7]), one)  # (H, W)
    chw = torch.from_numpy(digits[7]).float().div(255)[None]  # one ToTensor image (1, H, W)
    assert torch.equal(detector.predict(chw), one)


def test_as_uint8_images_conversions_by_hand():
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4)
    assert as_uint8_images(gray, 4).shape == (1, 4, 4)
    # (2, 4, 4) reads as one (H, W, C=4) image by the rule: a batch of two 4 x 4 grayscale images is
    # given as (2, 1, 4, 4) (of the axes of size 1 and 4 that could hold channels, the smaller does).
    assert as_uint8_images(np.stack([gray, gray])[:, None], 4).shape == (2, 4, 4)
    chw = torch.from_numpy(np.stack([gray, gray + 1, gray + 2]))[None]  # uint8 (1, 3, H, W), PILToTensor's layout
    assert torch.equal(as_uint8_images(chw, 4)[0, 1, 2], torch.tensor([6, 7, 8], dtype=torch.uint8))
    floats = chw.float() / 255
    assert torch.equal(as_uint8_images(floats, 4), as_uint8_images(chw, 4))
    hwc = chw.permute(0, 2, 3, 1).contiguous()  # uint8 (1, H, W, 3): channels last, as it is
    assert torch.equal(as_uint8_images(hwc, 4), hwc) and torch.equal(as_uint8_images(hwc.numpy(), 4), hwc)
    assert torch.equal(as_uint8_images(hwc[0], 4), hwc)  # one (H, W, 3) image
    rgb = np.stack([np.full((4, 4, 3), 10 * i, np.uint8) for i in range(3)])
    assert torch.equal(as_uint8_images(list(rgb), 4), torch.from_numpy(rgb))  # a list of (H, W, 3) images
    assert torch.equal(as_uint8_images([gray, rgb[1]], 4)[0], torch.from_numpy(np.repeat(gray[..., None], 3, -1)))
    with pytest.raises(ValueError, match="between 0 and 1.*values up to 1.2"):
        as_uint8_images(torch.full((1, 1, 4, 4), 1.2), 4)  # not ToTensor's range, though not negative
    with pytest.raises(ValueError, match="cannot read images of shape \\(1, 5, 4, 5\\)"):
        as_uint8_images(np.zeros((1, 5, 4, 5), np.uint8), 4)


def test_float_images_are_rounded_to_the_nearest_pixel_not_floored():
    from dlsr.detector import as_uint8_images
    values = torch.tensor([0.7, 1.4, 127.6, 200.2, 254.8]) / 255  # not multiples of 1/255
    img = values.repeat(5, 1)[None, None]  # (1, 1, 5, 5)
    assert as_uint8_images(img, 5)[0, 0].tolist() == [1, 1, 128, 200, 255]  # floored: 0, 1, 127, 200, 254


def test_loader_batches_of_grayscale_images_are_pairs_whatever_the_batch_size():
    from dlsr.detector import as_uint8_images
    for b in (1, 3, 4, 5):
        x = torch.randint(0, 256, (b, 6, 6), dtype=torch.uint8)
        out = as_uint8_images((x, torch.zeros(b, dtype=torch.int64)), 6)
        assert out.shape == (b, 6, 6) and torch.equal(out, x)


@pytest.mark.parametrize("name", list(API_CASES))
def test_api_refuses_odd_inputs_in_the_users_terms(name, det):
    fn, says = API_CASES[name]
    with pytest.raises(ValueError, match=says):
        fn(det)


def test_api_forms_that_are_fine_give_the_expected_counts(det, trained):
    assert det.predict(np.zeros((1, 1), np.uint8)).shape == (1,)  # one 1 x 1 image
    assert det.predict([np.zeros((8, 8), np.uint8), np.zeros((16, 20, 3), np.uint8)]).shape == (2,)
    assert det.predict_features(np.random.randn(2, 512)).shape == (2,)  # float64 numpy
    knn = KNNDetector(trained.config, k=1, device="cpu").fit([(torch.rand(4, 1, 8, 8), torch.arange(4))])
    assert knn.predict(torch.rand(2, 1, 8, 8)).shape == (2,)


def test_one_image_in_every_layout_gets_one_score(trained):
    d = DLSRDetector.from_checkpoint(str(trained.ckpt / "checkpoint-last.pth"), device="cpu")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((40, 40, 1), 7, np.uint8)], -1)
    ref = d.predict(rgb)
    assert ref.shape == (1,)
    forms = [rgba, rgb.transpose(2, 0, 1), rgba.transpose(2, 0, 1), torch.from_numpy(rgb).permute(2, 0, 1),
             torch.from_numpy(rgb).permute(2, 0, 1).float() / 255, (torch.from_numpy(rgb).permute(2, 0, 1).float()
                                                                     / 255).bfloat16()]
    for form in forms[:5]:
        assert torch.equal(d.predict(form), ref), getattr(form, "shape", None)
    assert d.predict(forms[5]).shape == (1,)  # bf16 rounds the pixels, but it is read, as one image
    assert torch.equal(d.predict([Image.fromarray(rgba, "RGBA")]), ref)  # as predict.py reads an RGBA file


def test_loader_batches_with_one_hot_labels_or_indices_are_pairs(trained):
    d = DLSRDetector.from_checkpoint(str(trained.ckpt / "checkpoint-last.pth"), device="cpu")
    x = torch.rand(4, 1, 16, 16)
    ref = d.predict(x)
    assert torch.equal(d.predict((x, torch.eye(4))), ref)
    assert torch.equal(d.predict([x, torch.arange(4), torch.arange(4)]), ref)
    gray = (x[:, 0] * 255).round().to(torch.uint8)  # (4, H, W): with labels, four images
    assert d.predict((gray, torch.arange(4))).shape == (4,)


# ------------------------------------------------------------------ a list of images is a list (issue 35)

def test_a_list_or_tuple_of_single_images_is_a_list_whatever_their_shapes(det):
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    gray = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)  # looks like 64 rows of labels
    expected = det.predict([rgb, gray])
    assert expected.shape == (2,)  # two images, two scores (64 before: the gray one was read as labels)
    torch.testing.assert_close(expected, torch.cat([det.predict(rgb), det.predict(gray)]), rtol=1e-4, atol=1e-5)
    assert torch.equal(det.predict((rgb, gray)), expected)
    assert torch.equal(det.predict([torch.from_numpy(rgb).permute(2, 0, 1), gray]), expected)  # (C, H, W) too


def test_one_pil_image_or_one_path_alone_is_one_image(det, tmp_path):
    img = Image.fromarray(digits_uint8()[3])
    img.save(tmp_path / "three.png")
    expected = det.predict(digits_uint8()[3:4])
    assert torch.equal(det.predict(img), expected)
    assert torch.equal(det.predict(str(tmp_path / "three.png")), expected)
    assert torch.equal(det.predict(tmp_path / "three.png"), expected)  # a pathlib.Path


def test_a_dataloader_batch_is_its_first_item_when_that_is_a_batch(det):
    x = torch.rand(5, 1, 8, 8)
    expected = det.predict(x)
    assert torch.equal(det.predict([x, torch.arange(5)]), expected)
    assert torch.equal(det.predict((x, torch.eye(5)[:, :4], torch.arange(5))), expected)  # one-hot, indices
    gray = torch.from_numpy(digits_uint8()[:3])  # (3, 8, 8) beside 1-D labels: three grayscale images
    assert det.predict([gray, torch.tensor([0, 1, 2])]).shape == (3,)


def test_a_grayscale_batch_of_more_than_four_is_a_batch_beside_one_hot_rows_and_checked(det):
    """(B, H, W) with B not a channel count is a batch by the image rule (no channel axis): beside
    one-hot rows it is a DataLoader batch, and an item with a row count other than B is refused."""
    gray = torch.from_numpy(digits_uint8()[:5])  # (5, 8, 8)
    expected = det.predict(gray)
    assert expected.shape == (5,)
    assert torch.equal(det.predict((gray, torch.eye(5)[:, :3])), expected)  # one-hot labels: 5 scores, not 2
    with pytest.raises(ValueError, match="batch of 5 images .* item 1 .*not one value or row per image"):
        det.predict([gray, torch.arange(4)])


def test_what_can_be_read_two_ways_is_refused_naming_the_ways_out(det):
    gray = digits_uint8()[:3]  # (3, 8, 8): one RGB image, or three grayscale ones?
    with pytest.raises(ValueError, match=r"ambiguous images.*\(3, 1, H, W\).*its own list item"):
        det.predict([gray, np.eye(3)])  # with (3, 3) beside it: one-hot labels, or a 3 x 3 image?
    with pytest.raises(ValueError, match=r"read as a DataLoader batch .* item 1 \(shape \(4,\)\) is not one value or "
                                         r"row per image; pass the batch alone"):
        det.predict([torch.rand(5, 1, 8, 8), torch.arange(4)])


def test_a_tensor_on_the_meta_device_is_a_value_error(det):
    with pytest.raises(ValueError, match="meta device holds no values"):
        det.predict(torch.empty(2, 3, 8, 8, device="meta"))


@pytest.mark.parametrize("shape,count,layout", [((3, 8, 3), 1, "last"), ((4, 8, 4), 1, "last"), ((1, 8, 1), 1, "last"),
                                                ((3, 8, 4), 1, "first"), ((2, 3, 8, 3), 2, "last"),
                                                ((2, 3, 8, 4), 2, "first")])
def test_where_both_axes_could_hold_the_channels_the_smaller_does_and_equal_ones_the_last(shape, count, layout):
    """IMAGE_RULE's tie: (3, H, 3) is (H, W, C) with the last axis the channels, as (B, 3, H, 3) is."""
    from dlsr.inputs import image_count
    arr = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    got = as_uint8_images(arr, 8)
    assert len(got) == count == image_count(shape)
    one = arr if len(shape) == 3 else arr[0]
    hwc = one if layout == "last" else one.transpose(1, 2, 0)  # the channels last, by hand
    pixels = hwc[..., 0] if hwc.shape[-1] == 1 else hwc[..., :3]  # gray (H, W) or RGB (H, W, 3)
    mode = "L" if pixels.ndim == 2 else "RGB"
    expected = np.asarray(Image.fromarray(np.ascontiguousarray(pixels), mode).resize((8, 8), Image.BILINEAR))
    assert np.array_equal(got[0].numpy(), expected)


def test_labels_as_python_lists_and_a_list_item_that_holds_several_images(det):
    from dlsr.inputs import image_count
    x = torch.rand(5, 1, 8, 8)
    expected = det.predict(x)
    assert torch.equal(det.predict([x, [0, 1, 2, 3, 4]]), expected)  # labels as a Python list
    assert torch.equal(det.predict((x, [[1, 0]] * 5)), expected)     # one-hot rows as lists
    with pytest.raises(ValueError, match=r"a list item holds 5 images \(shape \(5, 8, 8\)\); give a list of single"):
        det.predict([np.zeros((8, 8, 3), np.uint8), np.zeros((5, 8, 8), np.uint8)])
    assert [image_count(s) for s in ((8, 9), (5, 8, 9), (3, 8, 9), (2, 3, 8, 9), (2, 8, 9, 5), (1, 1, 3, 8, 8))] == \
        [1, 5, 1, 2, 0, 0]
