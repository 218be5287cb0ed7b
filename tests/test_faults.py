"""Faults and bad inputs: each gives one line `error: ...` and exit status 2 (Ctrl-C: 130), and
nothing already written or cached is lost or mixed with another run's files."""
import errno
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import build_dataset
from tests.helpers import run_inprocess
from utils.atomic import atomic_torch_save
from utils.checkpoint import load_checkpoint, weights_checksum
from errors import UserError
from utils.rundir import check_writable


def error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def evaluate(t, out, *extra, check=False, script="test_mse_mfsim.py"):
    ckpt = (["--pretrained_ldm_ckpt", str(t.ckpt / "checkpoint-last.pth")] if script == "test_mse_mfsim.py" else [])
    return run_inprocess(script, *ckpt, "--pretrained_ldm_cfg", t.config, "--output_dir", str(out), "--no_plots",
                         *extra, check=check)


def snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def save_images(folder, n):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(os.path.join(folder, f"{i}.png"))


# ------------------------------------------------------------------ folders with links

def test_link_loops_are_walked_once(tmp_path):
    save_images(tmp_path / "img", 5)
    os.symlink(".", tmp_path / "img" / "self")
    assert len(build_dataset("folder:img", "test", str(tmp_path), 32)) == 5
    (tmp_path / "img" / "loop").mkdir()
    os.symlink("..", tmp_path / "img" / "loop" / "up")
    os.symlink(".", tmp_path / "img" / "loop" / "self")
    start = time.perf_counter()
    assert len(build_dataset("folder:img/loop", "test", str(tmp_path), 32)) == 5  # up -> img: its 5 images, once
    assert time.perf_counter() - start < 30


def test_a_broken_link_is_one_line_naming_it(trained, tmp_path):
    save_images(tmp_path / "data" / "b", 2)
    os.symlink("nowhere", tmp_path / "data" / "b" / "dead.jpg")
    line = error_line(evaluate(trained, tmp_path / "out", "--data_path", str(tmp_path / "data"), "--dataset", "digits",
                               "--ood", "b=folder:b"))
    assert "dead.jpg" in line and "broken link" in line


# ------------------------------------------------------------------ writes that fail

def test_a_failed_write_leaves_the_previous_results_whole(trained, tmp_path, monkeypatch):
    out = tmp_path / "res"
    evaluate(trained, out, check=True)
    before = snapshot(out)
    saves = []
    original = np.save

    def disk_fills_up(*args, **kwargs):
        saves.append(1)
        if len(saves) > 1:  # the second score file hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(np, "save", disk_fills_up)
    line = error_line(evaluate(trained, out, "--seed", "1"))
    assert "no space left on device" in line and str(out) in line
    assert snapshot(out) == before  # seed 0's results, all of them, and nothing of seed 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".res.lock", "res"]  # no staging folder left


def test_output_problems_are_reported_before_any_work(trained, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    line = error_line(evaluate(trained, tmp_path / "file"))
    assert "is a file" in line
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    assert "not evaluation results (thesis.tex)" in error_line(evaluate(trained, tmp_path / "mine"))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"
    cache = tmp_path / "cache-file"
    cache.write_text("x")
    assert "is a file" in error_line(evaluate(trained, tmp_path / "o", "--cache_dir", str(cache)))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match=r"cannot write to output folder '.*': no space left on device"):
        check_writable(str(tmp_path / "x"), "output folder")
    cfg = trained.write("full.yaml", output_dir=str(tmp_path / "full"))
    assert "no space left on device" in error_line(run_inprocess("main.py", "--config", cfg, check=False))


# ------------------------------------------------------------------ one output folder, one run

