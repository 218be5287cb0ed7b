"""dlsr/detector.py: the Python API's detectors (fit, calibrate, predict, pytorch-ood's protocol) and
their agreement with the scripts."""
import gzip
import json
import logging
import os

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from datasets import build_dataset, random_subset
from datasets.torchvision_sets import DEBIAN_FASHION_MNIST
from dlsr.detector import DLSRDetector, KNNDetector, MahalanobisDetector
from errors import UserError
from experiment.config import load_config
from tests.helpers import (
    EVAL_DIGITS,
    digits_uint8,
    needs_fmnist,
    predict,
    run_inprocess,
    save_digits,
    scorer_for,
)


class Labelled(Dataset):
    """A torchvision-style dataset: (ToTensor image (1, H, W) float in [0, 1], int label)."""

    def __init__(self, images: np.ndarray, labels):
        self.images, self.labels = images, list(labels)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i]).float().div(255)[None], self.labels[i]


def independent_knn(train: np.ndarray, test: np.ndarray, k: int) -> np.ndarray:
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    b = test / np.linalg.norm(test, axis=1, keepdims=True)
    d = np.sqrt(np.maximum(((b[:, None, :] - a[None]) ** 2).sum(-1), 0))
    return np.sort(d, axis=1)[:, k - 1]


