"""store/atomic.py: writes that happen whole or not at all (temporaries, stale ones of dead processes, Ctrl-C during a save)."""
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from store.atomic import atomic_torch_save
from store.checkpoint import (
    load_checkpoint,
    save_checkpoint,
)
from tests.helpers import run_inprocess


def test_a_failed_save_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = str(tmp_path / "c.pth")
    save_checkpoint({"model": {"a": torch.ones(1)}}, path)
    before = open(path, "rb").read()
    with pytest.raises(Exception):
        save_checkpoint({"model": {"a": lambda: 0}}, path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["c.pth"]


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


def test_only_temporaries_of_dead_processes_go_even_in_a_folder_named_like_a_pattern(tmp_path, monkeypatch):
    """A folder named with glob's characters still finds its temporaries; one of a live process of
    another user (kill answers EPERM) stays; one that cannot be removed is no error."""
    folder = tmp_path / "runs [1]*?"
    folder.mkdir()
    path, host = folder / "c.pth", socket.gethostname()
    stale, odd = folder / f"c.pth.tmp-{host}-4242", folder / f"c.pth.tmp-{host}-42x"
    for f in (stale, odd):
        f.write_bytes(b"partial")

    def answer(error):
        def kill(pid, sig):
            assert (pid, sig) == (4242, 0)  # asked, never signalled
            raise error
        return kill
    monkeypatch.setattr(os, "kill", answer(PermissionError(1, "Operation not permitted")))
    atomic_torch_save({"a": 1}, str(path))
    assert sorted(p.name for p in folder.iterdir()) == sorted([path.name, stale.name, odd.name])
    monkeypatch.setattr(os, "kill", answer(ProcessLookupError(3, "No such process")))
    real_remove = os.remove

    def refuse(p):
        if p == str(stale):
            raise PermissionError(13, "Permission denied", p)
        real_remove(p)
    monkeypatch.setattr(os, "remove", refuse)
    atomic_torch_save({"a": 2}, str(path))
    assert stale.exists() and torch.load(path, weights_only=True) == {"a": 2}
    monkeypatch.setattr(os, "remove", real_remove)
    atomic_torch_save({"a": 3}, str(path))
    assert sorted(p.name for p in folder.iterdir()) == sorted([path.name, odd.name])  # 42x: no pid, not ours


def test_the_file_then_its_folder_are_fsynced_and_a_folder_that_cannot_be_is_no_error(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    atomic_torch_save({"a": 1}, str(tmp_path / "c.pth"))
    assert len(synced) == 2 and synced[0].startswith(str(tmp_path / "c.pth.tmp-")) and synced[1] == str(tmp_path)

    def folder_refuses(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(22, "Invalid argument")
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", folder_refuses)
    atomic_torch_save({"a": 2}, str(tmp_path / "c.pth"))
    assert torch.load(tmp_path / "c.pth", weights_only=True) == {"a": 2} and os.listdir(tmp_path) == ["c.pth"]


def test_ctrl_c_during_a_checkpoint_save_finishes_the_save_then_exits_130(trained, tmp_path, monkeypatch):
    import store.atomic
    original = store.atomic.torch.save
    saves = []

    def interrupted_save(obj, f):
        saves.append(signal.getsignal(signal.SIGINT))
        signal.raise_signal(signal.SIGINT)  # Ctrl-C arrives (in this thread) while the checkpoint is being written
        return original(obj, f)

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # a Python program's own Ctrl-C handling
    try:
        monkeypatch.setattr(store.atomic.torch, "save", interrupted_save)
        cfg = trained.write("ctrlc.yaml", output_dir=str(tmp_path / "run"))
        proc = run_inprocess("main.py", "--config", cfg, check=False)
    finally:
        signal.signal(signal.SIGINT, before)
    said = f"handler before {before!r}, saves {saves}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 130 and "interrupted" in proc.stderr and "Traceback" not in proc.stderr, said
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint-0.pth")).epoch == 0
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp" in p.name]


def test_a_ctrl_c_held_during_a_write_goes_to_the_handler_that_was_there_before(tmp_path):
    """Not only Python's default: a program's own SIGINT handler gets the held Ctrl-C after the write
    (once, with the file complete); an ignored SIGINT stays ignored."""
    from store.atomic import atomic_file, atomic_write_text
    got = []

    def handler(signum, frame):
        got.append((signum, (tmp_path / "a.txt").read_text()))

    before = signal.signal(signal.SIGINT, handler)
    try:
        atomic_write_text(str(tmp_path / "a.txt"), "old")
        with atomic_file(str(tmp_path / "a.txt"), "w") as f:
            f.write("new")
            signal.raise_signal(signal.SIGINT)
            assert got == []  # held while the write is open
        assert got == [(signal.SIGINT, "new")]
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with atomic_file(str(tmp_path / "b.txt"), "w") as f:
            signal.raise_signal(signal.SIGINT)
        assert got == [(signal.SIGINT, "new")] and (tmp_path / "b.txt").exists()
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_ctrl_c_held_where_sigint_has_its_default_action_ends_the_process_after_the_write(tmp_path):
    """(A process started with SIGINT at SIG_DFL, not Python's handler: the held Ctrl-C still ends it,
    by the signal, once the file is complete.)"""
    from store.atomic import atomic_file
    path = tmp_path / "a.txt"
    pid = os.fork()
    if pid == 0:  # the child: ends by SIGINT, or says how it did not
        code = 3
        try:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            with atomic_file(str(path), "w") as f:
                f.write("new")
                signal.raise_signal(signal.SIGINT)
            code = 0  # the held Ctrl-C was lost
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGINT, status
    assert path.read_text() == "new"


def test_a_second_name_is_a_copy_where_hard_links_fail_and_no_temporary_is_left(tmp_path, monkeypatch):
    from store.atomic import atomic_link
    src, dst = tmp_path / "checkpoint-3.pth", tmp_path / "checkpoint-last.pth"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    atomic_link(str(src), str(dst))
    assert dst.read_bytes() == b"new" and os.path.samefile(src, dst)

    def no_links(a, b):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    src.write_bytes(b"newer")  # the same inode: dst too
    other = tmp_path / "checkpoint-4.pth"
    other.write_bytes(b"four")
    atomic_link(str(other), str(dst))
    assert dst.read_bytes() == b"four" and not os.path.samefile(other, dst)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3.pth", "checkpoint-4.pth", "checkpoint-last.pth"]

    def nothing_copied(a, b):
        open(b, "wb").close()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("shutil.copyfile", nothing_copied)
    with pytest.raises(OSError):
        atomic_link(str(src), str(dst))
    assert dst.read_bytes() == b"four"  # the previous file, whole
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3.pth", "checkpoint-4.pth", "checkpoint-last.pth"]
