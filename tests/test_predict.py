"""predict.py, the per-image noise and the Python API."""
import csv
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from datasets import build_dataset, random_subset
from tests.helpers import ROOT, run_inprocess
from utils.config import load_config
from utils.detector import DLSRDetector
from errors import UserError
from utils.evaluation import Scorer
from utils.prediction import collect_files


def save_digits(folder, indices):
    os.makedirs(folder, exist_ok=True)
    images = load_digits().images
    for i in indices:
        Image.fromarray(np.round(images[i] * (255.0 / 16.0)).astype(np.uint8)).save(os.path.join(folder, f"d{i:04d}.png"))


def save_noise(folder, n, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(os.path.join(folder, f"n{i:03d}.png"))


def predict(t, output, *paths, extra=()):
    proc = run_inprocess("predict.py", "--checkpoint", str(t.ckpt / "checkpoint-last.pth"), "--images", *map(str, paths),
                         "--output", str(output), *extra)
    with open(output) as f:
        rows = list(csv.DictReader(f))
    return proc, rows


def test_a_mixed_folder_gives_one_row_per_image_with_bad_files_explained(trained, tmp_path):
    folder = tmp_path / "mixed"
    save_digits(folder, range(10))
    save_noise(folder / "sub", 5)
    (folder / "zero.png").write_bytes(b"")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "full.jpg")
    (folder / "corrupt.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    (folder / "notes.txt").write_text("not an image")
    named_bad = tmp_path / "named.txt"
    named_bad.write_text("named explicitly, so it gets a row")
    out = tmp_path / "pred.csv"
    proc, rows = predict(trained, out, folder, named_bad)
    with open(out) as f:
        assert f.readline().strip() == "path,MSE,MFsim,is_ood,error"
    paths = [r["path"] for r in rows]
    assert paths == sorted(paths) and len(paths) == 10 + 5 + 2 + 1  # the .txt inside the folder is skipped
    assert not any(p.endswith("notes.txt") for p in paths)
    bad = {os.path.basename(r["path"]): r for r in rows if r["error"]}
    assert set(bad) == {"zero.png", "corrupt.jpg", "named.txt"}
    assert all(r["MSE"] == r["MFsim"] == r["is_ood"] == "" and r["error"].startswith("cannot decode") for r in bad.values())
    good = [r for r in rows if not r["error"]]
    assert all(r["is_ood"] in ("0", "1") and float(r["MSE"]) > 0 for r in good)
    noise_flags = [r["is_ood"] for r in good if "/sub/" in r["path"]]
    assert noise_flags == ["1"] * 5  # noise is far from digits
    summary = json.loads((tmp_path / "pred.json").read_text())
    assert summary["counts"] == {"images": 18, "scored": 15, "flagged": sum(int(r["is_ood"]) for r in good),
                                 "unreadable": 3}
    assert {k: summary["calibration"][k] for k in ("set", "images")} == {"set": "digits", "images": 1797}
    assert summary["tpr"] == 0.95 and 0.95 * 1796 <= summary["calibration"]["accepted"]["MFsim"] <= 0.95 * 1797 + 1
    for r in good:  # is_ood is the MFsim threshold's verdict
        assert int(r["is_ood"]) == int(float(r["MFsim"]) > summary["thresholds"]["MFsim"])
    assert re.search(r"^15 scored, \d+ flagged OOD, 3 unreadable", proc.stdout, re.M)


def test_predict_scores_equal_evaluation_scores_and_the_threshold_accepts_95_percent(trained, tmp_path):
    folder = tmp_path / "data" / "pick"
    save_digits(folder, range(0, 1700, 11))
    save_noise(folder / "z", 30)
    _, rows = predict(trained, tmp_path / "p.csv", folder, extra=("--score", "MSE", "--tpr", "0.9"))
    run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                  "--pretrained_ldm_cfg", trained.config, "--ood", f"pick=folder:{folder}", "--output_dir",
                  str(tmp_path / "ev"), "--no_plots")
    ev = np.load(tmp_path / "ev" / "scores" / "pick.npy")
    assert len(ev) == len(rows) == 155 + 30
    for name in ("MSE", "MFsim"):  # same files, checkpoint and seed: the same numbers, to the bit
        assert [float(r[name]) for r in rows] == ev[name].tolist()
    summary = json.loads((tmp_path / "p.json").read_text())
    # The calibration set is the ID test set (digits), whose scores the evaluation saved.
    ids = np.load(tmp_path / "ev" / "scores" / "ID.npy")
    for name, tpr in (("MSE", 0.9),):
        accepted = np.mean(ids[name] <= summary["thresholds"][name])
        assert abs(accepted - tpr) <= 0.01
        assert [int(r["is_ood"]) for r in rows] == [int(float(r[name]) > summary["thresholds"][name]) for r in rows]
    _, again = predict(trained, tmp_path / "p95.csv", folder)  # default tpr 0.95, MFsim
    accepted = np.mean(ids["MFsim"] <= json.loads((tmp_path / "p95.json").read_text())["thresholds"]["MFsim"])
    assert abs(accepted - 0.95) <= 0.01


def test_calibration_is_computed_once_and_reused(trained, tmp_path):
    save_digits(tmp_path / "a", range(3))
    predict(trained, tmp_path / "a.csv", tmp_path / "a")
    records = [p for p in (trained.tmp / "cache").iterdir() if p.name.startswith("calibration-")]
    stamp = {p: p.stat().st_mtime_ns for p in records}
    save_digits(tmp_path / "b", range(3, 6))
    proc, _ = predict(trained, tmp_path / "b.csv", tmp_path / "b")
    assert "calibration (record)" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in records} == stamp
    predict(trained, tmp_path / "c.csv", tmp_path / "b", extra=("--tpr", "0.8"))  # another tpr: another record
    assert len([p for p in (trained.tmp / "cache").iterdir() if p.name.startswith("calibration-")]) == len(records) + 1


