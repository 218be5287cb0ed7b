"""Behaviours that a planted bug could break unseen (issue 30). Each expected value is computed
independently: by hand, by a second path (the evaluation engine against predict.py or the API), or
by a brute force."""
import csv
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import ROOT, Tiny, run_inprocess, run_script
from tests.test_predict import save_digits


# ------------------------------------------------------------------ image identity and pixels

def test_an_rgb_image_with_equal_r_and_g_but_another_b_is_not_its_grayscale():
    from utils.features import digest64, image_keys
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


def test_float_images_are_rounded_to_the_nearest_pixel_not_floored():
    from utils.detector import as_uint8_images
    values = torch.tensor([0.7, 1.4, 127.6, 200.2, 254.8]) / 255  # not multiples of 1/255
    img = values.repeat(5, 1)[None, None]  # (1, 1, 5, 5)
    assert as_uint8_images(img, 5)[0, 0].tolist() == [1, 1, 128, 200, 255]  # floored: 0, 1, 127, 200, 254


def test_loader_batches_of_grayscale_images_are_pairs_whatever_the_batch_size():
    from utils.detector import as_uint8_images
    for b in (1, 3, 4, 5):
        x = torch.randint(0, 256, (b, 6, 6), dtype=torch.uint8)
        out = as_uint8_images((x, torch.zeros(b, dtype=torch.int64)), 6)
        assert out.shape == (b, 6, 6) and torch.equal(out, x)


