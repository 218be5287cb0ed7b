"""Output folders that runs can trust: checked before the work, locked while in use, and (for
evaluation results) replaced whole, so that a folder never holds the outputs of two runs."""
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Optional

from errors import UserError
from store.atomic import fsync_folder, temp_name


def check_writable(folder: str, what: str) -> None:
    """Create ``folder`` if needed and write a probe file into it, so a full disk, a read-only
    folder or a path that is a file is reported now, with its cause, not after hours of work."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{what} {folder!r} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        probe = temp_name(os.path.join(folder, ".write-probe"))
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to {what} {folder!r}: {cause(e)}") from None


def cause(e: OSError) -> str:
    """An OSError's cause in words: "no space left on device", "permission denied", ..."""
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    return (e.strerror or e.__class__.__name__).lower()


@contextmanager
def folder_lock(lock_path: str, what: str):
    """Hold an exclusive lock on ``lock_path`` for the block; a second run gets one clear line.

    A POSIX record lock: the kernel drops it when the process ends, however it ends (kill -9
    included), and worker processes forked meanwhile (DataLoader) do not inherit it."""
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise UserError(f"{what} is in use by another run (process {holder} holds {lock_path}); "
                            f"wait for it or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def lock_beside(path: str, what: str):
    """``folder_lock`` on a hidden lock file beside ``path`` (``.NAME.lock``), for outputs that are
    replaced whole (a results folder, a CSV), so the lock is not inside what gets replaced."""
    parent, name = os.path.split(os.path.abspath(path))
    return folder_lock(os.path.join(parent, f".{name}.lock"), what)


def output_file_problem(path: str, what: str, *companions: str) -> Optional[str]:
    """Why the output file ``path`` (and its ``companions``, e.g. the JSON beside a CSV) cannot be
    written, None if it can; its folder is created. Checked before any work."""
    for p in (path, *companions):
        if os.path.isdir(p):
            return f"{what} {p!r} is a folder; name a file in it instead (e.g. {os.path.join(p, 'predictions.csv')!r})"
    try:
        check_writable(os.path.dirname(os.path.abspath(path)), f"the folder of {what}")
    except UserError as e:
        return str(e)
    return None


def same_file(a: str, b: str) -> bool:
    """Whether two spellings name one file ("x.csv", "./x.csv", a link to it, another case on a
    case-insensitive disk where both exist)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def outputs_problem(outputs: Dict[str, str], inputs: Iterable[str], ours: Callable[[str, str], bool]) -> Optional[str]:
    """Why the files ``outputs`` ({what: path}) cannot be written, None if they can. An output never
    replaces another output, nor an input (``inputs``, under any spelling), nor an existing file the
    script did not write (``ours(what, path)`` says whether it did). Checked before any work."""
    items = list(outputs.items())
    for i, (what, path) in enumerate(items):
        for other, other_path in items[:i]:
            if same_file(path, other_path):
                return f"{what} {path!r} and {other} {other_path!r} are the same file; choose another name"
    inputs = list(inputs)
    for what, path in items:
        if not os.path.lexists(path):
            continue
        hit = next((i for i in inputs if same_file(path, i)), None)
        if hit is not None:
            return f"{what} {path!r} is one of the inputs ({hit!r}); writing it would replace that file"
        if os.path.isfile(path) and not ours(what, path):
            return (f"{what} {path!r} exists and was not written by this script; move it away or choose "
                    f"another name (a file this script wrote is replaced)")
    return None


def replace_folder(new: str, target: str) -> None:
    """Put the finished folder ``new`` in place of ``target`` whole: ``target`` holds either all of the
    previous run's outputs or all of this one's, never a mix (check ``foreign_files`` first: the
    previous folder is deleted)."""
    if os.path.isdir(target):
        old = temp_name(target.rstrip("/") + ".old")
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)  # the previous results come back whole
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, target)
    fsync_folder(os.path.dirname(os.path.abspath(target)))


def foreign_files(folder: str, ours: Iterable[str]) -> list:
    """Entries of ``folder`` whose names start with none of the prefixes ``ours``."""
    if not os.path.isdir(folder):
        return []
    ours = tuple(ours)
    return sorted(n for n in os.listdir(folder) if not n.startswith(ours))


def file_stem(name: str) -> str:
    """A dataset or set name as a safe file name stem ("folder:dtd/images" -> "folder_dtd_images")."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "set"


def keyed_path(folder: str, stem: str, key: dict, suffix: str) -> str:
    """``folder/stem-<digest of key><suffix>``: a file whose name changes with everything in ``key``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(folder, f"{stem}-{digest}{suffix}")