def test_an_images_score_does_not_depend_on_its_company(trained, tmp_path):
    save_digits(tmp_path / "many", range(100))
    save_digits(tmp_path / "one", [57])
    _, many = predict(trained, tmp_path / "many.csv", tmp_path / "many")
    _, one = predict(trained, tmp_path / "one.csv", tmp_path / "one")
    _, listed = predict(trained, tmp_path / "l.csv", f"@{_write_list(tmp_path, tmp_path / 'one' / 'd0057.png')}")
    _, other_seed = predict(trained, tmp_path / "s.csv", tmp_path / "one", extra=("--seed", "1"))
    inside = next(r for r in many if r["path"].endswith("d0057.png"))
    for name in ("MSE", "MFsim"):
        alone = float(one[0][name])
        # The noise is the image's own; only the batched arithmetic of backbone and LFDN (batch 1
        # vs 100) rounds differently. Another noise draw moves the score far more.
        assert float(inside[name]) == pytest.approx(alone, rel=1e-5, abs=1e-6)
        assert float(listed[0][name]) == alone
        assert abs(float(other_seed[0][name]) - alone) > 100 * abs(float(inside[name]) - alone)


def _write_list(tmp_path, *paths):
    path = tmp_path / "list.txt"
    path.write_text("# files to score\n" + "".join(f"{p}\n" for p in paths) + "\n")
    return path


def test_evaluation_scores_do_not_depend_on_the_batch_size_or_the_set(trained, tmp_path):
    from tests.test_evaluation import evaluate
    evaluate(trained, tmp_path / "b64")
    evaluate(trained, tmp_path / "b17", "--batch_size", "17", "--ood", "again=digits")
    a, b = np.load(tmp_path / "b64" / "scores" / "ID.npy"), np.load(tmp_path / "b17" / "scores" / "ID.npy")
    again = np.load(tmp_path / "b17" / "scores" / "again.npy")
    assert np.array_equal(b, again)  # the same images in another set: the same noise, the same scores
    for name in ("MSE", "MFsim"):
        assert np.allclose(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_collect_files_and_bad_arguments(tmp_path):
    save_digits(tmp_path / "f" / "x", range(2))
    os.symlink("..", tmp_path / "f" / "x" / "loop")  # a link loop is walked once
    listing = _write_list(tmp_path, tmp_path / "f" / "x" / "d0000.png", tmp_path / "extra.png")
    files = collect_files([str(tmp_path / "f"), f"@{listing}"])
    assert files == sorted({str(tmp_path / "f" / "x" / "d0000.png"), str(tmp_path / "f" / "x" / "d0001.png"),
                            str(tmp_path / "extra.png")})
    with pytest.raises(UserError, match="cannot read the file list"):
        collect_files([f"@{tmp_path / 'nope.txt'}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files"):
        collect_files([str(tmp_path / "empty")])


def test_predict_refuses_bad_settings_with_one_line(trained, tmp_path):
    ckpt = str(trained.ckpt / "checkpoint-last.pth")
    save_digits(tmp_path, [0])
    for args, expected in ((["--tpr", "1.5"], "--tpr must be between 0 and 1"),
                           (["--calibration", "folder:nowhere"], "no folder at")):
        proc = run_inprocess("predict.py", "--checkpoint", ckpt, "--images", str(tmp_path), "--output",
                             str(tmp_path / "x.csv"), *args, check=False)
        assert proc.returncode == 2 and expected in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "x.csv").exists()


def test_detector_api(trained, tmp_path):
    det = DLSRDetector.from_checkpoint(str(trained.ckpt / "checkpoint-last.pth"), device="cpu")
    with pytest.raises(RuntimeError, match="calibrate"):
        det.is_ood(np.zeros((1, 8, 8), np.uint8))
    digits = np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)
    th = det.calibrate([digits[i:i + 500] for i in range(0, len(digits), 500)], tpr=0.9)
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
    scorer = Scorer.from_checkpoints(cfg, det.ctx, {"end": str(trained.ckpt / "checkpoint-last.pth")})
    det.fit_features(scorer.set_features(train_set, split="train").z)  # the features main.py trained on
    ours = torch.load(tmp_path / "api" / "checkpoint-last.pth")["ema"]["weights"]
    main = torch.load(trained.ckpt / "checkpoint-last.pth")["ema"]["weights"]
    for k in ours:
        assert torch.allclose(ours[k], main[k], rtol=1e-4, atol=1e-6), k


def test_the_readme_examples_run_as_written(tmp_path, monkeypatch, capsys):
    """The three Python examples of the README, in order, as a reader would paste them."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    (tmp_path / "config").symlink_to(os.path.join(ROOT, "config"))
    monkeypatch.chdir(tmp_path)  # the examples write into my_detector/ beside their config/
    namespace = {"__name__": "__main__"}
    for tag in ("api-example", "pytorch-ood-example", "knn-example"):
        code = re.search(rf"<!-- {tag} -->\s*```python\n(.*?)```", readme, re.S).group(1)
        exec(compile(code, f"README {tag}", "exec"), namespace)
    out = capsys.readouterr().out.strip().splitlines()
    flags = next(line for line in out if line.startswith("tensor([True"))
    assert "False" not in flags
    assert (tmp_path / "my_detector" / "checkpoint-last.pth").is_file()
    aurocs = {line.rsplit(" AUROC ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in out if " AUROC " in line}
    assert set(aurocs) == {"DLSR", "kNN k=1", "Mahalanobis"}
    assert all(0.9 < v <= 1.0 for v in aurocs.values()), aurocs