def hold_lock(path):
    """Another process holding the lock file ``path`` (as a second run would)."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.lockf(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_into_a_locked_folder_is_refused(trained, tmp_path):
    (tmp_path / "run").mkdir()
    holder = hold_lock(tmp_path / "run" / ".lock")
    try:
        cfg = trained.write("locked.yaml", output_dir=str(tmp_path / "run"))
        line = error_line(run_inprocess("main.py", "--config", cfg, check=False))
        assert "in use by another run" in line and "4242" in line
    finally:
        holder.kill()
        holder.wait()
    holder = hold_lock(tmp_path / ".res.lock")
    try:
        assert "in use by another run" in error_line(evaluate(trained, tmp_path / "res"))
    finally:
        holder.kill()
        holder.wait()


def test_existing_checkpoints_need_resume_or_overwrite_and_lr_pairs_come_from_one_run(trained, tmp_path):
    import shutil
    shutil.copytree(trained.ckpt, tmp_path / "ck")
    cfg = trained.write("again.yaml", output_dir=str(tmp_path / "ck"))
    before = snapshot(tmp_path / "ck")
    line = error_line(run_inprocess("main.py", "--config", cfg, check=False))
    assert "already holds checkpoints" in line and "--resume" in line and "--overwrite" in line
    assert snapshot(tmp_path / "ck") == before
    run_inprocess("main.py", "--config", cfg, "--overwrite", "--seed", "1")  # a new run, its own id
    old, new = load_checkpoint(str(trained.ckpt / "checkpoint-0.pth")), load_checkpoint(str(tmp_path / "ck" / "checkpoint-last.pth"))
    assert old.run_id and new.run_id and old.run_id != new.run_id
    assert load_checkpoint(str(tmp_path / "ck" / "checkpoint-0.pth")).run_id == new.run_id
    line = error_line(evaluate(trained, tmp_path / "lr", "--pretrained_ldm_ckpt_first", str(trained.ckpt / "checkpoint-0.pth"),
                               "--pretrained_ldm_ckpt_end", str(tmp_path / "ck" / "checkpoint-last.pth"),
                               script="test_LR.py"))
    assert "different training runs" in line


def test_ood_names_that_collide_are_refused(trained, tmp_path):
    line = error_line(evaluate(trained, tmp_path / "o", "--ood", "x y=digits", "--ood", "x_y=photos:100"))
    assert "'x y' and 'x_y'" in line and "scores/x_y.npy" in line
    assert "twice" in error_line(evaluate(trained, tmp_path / "o", "--ood", "a=digits", "--ood", "a=photos:100"))


# ------------------------------------------------------------------ integrity

def test_damaged_and_non_finite_checkpoints_are_refused_at_load(trained, tmp_path):
    from tests.helpers import write_release_checkpoint
    raw = torch.load(trained.ckpt / "checkpoint-last.pth", weights_only=True)
    raw["ema"]["weights"]["out.2.weight"][0, 0] += 1e-3  # a flipped bit, as far as the checksum is concerned
    torch.save(raw, tmp_path / "flipped.pth")
    line = error_line(evaluate(trained, tmp_path / "o", "--pretrained_ldm_ckpt", str(tmp_path / "flipped.pth")))
    assert "checksum" in line and "damaged" in line
    raw["ema"]["weights"]["out.2.weight"][0, :3] = float("nan")
    raw["checksum"] = weights_checksum(raw["model"], raw["ema"])
    torch.save(raw, tmp_path / "nan.pth")
    line = error_line(evaluate(trained, tmp_path / "o", "--pretrained_ldm_ckpt", str(tmp_path / "nan.pth")))
    assert "3 non-finite" in line and "out.2.weight" in line
    write_release_checkpoint(tmp_path / "release.pth", raw["model"], raw["ema"]["weights"], feature_dim=512)
    with pytest.raises(UserError, match="non-finite"):
        load_checkpoint(str(tmp_path / "release.pth"))


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    path = tmp_path / "checkpoint-last.pth"
    stale = tmp_path / f"checkpoint-last.pth.tmp-{host}-{dead.pid}"
    legacy = tmp_path / f"checkpoint-last.pth.tmp-{dead.pid}"
    alive = tmp_path / f"checkpoint-last.pth.tmp-{host}-{os.getppid()}"
    other_host = tmp_path / f"checkpoint-last.pth.tmp-elsewhere-{dead.pid}"
    for f in (stale, legacy, alive, other_host):
        f.write_bytes(b"partial")
    atomic_torch_save({"a": 1}, str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, alive.name, other_host.name])


def test_ctrl_c_during_a_checkpoint_save_finishes_the_save_then_exits_130(trained, tmp_path, monkeypatch):
    import utils.atomic
    original = utils.atomic.torch.save

    def interrupted_save(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives while the checkpoint is being written
        return original(obj, f)

    monkeypatch.setattr(utils.atomic.torch, "save", interrupted_save)
    cfg = trained.write("ctrlc.yaml", output_dir=str(tmp_path / "run"))
    proc = run_inprocess("main.py", "--config", cfg, check=False)
    assert proc.returncode == 130 and "interrupted" in proc.stderr and "Traceback" not in proc.stderr
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint-0.pth")).epoch == 0
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp" in p.name]


# ------------------------------------------------------------------ flags checked up front

@pytest.mark.parametrize("args,expected", [
    (["--subset_timesteps_num", "100"], "subset_timesteps_num (k) must be in 1..99"),
    (["--subset_timesteps_num", "1000"], "must be in 1..99"),
    (["--eta", "-1"], "diffusion.eta must be in [0, 1]"),
    (["--eta", "1.5"], "diffusion.eta must be in [0, 1]"),
    (["--eta", "nan"], "diffusion.eta must be in [0, 1]"),
    (["--opt", "lfdn.dropout=1.0"], "lfdn.dropout must be in [0, 1)"),
    (["--opt", "backbone.input_size=16"], "backbone.input_size must be at least 32"),
])
def test_bad_score_settings_are_refused_before_any_work(trained, tmp_path, args, expected):
    line = error_line(evaluate(trained, tmp_path / "o", "--cache_dir", str(tmp_path / "cache"), *args))
    assert expected in line
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,expected", [
    (["--lr", "-1"], "train.lr must be in [0, inf)"),
    (["--weight_decay", "-0.1"], "train.weight_decay must be in [0, inf)"),
    (["--opt", "train.betas=[1.0,0.9]"], "train.betas must be two numbers in [0, 1)"),
    (["--opt", "train.betas=[0.9,-0.1]"], "train.betas must be two numbers in [0, 1)"),
    (["--opt", "train.ema_decay=1.5"], "train.ema_decay must be in [0, 1]"),
])
def test_bad_training_settings_are_refused_before_any_work(trained, tmp_path, args, expected):
    cfg = trained.write("bad.yaml", output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "cache"))
    assert expected in error_line(run_inprocess("main.py", "--config", cfg, *args, check=False))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ messages that said the wrong thing

def test_messages_name_the_real_problem(trained, tmp_path):
    assert "is a folder, not a checkpoint file" in error_line(
        evaluate(trained, tmp_path / "o", "--pretrained_ldm_ckpt", str(tmp_path)))
    line = error_line(run_inprocess("test_mse_mfsim.py", "--pretrained_ldm_ckpt", str(trained.ckpt / "checkpoint-last.pth"),
                                    "--pretrained_ldm_cfg", str(tmp_path), check=False))
    assert "is a folder, not a YAML file" in line
    (tmp_path / "notes.pth").write_text("these are my notes\n")
    line = error_line(evaluate(trained, tmp_path / "o", "--pretrained_ldm_ckpt", str(tmp_path / "notes.pth")))
    assert "a text or other file" in line and "run code" not in line
    odd = tmp_path / "bad\nname.pth"
    odd.write_text("x")
    proc = evaluate(trained, tmp_path / "o", "--pretrained_ldm_ckpt", str(odd))
    assert len(proc.stderr.strip().splitlines()) == 1 and "bad\\nname.pth" in error_line(proc)


def test_a_truncated_cache_file_is_called_damaged_and_rebuilt(trained, tmp_path, caplog):
    out = tmp_path / "o"
    cache = tmp_path / "cache"
    evaluate(trained, out, "--cache_dir", str(cache), "--ood", "g=noise:gaussian:50", check=True)
    before = np.load(out / "scores" / "g.npy")
    victim = next(p for p in cache.iterdir() if p.name.startswith("noise_gaussian"))
    victim.write_bytes(victim.read_bytes()[:100])
    proc = evaluate(trained, out, "--cache_dir", str(cache), "--ood", "g=noise:gaussian:50", check=True)
    assert "is damaged (unreadable); extracting again" in proc.stderr
    assert np.array_equal(np.load(out / "scores" / "g.npy"), before)
    assert torch.load(victim, weights_only=True)["features"].shape == (50, 512)
