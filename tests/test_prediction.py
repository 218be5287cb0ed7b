"""engine/prediction.py through predict.py: rows, calibration, outputs that never replace inputs,
file lists, part files."""
import copy
import csv
import json
import logging
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dlsr.detector import DLSRDetector
from engine.prediction import calibrate, collect_files
from errors import UserError
from experiment.config import load_config
from tests.helpers import (
    CPU,
    EVAL_DIGITS,
    _digit_png,
    digits_uint8,
    hold_lock,
    last,
    predict,
    run_forked,
    run_inprocess,
    save_digits,
    scorer_for,
)


def save_noise(folder, n, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(os.path.join(folder, f"n{i:03d}.png"))


def _write_list(tmp_path, *paths):
    path = tmp_path / "list.txt"
    path.write_text("# files to score\n" + "".join(f"{p}\n" for p in paths) + "\n")
    return path


def test_predict_over_several_chunks_with_a_bad_file_in_the_first_keeps_every_row_with_its_file(trained, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    digits = digits_uint8()
    for i in range(300):  # chunks of lcm(64, 128) = 128 files: three chunks
        Image.fromarray(digits[i]).save(folder / f"d{i:04d}.png")
    (folder / "d0005.png").write_bytes(b"not an image")
    run_inprocess("predict.py", "--checkpoint", str(trained.ckpt / "checkpoint-last.pth"), "--images", str(folder),
                  "--output", str(tmp_path / "p.csv"))
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [r["path"] for r in rows] == sorted(str(p) for p in folder.iterdir())
    assert rows[5]["error"].startswith("cannot decode") and rows[5]["MSE"] == ""
    det = DLSRDetector.from_checkpoint(str(trained.ckpt / "checkpoint-last.pth"), device="cpu")
    for i in (0, 6, 127, 128, 200, 299):  # each row's scores are its own image's
        expected = det.predict(digits[i:i + 1], all_scores=True)
        assert float(rows[i]["MSE"]) == pytest.approx(float(expected["MSE"][0]), rel=1e-5), i
        assert float(rows[i]["MFsim"]) == pytest.approx(float(expected["MFsim"][0]), rel=1e-5, abs=1e-7), i


def test_each_calibration_key_field_forces_a_new_record(trained, tmp_path):
    cfg = load_config(trained.config)
    cfg.cache_dir = str(tmp_path / "cache")
    ckpt = str(trained.ckpt / "checkpoint-last.pth")
    scorer = scorer_for(cfg, CPU, {"end": ckpt})  # calibrated on ~45 images: the record, not the threshold, matters
    assert calibrate(scorer, "digits:150@0-2", 0.9)["from"] == "computed"
    assert calibrate(scorer, "digits:150@0-2", 0.9)["from"] == "record"
    changes = {"tpr": lambda c: None, "set": lambda c: None,
               "k": lambda c: setattr(c.diffusion, "subset_timesteps_num", 4),
               "eta": lambda c: setattr(c.diffusion, "eta", 0.5),
               "indexing": lambda c: setattr(c.diffusion, "indexing", "consistent"),
               "seed": lambda c: setattr(c.eval, "seed", 7),
               "mfsim_layers": lambda c: setattr(c.eval, "mfsim_layers", "all"),
               "noise_draws": lambda c: setattr(c.eval, "noise_draws", 2),
               "layer_norm": lambda c: setattr(c.eval, "layer_norm", True)}
    for field, change in changes.items():
        changed = copy.deepcopy(cfg)
        change(changed)
        other = scorer_for(changed, CPU, {"end": ckpt})
        spec, tpr = ("digits:150@0-3", 0.9) if field == "set" else ("digits:150@0-2", 0.8 if field == "tpr" else 0.9)
        assert calibrate(other, spec, tpr)["from"] == "computed", field
    other_weights = scorer_for(cfg, CPU, {"end": str(trained.ckpt / "checkpoint-0.pth")})
    assert calibrate(other_weights, "digits:150@0-2", 0.9)["from"] == "computed"


@pytest.mark.parametrize("tpr, ok", [(0.0, False), (1.0, False), (1e-3, True), (0.999, True)])
def test_tpr_bounds_are_exclusive(trained, tmp_path, tpr, ok):
    (tmp_path / "i").mkdir()
    Image.fromarray(digits_uint8()[0]).save(tmp_path / "i" / "a.png")
    proc = run_inprocess("predict.py", "--checkpoint", str(trained.ckpt / "checkpoint-last.pth"), "--images",
                         str(tmp_path / "i"), "--output", str(tmp_path / "p.csv"), "--tpr", str(tpr), check=False)
    assert (proc.returncode == 0) == ok, proc.stderr[-500:]
    if not ok:
        assert "--tpr must be between 0 and 1" in proc.stderr.splitlines()[-1]


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


def test_the_few_calibration_images_warning_at_its_bounds(caplog):

    from engine.prediction import warn_if_few
    with caplog.at_level(logging.WARNING, logger="dlsr"):
        warn_if_few(10, 0.5, "a")    # 5 above the threshold: enough
        warn_if_few(50, 0.95, "b")   # 2.5 above: too few
        warn_if_few(100, 0.9, "c")   # 10 above: enough
    said = [r.message for r in caplog.records if "are few" in r.message]
    assert len(said) == 1 and said[0].startswith("b: 50 calibration image(s)") and "100 or more" in said[0]


def test_a_calibration_record_of_another_key_is_never_used(tmp_path):
    import json as _json

    from engine.prediction import _read_record
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
    assert {k: summary["calibration"][k] for k in ("set", "images")} == {"set": f"digits:{EVAL_DIGITS}",
                                                                        "images": EVAL_DIGITS}
    accepted = summary["calibration"]["accepted"]["MFsim"]
    assert summary["tpr"] == 0.95 and 0.95 * (EVAL_DIGITS - 1) <= accepted <= 0.95 * EVAL_DIGITS + 1
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


def test_predict_output_checked_before_work_locked_and_parts_unique(trained, tmp_path):
    ckpt = str(trained.ckpt / "checkpoint-last.pth")
    (tmp_path / "imgs").mkdir()
    _digit_png(tmp_path / "imgs" / "d8.png")
    _digit_png(tmp_path / "imgs" / "d16.png", bits=16)
    cache = tmp_path / "cache"
    args = ("--checkpoint", ckpt, "--images", str(tmp_path / "imgs"), "--cache_dir", str(cache))
    (tmp_path / "folder.csv").mkdir()
    proc = run_inprocess("predict.py", *args, "--output", str(tmp_path / "folder.csv"), check=False)
    assert proc.returncode == 2 and "is a folder; name a file in it" in proc.stderr.splitlines()[-1]
    assert not cache.exists() or not os.listdir(cache)  # nothing computed, not even the calibration
    (tmp_path / "summary.json").mkdir()  # the JSON that goes beside the CSV
    proc = run_inprocess("predict.py", *args, "--output", str(tmp_path / "summary.csv"), check=False)
    assert proc.returncode == 2 and "summary.json' is a folder" in proc.stderr.splitlines()[-1]
    stale = tmp_path / "new" / "deeper" / "p.csv.part-0"
    stale.parent.mkdir(parents=True)
    stale.write_text("another run's part\n")
    run_inprocess("predict.py", *args, "--output", str(tmp_path / "new" / "deeper" / "p.csv"))
    assert stale.read_text() == "another run's part\n"  # another run's part file is not ours
    rows = (tmp_path / "new" / "deeper" / "p.csv").read_text().splitlines()
    r16, r8 = (row.split(",") for row in sorted(rows[1:]))
    assert r16[0].endswith("d16.png") and r8[0].endswith("d8.png")
    assert r16[1:3] == r8[1:3] and r16[4] == ""  # the 16-bit image scores as its 8-bit high byte does
    out = tmp_path / "new" / "deeper" / "p.csv"
    with hold_lock(out.parent / ".p.csv.lock"):  # another process holds the lock beside the CSV
        proc = run_forked("predict.py", *args, "--output", str(out), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: --output {str(out)!r} is in use by another run (process 4242 holds {out.parent / '.p.csv.lock'}); "
        f"wait for it or choose another folder")


def test_predict_output_never_replaces_an_input_or_its_own_csv(trained, tmp_path):
    save_digits(tmp_path / "img", [1, 2])
    image = tmp_path / "img" / "d0001.png"
    before = image.read_bytes()
    common = ["--checkpoint", str(trained.ckpt / "checkpoint-last.pth"), "--images", str(tmp_path / "img")]
    proc = run_inprocess("predict.py", *common, "--output", str(tmp_path / "res.json"), check=False)
    assert proc.returncode == 2 and "summary goes beside it as NAME.json" in last(proc)
    # the input under other spellings: "./" and "x/../" inside the string (pathlib would fold them), a
    # symbolic link, a hard link
    os.symlink(image, tmp_path / "link.png")
    os.link(image, tmp_path / "hard.png")
    for spelling in (f"{tmp_path}/img/./d0001.png", f"{tmp_path}/img/../img/d0001.png", str(tmp_path / "link.png"),
                     str(tmp_path / "hard.png")):
        assert spelling != str(image)  # another string, the same file
        proc = run_inprocess("predict.py", *common, "--output", spelling, check=False)
        assert proc.returncode == 2 and "is one of the inputs" in last(proc), spelling
        assert image.read_bytes() == before
    (tmp_path / "notes.csv").write_text("my own notes\n")
    proc = run_inprocess("predict.py", *common, "--output", str(tmp_path / "notes.csv"), check=False)
    assert proc.returncode == 2 and "was not written by this script" in last(proc)
    assert (tmp_path / "notes.csv").read_text() == "my own notes\n"
    (tmp_path / "list.txt").write_text(str(tmp_path / "img") + "\n")
    proc = run_inprocess("predict.py", "--checkpoint", common[1], "--images", f"@{tmp_path / 'list.txt'}",
                         "--output", str(tmp_path / "list.txt"), check=False)
    assert proc.returncode == 2 and "is one of the inputs" in last(proc)


def test_any_file_name_comes_back_in_the_csv(trained, tmp_path):
    folder = tmp_path / "odd"
    save_digits(folder, [1, 2, 3])
    names = {"d0001.png": "cr\rname.png", "d0002.png": "new\nline, \"quoted\".png"}
    for old, new in names.items():
        os.rename(folder / old, folder / new)
    raw = os.fsdecode(b"latin\xe9-name.png")  # bytes that are not UTF-8
    os.rename(folder / "d0003.png", os.path.join(str(folder), raw))
    os.mkfifo(folder / "pipe.png")  # never opened: a FIFO would block the run
    proc = run_inprocess("predict.py", "--checkpoint", str(trained.ckpt / "checkpoint-last.pth"), "--images",
                         str(folder), str(folder / "." / names["d0001.png"]), "--output", str(tmp_path / "p.csv"))
    with open(tmp_path / "p.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    got = sorted(os.path.basename(r["path"]) for r in rows)
    assert got == sorted([*names.values(), raw, "pipe.png"])  # each once, "./" spelling folded
    pipe = next(r for r in rows if r["path"].endswith("pipe.png"))
    assert pipe["error"] == "not a regular file (a FIFO)" and pipe["MSE"] == ""
    assert all(r["MSE"] for r in rows if r is not pipe)
    assert proc.returncode == 0


def test_file_lists_that_name_themselves_or_are_not_utf8(trained, tmp_path):
    save_digits(tmp_path / "img", [1])
    latin = os.fsdecode(b"caf\xe9.png")
    os.rename(tmp_path / "img" / "d0001.png", os.path.join(str(tmp_path / "img"), latin))
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"@" + os.fsencode(str(b)) + b"\n@" + os.fsencode(str(a)) + b"\n")
    b.write_bytes(os.fsencode(os.path.join(str(tmp_path / "img"), latin)) + b"\n@" + os.fsencode(str(a)) + b"\n")
    from engine.prediction import collect_files
    lists = []
    assert collect_files([f"@{a}"], lists) == [os.path.join(str(tmp_path / "img"), latin)]
    assert lists == [str(a), str(b)]


def test_stale_part_files_of_a_killed_run_are_removed_by_the_next_run(trained, tmp_path):
    save_digits(tmp_path / "img", [1])
    out = tmp_path / "p.csv"
    killed = tmp_path / "p.csv.part-1f2e3d-0"
    killed.write_text("half a run\n")
    run_inprocess("predict.py", "--checkpoint", str(trained.ckpt / "checkpoint-last.pth"), "--images",
                  str(tmp_path / "img"), "--output", str(out))
    assert not killed.exists() and out.is_file()


def test_the_calibration_line_counts_the_images_the_threshold_accepts(trained, tmp_path):
    save_digits(tmp_path / "img", [1])
    proc = run_inprocess("predict.py", "--checkpoint", str(trained.ckpt / "checkpoint-last.pth"), "--images",
                         str(tmp_path / "img"), "--output", str(tmp_path / "p.csv"), "--calibration", "digits@0",
                         "--cache_dir", str(tmp_path / "c"))
    summary = json.loads((tmp_path / "p.json").read_text())
    accepted, n = summary["calibration"]["accepted"]["MFsim"], summary["calibration"]["images"]
    assert f"{accepted} of {n} digits@0 images accepted, --tpr 0.95" in proc.stdout
    assert accepted == int(np.floor(0.95 * (n - 1))) + 1  # the numpy quantile's count on distinct scores
    again = run_inprocess("predict.py", "--checkpoint", str(trained.ckpt / "checkpoint-last.pth"), "--images",
                          str(tmp_path / "img"), "--output", str(tmp_path / "q.csv"), "--calibration", "digits@0",
                          "--cache_dir", str(tmp_path / "c"))
    assert f"{accepted} of {n}" in again.stdout  # the same count from the stored calibration


def test_the_csv_goes_to_standard_output_with_output_dash(trained, tmp_path, capsys, monkeypatch):
    save_digits(tmp_path / "img", [1, 2, 3])
    monkeypatch.chdir(tmp_path)
    proc = run_inprocess("predict.py", "--checkpoint", str(trained.ckpt / "checkpoint-last.pth"), "--images",
                         str(tmp_path / "img"), "--output", "-")
    rows = list(csv.DictReader(proc.stdout.splitlines()))
    assert [os.path.basename(r["path"]) for r in rows] == ["d0001.png", "d0002.png", "d0003.png"]
    assert all(float(r["MFsim"]) < 0 for r in rows)
    assert "3 scored" in proc.stderr and "-> -" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["img"]  # no "-", "-.json" or lock files left behind


def test_a_file_list_with_a_byte_order_mark_is_read_as_an_editor_reads_it(trained, tmp_path):
    save_digits(tmp_path / "img", [1, 2])
    listed = tmp_path / "list.txt"
    listed.write_bytes(b"\xef\xbb\xbf" + f"{tmp_path / 'img' / 'd0001.png'}\r\n{tmp_path / 'img' / 'd0002.png'}\r\n".encode())
    assert collect_files([f"@{listed}"]) == [str(tmp_path / "img" / "d0001.png"), str(tmp_path / "img" / "d0002.png")]


def test_predict_alone_scores_as_the_evaluation_when_the_chunk_spans_several_backbone_batches(trained, tmp_path):
    """eval.batch_size 64 and extract_batch_size 24: chunks of lcm = 192 files, whole batches of both."""
    from engine.prediction import predict_files
    cfg = load_config(trained.config)
    cfg.extract_batch_size, cfg.eval.batch_size = 24, 64
    save_digits(tmp_path / "img", range(200))
    scorer = scorer_for(cfg, CPU, {"end": trained.ckpt / "checkpoint-last.pth"})
    files = sorted(str(p) for p in (tmp_path / "img").iterdir())
    predict_files(scorer, files, {"MSE": 0.0, "MFsim": 0.0}, "MFsim", str(tmp_path / "p.csv"))
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 200 and [r["path"] for r in rows] == files
    from PIL import Image

    from dlsr.inputs import as_uint8_images
    images = torch.stack([as_uint8_images(Image.open(f), cfg.backbone.input_size)[0] for f in files])
    z, keys = [], []
    for i in range(0, 200, 192):  # the same chunks, each through whole backbone batches of 24
        zi, ki = scorer.image_features(images[i:i + 192])
        z.append(zi)
        keys.append(ki)
    expected = scorer.scores(torch.cat(z), torch.cat(keys))
    np.testing.assert_array_equal(np.array([float(r["MFsim"]) for r in rows]), expected["MFsim"])


def test_one_file_under_several_spellings_is_one_row_under_the_first_spelling_in_sort_order(tmp_path):
    save_digits(tmp_path / "img", [1, 2])
    os.symlink(tmp_path / "img" / "d0002.png", tmp_path / "a-link.png")
    spellings = [f"{tmp_path}/img/./d0001.png", str(tmp_path / "img" / "d0001.png"), str(tmp_path / "img"),
                 str(tmp_path / "a-link.png"), f"{tmp_path}/img/../img/d0002.png"]
    got = collect_files(spellings)
    first_of_1 = min(f"{tmp_path}/img/./d0001.png", str(tmp_path / "img" / "d0001.png"))
    first_of_2 = min(str(tmp_path / "a-link.png"), f"{tmp_path}/img/../img/d0002.png", str(tmp_path / "img" / "d0002.png"))
    assert got == sorted([first_of_1, first_of_2])  # as given, not resolved: the rows name what the user named
    missing = f"{tmp_path}/gone/../gone.png"  # a missing file keeps its row (it is reported unreadable), once
    assert collect_files([missing, str(tmp_path / "gone.png")]) == [str(tmp_path / "gone.png")]


def test_each_file_that_cannot_be_an_image_says_why_in_its_row(tmp_path):
    """(A file removed after the listing, a folder given where a file was, a FIFO, garbage bytes.)"""
    from engine.prediction import FileImages
    save_digits(tmp_path, [4])
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "garbage.png").write_bytes(b"not a png")
    names = ["d0004.png", "gone.png", "folder.png", "fifo.png", "garbage.png"]
    ds = FileImages([str(tmp_path / n) for n in names], 16)
    assert len(ds) == 5
    image, reason = ds[0]
    assert reason == "" and image.shape == (16, 16, 3) and image.dtype == torch.uint8
    reasons = [ds[i][1] for i in range(1, 5)]
    assert reasons[:3] == ["no such file", "a folder, not an image file", "not a regular file (a FIFO)"]
    assert reasons[3].startswith("cannot decode: ") and str(tmp_path) not in reasons[3]
    assert all(ds[i][0] is None for i in range(1, 5))


def test_an_image_scored_exactly_at_the_threshold_is_accepted(trained, tmp_path):
    """Calibrated on the very images predicted: 21 of them at --tpr 0.95 put the quantile on the 20th
    score itself (0.95 x 20 = 19, no interpolation), so one row sits at the threshold: ID, as the
    calibration counted it (score <= threshold)."""
    folder = tmp_path / "d"
    save_digits(folder, range(200, 221))
    _, rows = predict(trained, tmp_path / "p.csv", folder,
                      extra=("--calibration", f"folder:{folder}", "--tpr", "0.95", "--score", "MSE"))
    summary = json.loads((tmp_path / "p.json").read_text())
    threshold = summary["thresholds"]["MSE"]
    scores = sorted(float(r["MSE"]) for r in rows)
    assert len(rows) == 21 and scores[19] == threshold  # the row at the threshold
    at = [r for r in rows if float(r["MSE"]) == threshold]
    assert len(at) == 1 and at[0]["is_ood"] == "0"
    assert summary["calibration"]["accepted"]["MSE"] == 20 and sum(int(r["is_ood"]) for r in rows) == 1