def _fmnist_torchvision_layout(root, keep: int = 2000) -> str:
    """The first ``keep`` images (and labels) of each of Debian's Fashion-MNIST files, unpacked into
    torchvision's FashionMNIST/raw layout (IDX: a big-endian header of 4-byte counts, then bytes)."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for name in os.listdir(DEBIAN_FASHION_MNIST):
        with gzip.open(os.path.join(DEBIAN_FASHION_MNIST, name)) as src:
            data = src.read()
        dims = data[3]  # 1: labels, 3: images (count, rows, columns)
        shape = np.frombuffer(data[4:4 + 4 * dims], ">u4").copy()
        item = int(np.prod(shape[1:]))
        shape[0] = min(keep, shape[0])
        with open(os.path.join(raw, name[:-3]), "wb") as dst:
            dst.write(data[:4] + shape.astype(">u4").tobytes() + data[4 + 4 * dims:4 + 4 * dims + int(shape[0]) * item])
    return root


class Relabelled(Dataset):
    def __init__(self, base, label):
        self.base, self.label = base, label

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i][0], self.label


def test_a_dataloader_of_xy_pairs_fits_calibrates_and_predicts(trained, tmp_path):
    from experiment.config import load_config
    cfg = load_config(trained.config)
    cfg.output_dir, cfg.train.epochs = str(tmp_path / "api"), 1
    digits = digits_uint8()
    labels = load_digits().target
    loader = DataLoader(Labelled(digits[:256], labels[:256]), batch_size=128)
    x, y = next(iter(loader))
    assert x.dtype == torch.float32 and x.shape == (128, 1, 8, 8) and y.shape == (128,)
    det = DLSRDetector(cfg, device="cpu").fit(loader)
    held_out = DataLoader(Labelled(digits[512:812], labels[512:812]), batch_size=100)
    th = det.calibrate(held_out, tpr=0.9)
    scores = torch.cat([det.predict(b) for b in held_out])
    assert float((scores <= th["MFsim"]).float().mean()) == pytest.approx(0.9, abs=0.01)
    assert torch.equal(det.predict([x, y]), det.predict(x))  # a list pair is a pair too
    noise = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert det.is_ood((noise, torch.zeros(6, dtype=torch.long))).all()


def test_detector_is_a_pytorch_ood_detector(detector):
    from pytorch_ood.api import Detector, FeaturesDetector
    assert isinstance(detector, Detector) and isinstance(detector, FeaturesDetector)
    assert isinstance(KNNDetector(), Detector) and isinstance(MahalanobisDetector(), Detector)
    # pytorch-ood's flag that fit() must come before scoring (its base fit() does nothing where it is False)
    assert detector.requires_fit is KNNDetector.requires_fit is MahalanobisDetector.requires_fit is True
    import inspect
    assert list(inspect.signature(DLSRDetector.fit_features).parameters)[:3] == ["self", "x", "y"]


def test_fit_features_takes_labels_and_refit_clears_the_thresholds(detector, trained, tmp_path):
    from experiment.config import load_config
    cfg = load_config(trained.config)
    cfg.output_dir, cfg.train.epochs = str(tmp_path / "refit"), 1
    z, _ = detector.features(digits_uint8()[:256])
    det = DLSRDetector(cfg, device="cpu").fit_features(z, torch.zeros(256, dtype=torch.long))
    det.calibrate([digits_uint8()[256:600]])
    assert det.thresholds is not None
    det.fit_features(z)
    assert det.thresholds is None
    with pytest.raises(RuntimeError, match="calibrate"):
        det.is_ood(digits_uint8()[:2])


def test_wrong_inputs_get_messages_in_the_users_terms(detector):
    digits = digits_uint8()
    cases = [
        (torch.randn(2, 3, 8, 8), "between 0 and 1.*look normalised"),
        (torch.rand(2, 5, 8, 8), "no axis of 1, 3 or 4 channels"),
        (digits.astype(np.int64)[:2], "must be uint8 .* or float in \\[0, 1\\]; got int64"),
        ([], "no images given"),
        (np.zeros((0, 8, 8), np.uint8), "no images given"),
        ({"x": 1}, "cannot read images from a dict"),
        ([1.5], "cannot read an image from a float"),
    ]
    for images, message in cases:
        with pytest.raises(ValueError, match=message):
            detector.predict(images)
    with pytest.raises(ValueError, match="the loader gave no images"):
        detector.calibrate([])
    with pytest.raises(ValueError, match="KNNDetector.fit: the loader gave no images"):
        KNNDetector(detector.cfg).fit([])
    z, keys = detector.features(digits[:6])
    with pytest.raises(ValueError, match=f"expected standardised feature vectors \\(N, {z.shape[1]}\\).*\\(6, 5\\)"):
        detector.predict_features(z[:, :5])
    bad = z.clone()
    bad[1, 0], bad[3, 2] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="2 feature vector\\(s\\) hold NaN or inf \\(rows 1, 3\\)"):
        detector.predict_features(bad)
    with pytest.raises(ValueError, match="no feature vectors given"):
        detector.predict_features(z[:0])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        KNNDetector(k=0)


def test_predict_features_with_keys_equals_predict_and_without_keys_differs(detector):
    digits = digits_uint8()[:64]
    z, keys = detector.features(digits)
    with_keys = detector.predict_features(z, keys)
    assert torch.equal(with_keys, detector.predict(digits))
    without = detector.predict_features(z)  # noise seeded by the vectors' bytes, not the images'
    assert without.shape == (64,) and not torch.equal(without, with_keys)
    assert torch.equal(without, detector.predict_features(z.clone()))


def test_baseline_detectors_equal_the_evaluation_tables_scores(trained, tmp_path):
    from datasets import build_dataset, random_subset
    out = tmp_path / "eval"
    run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                  "--pretrained_ldm_cfg", trained.config, "--baselines", "knn,mahalanobis", "--knn_k", "1,3",
                  "--no_plots", "--save_features", "--output_dir", str(out))
    table = np.load(out / "scores" / "ID.npy")
    train_set = random_subset(build_dataset("digits", "train", "", 32), 256)  # the run's training set
    loader = DataLoader(train_set, batch_size=128)  # whole backbone batches, as the feature cache has them
    knn = KNNDetector(trained.config, k=3, device="cpu").fit(loader)
    maha = MahalanobisDetector(trained.config, device="cpu").fit(loader)
    test_set = build_dataset(trained.cfg["eval"]["dataset"], "test", "", 32)
    z, _ = knn.features(torch.stack([test_set[i] for i in range(len(test_set))]))  # the same backbone for both
    np.testing.assert_allclose(knn.predict_features(z).numpy(), table["kNN_k3"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maha.predict_features(z).numpy(), table["Mahalanobis"], rtol=1e-4, atol=1e-4)
    # and kNN itself, recomputed independently on the saved features
    z_test = np.load(out / "features" / "ID.npy")
    z_train = knn.features(torch.stack([train_set[i] for i in range(len(train_set))]))[0].numpy()
    np.testing.assert_allclose(table["kNN_k1"], independent_knn(z_train, z_test, 1), rtol=1e-4, atol=1e-5)


def test_dlsr_next_to_knn_in_a_few_lines(detector):
    digits = digits_uint8()
    knn = KNNDetector(detector.cfg, k=1, device="cpu").fit([digits[:500]])
    noise = np.random.default_rng(1).integers(0, 256, (50, 8, 8), dtype=np.uint8)
    for det in (detector, knn):
        s_id, s_ood = det(digits[1000:1300]).numpy(), det(noise).numpy()
        auroc = roc_auc_score(np.r_[np.zeros(len(s_id)), np.ones(len(s_ood))], np.r_[s_id, s_ood])
        assert auroc > 0.9, type(det).__name__


@needs_fmnist
def test_pytorch_ood_benchmark_gives_the_evaluation_scripts_auroc(trained, detector, tmp_path):
    import torchvision
    from pytorch_ood.benchmark import Benchmark
    from torchvision.transforms import ToTensor

    root = _fmnist_torchvision_layout(str(tmp_path / "tv"))

    class FashionShirt(Benchmark):
        """ID: Fashion-MNIST class 0 (T-shirt/top); OOD: shirt (class 6), labelled -1."""
        ood_names = ["shirt"]

        def __init__(self):
            self.test = torchvision.datasets.FashionMNIST(root, train=False, transform=ToTensor())

        def train_set(self):
            train = torchvision.datasets.FashionMNIST(root, train=True, transform=ToTensor())
            return Subset(train, np.flatnonzero(train.targets.numpy() < 1))

        def test_sets(self, known=True, unknown=True):
            labels = self.test.targets.numpy()
            id_set = Subset(self.test, np.flatnonzero(labels < 1))
            shirt = Relabelled(Subset(self.test, np.flatnonzero(labels == 6)), -1)
            return [ConcatDataset([id_set, shirt])]

    result = FashionShirt().evaluate(detector, loader_kwargs={"batch_size": 256})
    out = tmp_path / "eval"
    run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                  "--pretrained_ldm_cfg", trained.config, "--dataset", "fashion-mnist@0",
                  "--ood", "shirt=fashion-mnist@6", "--no_plots", "--output_dir", str(out), "--data_path", root)
    results = json.loads((out / "results.json").read_text())
    assert [results["sets"][n]["images"] for n in ("ID", "shirt")] == [200, 197]  # the first 2000's, as above
    ours = results["metrics"]["MFsim"]["shirt"]["AUROC"]
    assert result[0]["Dataset"] == "shirt"
    assert result[0]["AUROC"] == pytest.approx(ours, abs=0.0005)  # 0.05 AUROC points


def test_baseline_predict_features_gives_the_headline_scores_by_default(detector):
    digits = digits_uint8()
    knn = KNNDetector(detector.cfg, k=2, device="cpu").fit([digits[:300]])
    z, keys = knn.features(digits[300:340])
    plain = knn.predict_features(z)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, knn.predict(digits[300:340]))
    assert set(knn.predict_features(z, all_scores=True)) == {"kNN_k2"}
    maha = MahalanobisDetector(detector.cfg, device="cpu").fit([digits[:300]])
    assert torch.equal(maha.predict_features(z, keys), maha(digits[300:340]))
    with pytest.raises(RuntimeError, match="not fitted"):
        KNNDetector(detector.cfg).predict_features(z)


def test_the_configs_device_is_used_even_when_cuda_seems_available(trained, monkeypatch):
    from dlsr.detector import DLSRDetector
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = load_config(trained.config)
    assert cfg.device == "cpu"
    assert DLSRDetector(cfg).ctx.device == torch.device("cpu")
    cfg.device = "auto"
    assert DLSRDetector(cfg).ctx.device == torch.device("cuda:0")  # auto would take the GPU
    assert DLSRDetector(cfg, device="cpu").ctx.device == torch.device("cpu")


def test_refitting_a_baseline_detector_clears_its_thresholds(trained):
    from dlsr.detector import KNNDetector, MahalanobisDetector
    z = torch.randn(40, 512)
    for det in (KNNDetector(trained.config, k=1, device="cpu"), MahalanobisDetector(trained.config, device="cpu")):
        det.fit_features(z)
        det.thresholds = {det.score: 1.0}
        det.fit_features(z + 1)
        assert det.thresholds is None
        with pytest.raises(RuntimeError, match="calibrate"):
            det.is_ood(np.zeros((2, 8, 8), np.uint8))


def test_dlsr_fit_features_refuses_another_runs_folder_but_refits_its_own(tiny):
    from dlsr.detector import DLSRDetector
    cfg = tiny.write(train={"epochs": 1, "subset": 64})
    z = torch.randn(64, 512)
    first = DLSRDetector(cfg, device="cpu").fit_features(z)
    first.fit_features(z + 0.1)  # its own refit replaces its checkpoints
    with pytest.raises(UserError, match="already holds checkpoints of a run"):
        DLSRDetector(cfg, device="cpu").fit_features(z)


def test_predict_features_without_keys_does_not_depend_on_row_position_or_other_rows(trained):
    from dlsr.detector import DLSRDetector
    det = DLSRDetector.from_checkpoint(str(trained.ckpt / "checkpoint-last.pth"), device="cpu")
    z = torch.randn(6, 512)
    full = det.predict_features(z)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.equal(det.predict_features(z[perm]), full[perm])
    assert torch.equal(det.predict_features(z[2:3]), full[2:3])
    assert torch.equal(det.predict_features(torch.cat([z[4:5], torch.randn(3, 512)]))[:1], full[4:5])


def test_api_device_names_are_checked(trained):
    from dlsr.detector import DLSRDetector, KNNDetector
    for device in ("tpu", "cuda:x", "CPU"):
        with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
            DLSRDetector.from_checkpoint(str(trained.ckpt / "checkpoint-last.pth"), device=device)
    with pytest.raises(ValueError, match="device must be"):
        KNNDetector(trained.config).to("gpu")


def test_detector_api(trained, tmp_path):
    det = DLSRDetector.from_checkpoint(str(trained.ckpt / "checkpoint-last.pth"), device="cpu")
    with pytest.raises(RuntimeError, match="calibrate"):
        det.is_ood(np.zeros((1, 8, 8), np.uint8))
    digits = np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)
    held_out = digits[:EVAL_DIGITS]  # the config's ID test set, which predict.py calibrates on
    th = det.calibrate([held_out[i:i + 200] for i in range(0, len(held_out), 200)], tpr=0.9)
    save_digits(tmp_path / "p", [3])
    _, rows = predict(trained, tmp_path / "p.csv", tmp_path / "p", extra=("--tpr", "0.9"))
    assert th == pytest.approx(json.loads((tmp_path / "p.json").read_text())["thresholds"], rel=1e-6)
    both = det.predict([str(tmp_path / "p" / "d0003.png")], all_scores=True)
    assert float(both["MSE"][0]) == pytest.approx(float(rows[0]["MSE"]), rel=1e-5)
    assert torch.equal(det.predict(digits[3:4]), both["MFsim"])  # array and file: one image, one score
    noise = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    assert det.is_ood(noise).all()
    z, keys = det.features(np.stack([digits[0]] * 5))  # (5, 8, 8): five grayscale images
    assert torch.equal(det.predict_features(z, keys), det.predict(digits[[0] * 5]))
    assert det.predict_features(z).shape == (5,)
    with pytest.raises(RuntimeError, match="not fitted"):
        DLSRDetector(trained.config, device="cpu").predict(noise)


def test_fit_features_trains_like_main(trained, tmp_path):
    cfg = load_config(trained.config)
    cfg.output_dir = str(tmp_path / "api")
    det = DLSRDetector(cfg, device="cpu")
    train_set = random_subset(build_dataset("digits", "train", cfg.data_path, 32), 256)
    scorer = scorer_for(cfg, det.ctx, {"end": str(trained.ckpt / "checkpoint-last.pth")})
    det.fit_features(scorer.set_features(train_set, split="train").z)  # the features main.py trained on
    ours = torch.load(tmp_path / "api" / "checkpoint-last.pth")["ema"]["weights"]
    main = torch.load(trained.ckpt / "checkpoint-last.pth")["ema"]["weights"]
    for k in ours:
        assert torch.allclose(ours[k], main[k], rtol=1e-4, atol=1e-6), k


def test_wrong_keys_and_ks_are_refused_in_the_users_terms(trained):
    from dlsr.detector import DLSRDetector, KNNDetector
    d = DLSRDetector.from_checkpoint(str(trained.ckpt / "checkpoint-last.pth"), device="cpu")
    z = torch.randn(3, 512)
    for keys in (torch.arange(2), torch.zeros(3), torch.zeros(3, 1, dtype=torch.int64)):
        with pytest.raises(ValueError, match="keys must be one integer per vector, shape \\(3,\\)"):
            d.predict_features(z, keys=keys)
    assert d.predict_features(z, keys=[1, 2, 3]).shape == (3,)
    for k in (2.7, 0, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            KNNDetector(trained.config, k=k)
    assert KNNDetector(trained.config, k=2.0).score == "kNN_k2"


def test_calibrating_on_a_handful_of_images_warns(trained, caplog):
    from dlsr.detector import DLSRDetector
    d = DLSRDetector.from_checkpoint(str(trained.ckpt / "checkpoint-last.pth"), device="cpu")
    with caplog.at_level(logging.WARNING, logger="dlsr"):
        d.calibrate([np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)])
    said = [r.message for r in caplog.records if "calibration image(s) are few" in r.message]
    assert len(said) == 1 and "3 calibration image(s)" in said[0] and "100 or more" in said[0]


def test_is_ood_accepts_an_image_scored_exactly_at_the_threshold(trained):
    """21 calibration images at tpr 0.95: the quantile is the 20th score itself (no interpolation)."""
    knn = KNNDetector(trained.config, k=1, device="cpu").fit([digits_uint8()[:300]])
    held = digits_uint8()[300:321]
    threshold = knn.calibrate([held], tpr=0.95)["kNN_k1"]
    scores = knn.predict(held)
    assert sorted(scores.tolist())[19] == threshold
    flags = knn.is_ood(held)
    assert flags.tolist() == (scores > threshold).tolist() and int(flags.sum()) == 1
    assert not flags[scores == threshold].any()


def test_layer_statistics_of_a_detector_fitted_on_features_come_from_those_features(detector, trained, tmp_path,
                                                                                      monkeypatch):
    """eval.layer_norm standardises each layer's error by its statistics on ID training vectors: for
    fit_features, the vectors given (the config's training set is never read); they change the scores."""
    import engine.scorer
    cfg = load_config(trained.config)
    cfg.output_dir, cfg.train.epochs, cfg.eval.layer_norm = str(tmp_path / "ln"), 1, True
    z, _ = detector.features(digits_uint8()[:256])

    def no_dataset(cfg):
        raise AssertionError("the config's training set was read")

    monkeypatch.setattr(engine.scorer, "training_set", no_dataset)
    det = DLSRDetector(cfg, device="cpu").fit_features(z)
    probe = z[:8]
    scores = det.predict_features(probe)
    assert torch.isfinite(scores).all()
    det.scorer.train_z, det.scorer._layer_stats = z * 3, {}  # other training vectors: other statistics
    assert not torch.allclose(det.predict_features(probe), scores)


def test_to_moves_what_a_detector_holds_and_a_fresh_detector_builds_nothing_to_move(trained, monkeypatch):
    """``to(device)`` before a baseline detector built its backbone only records the device; after,
    the backbone, the baselines' fitted tensors and DLSR's networks all go there (the meta device
    stands in for a GPU)."""
    from tests.helpers import FAKE_GPU
    from utils.distributed import resolve_device
    monkeypatch.setattr("dlsr.detector.resolve_device", lambda d: FAKE_GPU if d == "cuda" else resolve_device(d))
    for det in (KNNDetector(trained.config, k=1, device="cpu"), MahalanobisDetector(trained.config, device="cpu")):
        assert det.to("cuda") is det and det.ctx.device == FAKE_GPU and det.extractor is None
        det.to("cpu")
        z, _ = det.features(digits_uint8()[:6])  # builds the backbone, on the CPU
        det.fit_features(torch.cat([z] * 3) + torch.randn(18, z.shape[1]))
        det.to("cuda")
        assert all(p.is_meta for p in det.extractor.parameters()), det.name
        tensors = [v for v in vars(det.baselines).values() if isinstance(v, torch.Tensor)]
        assert tensors and all(t.is_meta for t in tensors), det.name
    det = DLSRDetector.from_checkpoint(str(trained.ckpt / "checkpoint-last.pth"), device="cpu")
    assert det.to("cuda") is det and det.scorer.ctx.device == FAKE_GPU
    assert all(p.is_meta for p in det.extractor.parameters())
    assert all(p.is_meta for m in det.scorer.models.values() for p in m.parameters())