def test_32_bit_integer_images_are_refused_as_floating_point_ones_are(trained, tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    Image.fromarray(np.full((8, 8), 70000, np.int32), mode="I").save(folder / "int32.tif")
    Image.fromarray(np.full((8, 8), 0.5, np.float32), mode="F").save(folder / "float.tif")
    save_digits(folder, [1])
    run_inprocess("predict.py", "--checkpoint", str(trained.ckpt / "checkpoint-last.pth"), "--images", str(folder),
                  "--output", str(tmp_path / "p.csv"))
    rows = {os.path.basename(r["path"]): r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    assert "32-bit integer pixels (PIL mode I)" in rows["int32.tif"]["error"] and rows["int32.tif"]["MSE"] == ""
    assert "floating-point pixels (PIL mode F)" in rows["float.tif"]["error"]
    assert rows["d0001.png"]["error"] == ""


def test_the_decode_batch_is_a_multiple_of_the_backbone_batch():
    from utils.features import DECODE_BATCH, decode_batch_size
    for b in range(1, 3 * DECODE_BATCH):
        d = decode_batch_size(b)
        assert d % b == 0 and d >= b and (b > DECODE_BATCH or d > DECODE_BATCH - b)


def test_a_folder_whose_images_changed_gets_a_new_cache_key(tmp_path):
    from datasets import build_dataset
    from utils.features import cache_key
    from models.features import BackboneId
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(folder / f"{i}.ppm")  # fixed size: header + pixels
    bid = BackboneId("efficientnet-lite0", "w", 32, 512, (0, 1, 2, 3, 4), (16, 40, 112, 432, 512))

    def key():
        return cache_key(bid, build_dataset(f"folder:{folder}", "test", str(tmp_path), 32), "test", "cpu-fp32", 8)
    before = key()
    size = os.path.getsize(folder / "1.ppm")
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(folder / "1.ppm")
    assert os.path.getsize(folder / "1.ppm") == size  # same names, count and sizes: only the content changed
    st = os.stat(folder / "1.ppm")
    os.utime(folder / "1.ppm", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert key() != before


# ------------------------------------------------------------------ configs and the save clock

def test_zero_noise_draws_are_refused_when_the_config_loads(tiny):
    from errors import UserError
    from utils.config import load_config
    with pytest.raises(UserError, match="eval.noise_draws must be positive, got 0"):
        load_config(tiny.write(eval={"noise_draws": 0}))


@pytest.mark.parametrize("overhead,write_s,since_s,due", [
    (0.1, 1.0, 9.0, False), (0.1, 1.0, 10.0, True), (0.5, 2.0, 3.0, False), (0.5, 2.0, 4.0, True),
    (0.0, 0.5, 100.0, False), (1.0, 5.0, 0.0, True)])
def test_the_checkpoint_refresh_follows_its_overhead_budget(overhead, write_s, since_s, due):
    from utils.training import SaveClock
    now = [0.0]
    clock = SaveClock(overhead, clock=lambda: now[0])
    with clock.timed():
        now[0] += write_s
    now[0] += since_s
    assert clock.refresh_due() is due  # refreshed while the last write cost at most overhead x the time since


# ------------------------------------------------------------------ metrics and the benchmark's table

def test_fpr95_ood_positive_takes_the_first_threshold_that_reaches_95_percent():
    from utils.metrics import fpr_at_95
    ids = np.arange(10.0)                           # ID scores 0..9
    ood = np.r_[np.arange(100.0, 119.0), 5.5]       # 19 of 20 OOD above every ID score: TPR 0.95 at FPR 0
    assert fpr_at_95(ids, ood, "ood_positive") == 0.0
    ood = np.r_[np.arange(100.0, 118.0), 5.5, 7.5]  # 18 high (TPR 0.90), 7.5 makes 0.95 with 8, 9 above: FPR 0.2
    assert fpr_at_95(ids, ood, "ood_positive") == pytest.approx(0.2)


def test_benchmark_csv_gives_the_std_over_seeds_of_each_metric():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import benchmark
    table = {"MFsim": {"shirt": {"AUROC": [60.0, 70.0, 80.0], "FPR95": [90.0, 50.0, 40.0]}}}
    rows = benchmark.csv_rows(table, ["MFsim"])
    assert rows[0] == ["score", "set", "AUROC_mean", "AUROC_std", "FPR95_mean", "FPR95_std"]
    fpr_std = np.sqrt(((90 - 60) ** 2 + (50 - 60) ** 2 + (40 - 60) ** 2) / 3)  # by hand: mean 60
    assert rows[1] == ["MFsim", "shirt", "70.0000", f"{np.sqrt(200 / 3):.4f}", "60.0000", f"{fpr_std:.4f}"]


# ------------------------------------------------------------------ the baselines and the detectors

def test_knn_distances_are_exact_float64_for_every_candidate():
    from utils.baselines import Baselines
    rng = np.random.default_rng(1)
    train = torch.from_numpy(rng.normal(size=(300, 64)).astype(np.float32))
    test = torch.cat([train[:5], torch.from_numpy(rng.normal(size=(20, 64)).astype(np.float32))])
    got = Baselines(train, ["knn"], [1, 3]).scores(test)
    a = train.double() / train.double().norm(dim=1, keepdim=True)
    b = test.double() / test.double().norm(dim=1, keepdim=True)
    dist = torch.cdist(b, a, compute_mode="donot_use_mm_for_euclid_dist").sort(dim=1).values  # float64 brute force
    assert np.allclose(got["kNN_k1"], dist[:, 0].numpy(), atol=1e-9, rtol=0)
    assert np.allclose(got["kNN_k3"], dist[:, 2].numpy(), atol=1e-9, rtol=0)
    assert np.all(got["kNN_k1"][:5] == 0.0)  # exact duplicates of training vectors


def test_refitting_a_baseline_detector_clears_its_thresholds(trained):
    from utils.detector import KNNDetector, MahalanobisDetector
    z = torch.randn(40, 512)
    for det in (KNNDetector(trained.config, k=1, device="cpu"), MahalanobisDetector(trained.config, device="cpu")):
        det.fit_features(z)
        det.thresholds = {det.score: 1.0}
        det.fit_features(z + 1)
        assert det.thresholds is None
        with pytest.raises(RuntimeError, match="calibrate"):
            det.is_ood(np.zeros((2, 8, 8), np.uint8))


def test_dlsr_fit_features_refuses_another_runs_folder_but_refits_its_own(tiny):
    from errors import UserError
    from utils.detector import DLSRDetector
    cfg = tiny.write(train={"epochs": 1, "subset": 64})
    z = torch.randn(64, 512)
    first = DLSRDetector(cfg, device="cpu").fit_features(z)
    first.fit_features(z + 0.1)  # its own refit replaces its checkpoints
    with pytest.raises(UserError, match="already holds checkpoints of a run"):
        DLSRDetector(cfg, device="cpu").fit_features(z)


def test_predict_features_without_keys_does_not_depend_on_row_position_or_other_rows(trained):
    from utils.detector import DLSRDetector
    det = DLSRDetector.from_checkpoint(str(trained.ckpt / "checkpoint-last.pth"), device="cpu")
    z = torch.randn(6, 512)
    full = det.predict_features(z)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.equal(det.predict_features(z[perm]), full[perm])
    assert torch.equal(det.predict_features(z[2:3]), full[2:3])
    assert torch.equal(det.predict_features(torch.cat([z[4:5], torch.randn(3, 512)]))[:1], full[4:5])


def test_layer_norm_normalises_each_draw_by_its_own_statistics(tiny):
    from utils.detector import DLSRDetector
    from utils.features import vector_keys
    from utils.scores import layer_errors, layer_normalised_scores
    det = DLSRDetector(tiny.write(train={"epochs": 1, "subset": 64}, eval={"layer_norm": True, "noise_draws": 2}),
                       device="cpu")
    det.fit_features(torch.randn(64, 512))
    z = torch.randn(5, 512)
    got = det.predict_features(z, all_scores=True)
    scorer, keys = det.scorer, vector_keys(z)
    stats = [scorer.layer_stats("end", d) for d in (0, 1)]
    assert not torch.equal(stats[0][0][0], stats[1][0][0])  # each draw has statistics of its own
    per_draw = [layer_normalised_scores(layer_errors(scorer._reconstruct(z, keys, "end", d), z,
                                                     scorer.extractor.indices), stats[d]) for d in (0, 1)]
    for t in ("MSE", "MFsim"):
        expected = (per_draw[0][t].double() / 2 + per_draw[1][t].double() / 2).numpy()
        assert np.allclose(got[t].numpy(), expected, rtol=1e-6, atol=1e-9), t


# ------------------------------------------------------------------ predict.py against the evaluation

def test_predict_scores_equal_the_evaluations_when_the_backbone_batch_does_not_divide_the_chunk(trained, tmp_path):
    folder = tmp_path / "img"
    save_digits(folder, range(150))
    ckpt = str(trained.ckpt / "checkpoint-last.pth")
    sizes = ["--batch_size", "64", "--opt", "extract_batch_size=24"]  # a chunk of lcm(64, 24) = 192
    run_inprocess("predict.py", "--checkpoint", ckpt, "--images", str(folder), "--output", str(tmp_path / "p.csv"),
                  *sizes, "--cache_dir", str(tmp_path / "c1"))
    run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", ckpt, "--dataset", f"folder:{folder}", "--ood",
                  "g=noise:gaussian:8", "--output_dir", str(tmp_path / "r"), "--no_plots", *sizes,
                  "--cache_dir", str(tmp_path / "c2"))
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    ev = np.load(tmp_path / "r" / "scores" / "ID.npy")
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows) and len(rows) == len(ev) == 150
    assert np.array_equal(np.array([float(r["MFsim"]) for r in rows]), ev["MFsim"])
    assert np.array_equal(np.array([float(r["MSE"]) for r in rows]), ev["MSE"])


def test_predict_on_two_ranks_over_several_chunks_equals_one_process(trained, tmp_path):
    folder = tmp_path / "img"
    save_digits(folder, range(37))
    ckpt = str(trained.ckpt / "checkpoint-last.pth")
    sizes = ["--batch_size", "8", "--opt", "extract_batch_size=8"]  # 5 chunks of 8: rank 0 takes 3, rank 1 two
    run_script("predict.py", "--checkpoint", ckpt, "--images", str(folder), "--output", str(tmp_path / "two.csv"),
               *sizes, "--cache_dir", str(tmp_path / "c"), torchrun=2)
    run_inprocess("predict.py", "--checkpoint", ckpt, "--images", str(folder), "--output", str(tmp_path / "one.csv"),
                  *sizes, "--cache_dir", str(tmp_path / "c"))
    one, two = (list(csv.DictReader(open(tmp_path / f"{n}.csv"))) for n in ("one", "two"))
    assert [r["path"] for r in two] == [r["path"] for r in one] == sorted(r["path"] for r in one)
    for a, b in zip(one, two):
        assert np.isclose(float(a["MFsim"]), float(b["MFsim"]), rtol=1e-4, atol=1e-5), a["path"]
        assert np.isclose(float(a["MSE"]), float(b["MSE"]), rtol=1e-4), a["path"]
    assert len({r["MFsim"] for r in two}) > 30  # each row its own scores, not a neighbour's


# ------------------------------------------------------------------ bench/oneclass.py's main()

def test_oneclass_main_fits_the_baselines_on_the_id_class_training_features_only(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import oneclass
    from utils.baselines import Baselines
    t = Tiny(tmp_path)
    cfg = t.write(train={"epochs": 1, "subset": None, "batch_size": 32})
    fitted = []

    class Recording(Baselines):
        def __init__(self, train, names, ks):
            fitted.append(train.clone())
            super().__init__(train, names, ks)
    monkeypatch.setattr(oneclass, "Baselines", Recording)
    monkeypatch.setattr(oneclass, "DATASET", "digits")  # small, labelled, shipped with scikit-learn
    monkeypatch.setattr(oneclass, "record", lambda *a, **k: None)  # no row in bench/RESULTS.md
    oneclass.main(["--classes", "3", "--config", cfg, "--output_dir", str(tmp_path / "out"), "--epochs", "1"])
    from datasets import build_dataset
    from utils.config import load_config
    from utils.distributed import DistContext
    from utils.features import features_for
    from utils.model_factory import build_extractor
    c = load_config(cfg)
    ds = build_dataset("digits", "train", c.data_path, c.backbone.input_size)
    z = features_for(c, DistContext(0, 1, 0, torch.device("cpu")), build_extractor(c), ds, "train").z
    assert len(fitted) == 1 and torch.equal(fitted[0], z[torch.from_numpy(ds.labels == 3)])
    result = json.loads((tmp_path / "out" / "oneclass.json").read_text())
    assert set(result["classes"]["3"]) == set(oneclass.METHODS)


# ------------------------------------------------------------------ survivors of make mutate (issue 30)

def test_a_value_in_a_message_is_kept_whole_up_to_the_limit_and_cut_after():
    from utils.config import one_line_value
    exact = ["x" * 16] * 4  # its repr is 80 characters
    assert len(repr(exact)) == 80 and one_line_value(exact) == repr(exact)
    longer = ["x" * 17] * 4
    assert one_line_value(longer) == repr(longer)[:76] + " ..." and len(one_line_value(longer)) == 80


def test_an_unknown_section_in_opt_is_an_error_naming_the_key():
    proc = run_inprocess("main.py", "--opt", "nope.x=1", check=False)
    assert proc.returncode == 2 and "unknown config key 'nope.x'" in proc.stderr


def test_backbone_layers_are_checked_against_the_backbones_taps(tiny):
    from errors import UserError
    from utils.config import load_config
    with pytest.raises(UserError, match="backbone.layers must list taps of efficientnet-lite0 among 0..4, got \\[5\\]"):
        load_config(tiny.write(backbone={"name": "efficientnet-lite0", "input_size": 32, "layers": [5]}))
    assert load_config(tiny.write(backbone={"name": "efficientnet-lite0", "input_size": 32,
                                            "layers": [4]})).backbone.layers == [4]


def test_the_few_calibration_images_warning_at_its_bounds(caplog):
    import logging

    from utils.prediction import warn_if_few
    with caplog.at_level(logging.WARNING, logger="dlsr"):
        warn_if_few(10, 0.5, "a")    # 5 above the threshold: enough
        warn_if_few(50, 0.95, "b")   # 2.5 above: too few
        warn_if_few(100, 0.9, "c")   # 10 above: enough
    said = [r.message for r in caplog.records if "are few" in r.message]
    assert len(said) == 1 and said[0].startswith("b: 50 calibration image(s)") and "100 or more" in said[0]


def test_a_calibration_record_of_another_key_is_never_used(tmp_path):
    import json as _json

    from utils.prediction import _read_record
    path = tmp_path / "calibration.json"
    key = {"version": 1, "set": "digits", "tpr": 0.95}
    record = {"key": {**key, "tpr": 0.9}, "thresholds": {"MSE": 1.0, "MFsim": 0.0}, "images": 3,
              "accepted": {"MSE": 2, "MFsim": 2}}
    path.write_text(_json.dumps(record))
    assert _read_record(str(path), key) is None  # the same file name, another key inside
    path.write_text(_json.dumps({**record, "key": key}))
    assert _read_record(str(path), key)["images"] == 3
    path.write_text(_json.dumps({k: v for k, v in {**record, "key": key}.items() if k != "accepted"}))
    assert _read_record(str(path), key) is None  # a record of before the counts: computed again


def test_dev_shm_that_holds_every_worker_leaves_the_count_and_says_nothing(monkeypatch, caplog):
    import logging
    from types import SimpleNamespace

    from utils import features
    batch = 10 * 2 ** 20
    monkeypatch.setattr(features.shutil, "disk_usage", lambda _: SimpleNamespace(free=2 * 2 * batch * 4))
    monkeypatch.setattr(features, "_said_shm", [])
    with caplog.at_level(logging.WARNING, logger="dlsr"):
        assert features.shm_workers(4, batch) == 4  # exactly enough: half the free space holds 4 x 2 batches
    assert not [r for r in caplog.records if "/dev/shm" in r.message]
    with caplog.at_level(logging.WARNING, logger="dlsr"):
        assert features.shm_workers(5, batch) == 4
    said = [r.message for r in caplog.records if "decoding with 4 worker(s) instead of 5" in r.message]
    assert len(said) == 1 and "each queues ~20 MB" in said[0] and "has 160 MB free" in said[0]


def test_a_feature_cache_file_of_another_key_is_never_used(tmp_path):
    from utils.features import _read_valid
    path = str(tmp_path / "f.pt")
    key = {"version": 4, "split": "test"}
    torch.save({"key": {**key, "split": "train"}, "features": torch.zeros(3, 5), "image_keys": torch.zeros(3)}, path)
    assert _read_valid(path, key, (3, 5)) is None  # the same file name, another key inside
    torch.save({"key": key, "features": torch.zeros(3, 5), "image_keys": torch.zeros(3)}, path)
    assert _read_valid(path, key, (3, 5)) is not None and _read_valid(path, key, (4, 5)) is None


def test_tf32_is_turned_off_with_the_switches_of_older_pytorch_too(monkeypatch):
    from types import SimpleNamespace

    from utils.features import exact_fp32_on_cuda
    cudnn, matmul = SimpleNamespace(allow_tf32=True), SimpleNamespace(allow_tf32=True)  # PyTorch < 2.9: no .conv
    monkeypatch.setattr(torch.backends, "cudnn", cudnn)
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    exact_fp32_on_cuda()
    assert cudnn.allow_tf32 is False and matmul.allow_tf32 is False


def test_lr_refuses_two_checkpoints_of_the_same_epoch(trained, tmp_path):
    """A copy of a checkpoint is another file of the same epoch: LR would compare a model with itself."""
    copy = tmp_path / "copy-of-first.pth"
    shutil.copy(trained.ckpt / "checkpoint-0.pth", copy)
    proc = run_inprocess("test_LR.py", "--pretrained_ldm_ckpt_first", str(copy), "--pretrained_ldm_ckpt_end",
                         str(trained.ckpt / "checkpoint-0.pth"), "--output_dir", str(tmp_path / "lr"), check=False)
    assert proc.returncode == 2 and "(epoch 0) is not earlier than the end checkpoint" in proc.stderr


def test_the_loader_sizes_its_workers_by_the_bytes_of_one_decoded_batch(monkeypatch):
    from utils import features
    from utils.distributed import DistContext
    asked = []
    monkeypatch.setattr(features, "shm_workers", lambda n, batch_bytes: asked.append((n, batch_bytes)) or 1)
    loader = features.image_loader(list(range(8)), DistContext(0, 1, 0, torch.device("cpu")), 16, 3, 224)
    assert asked == [(3, 16 * 224 * 224 * 3)] and loader.num_workers == 1  # uint8 RGB: 3 bytes a pixel
    features.image_loader(list(range(8)), DistContext(0, 1, 0, torch.device("cpu")), 16, 0, 224)
    assert len(asked) == 1  # no workers, nothing to size
