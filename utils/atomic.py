"""Writes that either happen whole or not at all: temporary file beside the target, fsync, rename."""
import os
import shutil
import socket
from contextlib import contextmanager

import torch


def temp_name(path: str) -> str:
    """A temporary name beside ``path``, unique per host and process (nodes may share the folder)."""
    return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"


@contextmanager
def atomic_file(path: str, mode: str = "wb"):
    """Open a temporary file for writing; it replaces ``path`` only if the block finishes."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
