"""Writes that either happen whole or not at all: temporary file beside the target, fsync, rename,
then an fsync of the folder, so that the rename itself survives a power failure."""
import glob
import os
import shutil
import signal
import socket
import threading
from contextlib import contextmanager

import torch


def temp_name(path: str) -> str:
    """A temporary name beside ``path``, unique per host and process (nodes may share the folder)."""
    return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"


def remove_stale_temporaries(path: str) -> None:
    """Delete temporaries of ``path`` left by processes of this host that no longer run (a kill -9
    during a save); those of live processes, and of other hosts, are left alone."""
    host = socket.gethostname()
    for tmp in glob.glob(glob.escape(path) + ".tmp-*"):
        owner = tmp[len(path) + len(".tmp-"):]
        tmp_host, _, pid = owner.rpartition("-")
        if tmp_host not in (host, "") or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            try:
                os.remove(tmp)
            except OSError:
                pass
        except PermissionError:
            pass  # alive, another user's


def fsync_folder(folder: str) -> None:
    """Make the entries of ``folder`` durable (a rename is a change of the folder, not of the file).
    Filesystems that cannot fsync a folder are left as they are."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def sigint_deferred():
    """Hold Ctrl-C until the block is done, then hand it to the handler that was there before (Python's
    default raises KeyboardInterrupt): a save is never cut in half, and a Ctrl-C is never lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


@contextmanager
def atomic_file(path: str, mode: str = "wb", **open_kwargs):
    """Open a temporary file for writing; it replaces ``path`` only if the block finishes.
    Ctrl-C during the block waits for it to finish (then interrupts)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temp_name(path)
    with sigint_deferred():
        try:
            with open(tmp, mode, **open_kwargs) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_folder(os.path.dirname(os.path.abspath(path)))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def atomic_torch_save(obj, path: str) -> None:
    with atomic_file(path) as f:
        torch.save(obj, f)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def atomic_link(src: str, dst: str) -> None:
    """Make ``dst`` a second name of ``src`` (a copy where hard links are not supported), atomically."""
    tmp = temp_name(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        fsync_folder(os.path.dirname(os.path.abspath(dst)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
