"""Process-wide settings that make the CPU path fast without changing any number."""
import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> None:
    """Stop glibc from handing large freed blocks back to the OS.

    By default every allocation above the mmap threshold is a fresh mmap and every free unmaps it,
    so each batch's activations (hundreds of MB for b4 at 224 px) are page-faulted in again: on
    2 cores that made b4 extraction 3x slower (bench/RESULTS.md). With mmap off and a 1 GiB trim
    threshold, freed memory is reused. Set DLSR_DEFAULT_MALLOC=1 to keep glibc's defaults.
    """
    if not sys.platform.startswith("linux") or os.environ.get("DLSR_DEFAULT_MALLOC") == "1":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
