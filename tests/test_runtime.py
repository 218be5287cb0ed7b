"""utils/runtime.py: the process-wide malloc settings of the entry points."""
import ctypes
import sys


def test_freed_memory_is_kept_with_glibc_unless_asked_not_to(monkeypatch):
    """keep_freed_memory (cli.run_entry calls it first): glibc's mallopt(M_MMAP_MAX, 0)
    and mallopt(M_TRIM_THRESHOLD, 1 GiB) (<malloc.h>: -4 and -1); nothing with DLSR_DEFAULT_MALLOC=1,
    without glibc, or off Linux."""
    from utils import runtime
    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1
    monkeypatch.setattr(ctypes, "CDLL", lambda name: calls.append(name) or Libc())
    monkeypatch.delenv("DLSR_DEFAULT_MALLOC", raising=False)
    runtime.keep_freed_memory()
    assert calls == ["libc.so.6", (-4, 0), (-1, 2 ** 30)]
    for value, tuned in (("1", False), ("0", True), ("", True)):
        calls.clear()
        monkeypatch.setenv("DLSR_DEFAULT_MALLOC", value)
        runtime.keep_freed_memory()
        assert (len(calls) == 3) is tuned, value
    monkeypatch.delenv("DLSR_DEFAULT_MALLOC")

    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", no_glibc)
    runtime.keep_freed_memory()  # musl: nothing to tune, no error
    monkeypatch.setattr(ctypes, "CDLL", lambda name: calls.append(name) or Libc())
    monkeypatch.setattr(sys, "platform", "darwin")
    calls.clear()
    runtime.keep_freed_memory()
    assert calls == []
