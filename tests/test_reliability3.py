"""Reliability III (issue 29): a resumed run is the same run, an output never replaces an input, one
image is one score, configs say what is wrong, any file name comes back, and the visible breaks of
the battery end in one line. Each test failed on the code before it."""
import csv
import json
import logging
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import ROOT, run_inprocess, run_script
from tests.test_predict import save_digits
from utils.checkpoint import load_checkpoint


def last(proc):
    return proc.stderr.strip().splitlines()[-1]


def copy_run(trained, tmp_path):
    """A copy of the shared trained run (3 epochs, batch 32, digits), to resume without touching it."""
    shutil.copytree(trained.ckpt, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def in_progress_copy(src, dst, step=3, epoch=1):
    raw = torch.load(src, map_location="cpu", weights_only=True)
    raw["epoch"], raw["in_progress"] = epoch, {"step": step, "loss_sum": 1.5}
    torch.save(raw, dst)
    return str(dst)


# ------------------------------------------------------------------ a resumed run is the same run

def test_resume_inside_an_epoch_with_another_batch_size_is_refused_naming_both(trained, tmp_path):
    ck = in_progress_copy(trained.ckpt / "checkpoint-last.pth", tmp_path / "stopped.pth")
    proc = run_inprocess("main.py", "--config", trained.config, "--resume", ck, "--batch_size", "64",
                         "--output_dir", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2
    assert "effective batch: 64 (64 x 1 process(es) x 1 accumulation) now, the run's 32" in last(proc)
    assert "--pre_ckpt_path" in last(proc)
    assert not (tmp_path / "out" / "log.txt").exists()  # refused before any work


def test_resume_with_another_dataset_or_accumulation_is_refused(trained, tmp_path):
    ck = str(trained.ckpt / "checkpoint-last.pth")
    common = ["--config", trained.config, "--resume", ck, "--epochs", "5", "--output_dir", str(tmp_path / "o")]
    proc = run_inprocess("main.py", *common, "--dataset", "fashion-mnist@0", check=False)
    assert proc.returncode == 2 and "train.dataset: 'fashion-mnist@0' now, the run's 'digits'" in last(proc)
    proc = run_inprocess("main.py", *common, "--accum_iter", "2", check=False)
    assert proc.returncode == 2 and "effective batch: 64" in last(proc)
    proc = run_inprocess("main.py", *common, "--seed", "3", check=False)
    assert proc.returncode == 2 and "train.seed: 3 now, the run's 0" in last(proc)


def test_a_new_run_from_the_weights_is_the_documented_way_to_change_them(trained, tmp_path):
    ck = str(trained.ckpt / "checkpoint-last.pth")
    run_inprocess("main.py", "--config", trained.config, "--pre_ckpt_path", ck, "--batch_size", "64", "--epochs", "1",
                  "--output_dir", str(tmp_path / "new"))
    assert load_checkpoint(str(tmp_path / "new" / "checkpoint-last.pth")).run_id != load_checkpoint(ck).run_id
    assert "--pre_ckpt_path" in open(os.path.join(ROOT, "docs", "OPERATIONS.md")).read()


def test_resuming_a_complete_run_says_so_and_leaves_the_folder_as_it_was(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for epochs in ("3", "2"):
        proc = run_inprocess("main.py", "--config", trained.config, "--resume", str(run / "checkpoint-last.pth"),
                             "--epochs", epochs, "--output_dir", str(run))
        assert proc.returncode == 0
        line = [x for x in proc.stderr.splitlines() if "complete" in x]
        assert len(line) == 1 and "holds epoch 2 of a run of 3 epoch(s)" in line[0]
        assert ("asks for fewer" in line[0]) == (epochs == "2")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # config.yaml too


def test_a_continued_run_that_trains_more_epochs_is_still_allowed(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    run_inprocess("main.py", "--config", trained.config, "--resume", str(run / "checkpoint-last.pth"), "--epochs", "4",
                  "--output_dir", str(run))
    ck = load_checkpoint(str(run / "checkpoint-last.pth"))
    assert ck.epoch == 3 and ck.config["train"]["epochs"] == 4 and ck.world_size == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 4  # agrees with the checkpoint


def test_sigusr1_during_feature_extraction_is_caught_and_saves_after_the_first_step(tiny, monkeypatch):
    import utils.features as features
    original = features.extract_features

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)  # as SLURM's --signal=USR1@... during the extraction
        return original(*args, **kwargs)
    monkeypatch.setattr(features, "extract_features", signalled)
    proc = run_inprocess("main.py", "--config", tiny.write(), check=False)
    assert proc.returncode == 143 and "stopped: SIGUSR1 received" in last(proc)
    ck = load_checkpoint(str(tiny.ckpt / "checkpoint-last.pth"))
    assert ck.epoch == 0 and ck.in_progress["step"] == 1
    assert any("-train-" in n for n in os.listdir(tiny.tmp / "cache"))  # the extraction was kept


# ------------------------------------------------------------------ LR's pair

def test_lr_refuses_a_swapped_or_identical_pair(trained, tmp_path):
    first, end = str(trained.ckpt / "checkpoint-0.pth"), str(trained.ckpt / "checkpoint-last.pth")
    common = ["--pretrained_ldm_cfg", trained.config, "--output_dir", str(tmp_path / "lr"), "--no_plots"]
    proc = run_inprocess("test_LR.py", "--pretrained_ldm_ckpt_first", end, "--pretrained_ldm_ckpt_end", first, *common,
                         check=False)
    assert proc.returncode == 2 and "(epoch 2) is not earlier than the end checkpoint" in last(proc)
    proc = run_inprocess("test_LR.py", "--pretrained_ldm_ckpt_first", end, "--pretrained_ldm_ckpt_end",
                         os.path.join(str(trained.ckpt), ".", "checkpoint-last.pth"), *common, check=False)
    assert proc.returncode == 2 and "are the same file" in last(proc)
    assert not (tmp_path / "lr").exists()


def test_evaluation_without_a_config_uses_the_one_stored_in_the_checkpoint(trained, tmp_path):
    """The stored config trains on digits with Lite0 at 32 px; config/Config.yaml (b4) would be refused."""
    proc = run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                         "--output_dir", str(tmp_path / "r"), "--no_plots", "--ood", "g=noise:gaussian:20",
                         "--dataset", "digits@1")
    meta = json.loads((tmp_path / "r" / "results.json").read_text())["meta"]
    assert meta["backbone"].startswith("efficientnet-lite0") and meta["input_size"] == 32
    assert proc.returncode == 0


# ------------------------------------------------------------------ configs

def test_a_repeated_key_is_an_error_naming_the_key_and_both_lines(tiny, tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(open(tiny.write()).read() + "train:\n  epochs: 1\n")
    proc = run_inprocess("main.py", "--config", str(path), check=False)
    assert proc.returncode == 2
    assert "the key 'train' appears twice in one mapping (lines" in last(proc)
    lines = [i + 1 for i, x in enumerate(path.read_text().splitlines()) if x.startswith("train:")]
    assert f"lines {lines[0]} and {lines[1]}" in last(proc)


def test_an_empty_config_is_an_error(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    proc = run_inprocess("main.py", "--config", str(tmp_path / "empty.yaml"), check=False)
    assert proc.returncode == 2 and "is empty" in last(proc)


def test_an_alias_bomb_is_refused_in_one_short_line(tiny, tmp_path):
    levels = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i, name in enumerate("bcdefg"):
        prev = "abcdefg"[i]
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    # The anchors inside the value itself: eval.ood is a list of ever larger lists (9 ** 7 leaves).
    items = [x.split(": ", 1)[1] for x in levels]
    text = "eval:\n  ood:\n" + "".join(f"    - {x}\n" for x in items)
    (tmp_path / "bomb.yaml").write_text(text)
    proc = run_inprocess("main.py", "--config", str(tmp_path / "bomb.yaml"), check=False)
    assert proc.returncode == 2 and "eval.ood should be" in last(proc)
    assert len(last(proc)) < 300 and "\n" not in last(proc)  # the value shown bounded, never expanded whole


def test_a_negative_learning_rate_reaches_the_range_check():
    proc = run_inprocess("main.py", "--lr", "-1e-4", check=False)
    assert proc.returncode == 2 and "train.lr must be in [0, inf), got -0.0001" in last(proc)


def test_a_repeated_k_is_refused_before_any_work(trained, tmp_path):
    proc = run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                         "--output_dir", str(tmp_path / "r"), "--baselines", "knn", "--knn_k", "1,1", check=False)
    assert proc.returncode == 2 and "eval.knn_k lists k = 1 more than once" in last(proc)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ predict.py's outputs and names

def test_predict_output_never_replaces_an_input_or_its_own_csv(trained, tmp_path):
    save_digits(tmp_path / "img", [1, 2])
    image = tmp_path / "img" / "d0001.png"
    before = image.read_bytes()
    common = ["--checkpoint", str(trained.ckpt / "checkpoint-last.pth"), "--images", str(tmp_path / "img")]
    proc = run_inprocess("predict.py", *common, "--output", str(tmp_path / "res.json"), check=False)
    assert proc.returncode == 2 and "summary goes beside it as NAME.json" in last(proc)
    proc = run_inprocess("predict.py", *common, "--output", str(tmp_path / "img" / "." / "d0001.png"), check=False)
    assert proc.returncode == 2 and "is one of the inputs" in last(proc) and image.read_bytes() == before
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
    from utils.prediction import collect_files
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


# ------------------------------------------------------------------ one image, one score (the API)

def test_one_image_in_every_layout_gets_one_score(trained):
    from utils.detector import DLSRDetector
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
    from PIL import Image
    assert torch.equal(d.predict([Image.fromarray(rgba, "RGBA")]), ref)  # as predict.py reads an RGBA file


def test_loader_batches_with_one_hot_labels_or_indices_are_pairs(trained):
    from utils.detector import DLSRDetector
    d = DLSRDetector.from_checkpoint(str(trained.ckpt / "checkpoint-last.pth"), device="cpu")
    x = torch.rand(4, 1, 16, 16)
    ref = d.predict(x)
    assert torch.equal(d.predict((x, torch.eye(4))), ref)
    assert torch.equal(d.predict([x, torch.arange(4), torch.arange(4)]), ref)
    gray = (x[:, 0] * 255).round().to(torch.uint8)  # (4, H, W): with labels, four images
    assert d.predict((gray, torch.arange(4))).shape == (4,)


def test_wrong_keys_and_ks_are_refused_in_the_users_terms(trained):
    from utils.detector import DLSRDetector, KNNDetector
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


def test_mahalanobis_refuses_too_few_vectors(trained):
    from utils.detector import MahalanobisDetector
    m = MahalanobisDetector(trained.config, device="cpu")
    for n in (1, 2):
        with pytest.raises(ValueError, match="at least 3 training features"):
            m.fit_features(torch.randn(n, 512))
    m.fit_features(torch.randn(3, 512))
    assert len(set(m.predict_features(torch.randn(4, 512)).tolist())) == 4


def test_calibrating_on_a_handful_of_images_warns(trained, caplog):
    from utils.detector import DLSRDetector
    d = DLSRDetector.from_checkpoint(str(trained.ckpt / "checkpoint-last.pth"), device="cpu")
    with caplog.at_level(logging.WARNING, logger="dlsr"):
        d.calibrate([np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)])
    said = [r.message for r in caplog.records if "calibration image(s) are few" in r.message]
    assert len(said) == 1 and "3 calibration image(s)" in said[0] and "100 or more" in said[0]


def test_a_backbone_mismatch_names_the_config_not_the_checkpoint(trained, tmp_path):
    from errors import UserError
    from utils.detector import DLSRDetector
    ck = str(trained.ckpt / "checkpoint-last.pth")
    with pytest.raises(UserError) as e:
        DLSRDetector.from_checkpoint(ck, config=os.path.join(ROOT, "config", "Config.yaml"), device="cpu")
    assert "but config='" in str(e.value) and "Config.yaml' uses efficientnet-b4" in str(e.value)


# ------------------------------------------------------------------ the bench scripts and the demo

@pytest.mark.parametrize("args,message", [
    (["--classes", "a"], "--classes: give class indices in 0..9"),
    (["--config", "missing.yaml"], "does not exist"),
    (["--epochs", "0"], "must be a positive integer, got '0'"),
    (["--epochs", "-3"], "must be a positive integer, got '-3'"),
])
def test_oneclass_refuses_bad_arguments_in_one_line(args, message):
    proc = run_script("bench/oneclass.py", *args, check=False, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_oneclass_keeps_a_result_only_for_the_same_config_content(tmp_path):
    import sys
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import argparse

    import oneclass
    from utils.config import load_config
    cfg = load_config(os.path.join(ROOT, "config", "fmnist_split.yaml"))
    args = argparse.Namespace(config="config/fmnist_split.yaml", seed=0)
    key = oneclass.result_key(args, cfg)
    cfg.lfdn.model_channels += 1  # the file edited in place: same name, other content
    assert oneclass.result_key(args, cfg) != key


def test_make_demo_run_again_resumes_or_reuses_its_run(tmp_path):
    env = {**os.environ, "MAKEFLAGS": ""}
    common = ["make", "-s", "--no-print-directory", "demo", "PY=echo", "FMNIST=/"]
    fresh = subprocess.run(common + [f"DEMO={tmp_path / 'none'}"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert fresh.returncode == 0 and "main.py --config config/demo.yaml\n" in fresh.stdout
    (tmp_path / "d" / "checkpoint").mkdir(parents=True)
    (tmp_path / "d" / "checkpoint" / "checkpoint-last.pth").write_bytes(b"")
    again = subprocess.run(common + [f"DEMO={tmp_path / 'd'}"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert again.returncode == 0 and f"--resume {tmp_path / 'd'}/checkpoint/checkpoint-last.pth" in again.stdout
