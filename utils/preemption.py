"""Preemption: SIGTERM (what Slurm and Kubernetes send before killing a job), SIGUSR1 (Slurm's
``--signal=USR1@SECONDS`` before the time limit) and SIGUSR2 (what submitit asks Slurm for, and its
local executor sends) ask a training run to stop at the next safe point.

The handler only records the request. The training loop looks at it after every optimiser step,
the ranks agree on it (a flag reduced with the loss), rank 0 writes checkpoint-last.pth and the
process exits with status 143 and one line saying how to resume (docs/OPERATIONS.md).
"""
import signal
import threading
from contextlib import contextmanager
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    """Truthy once a stop signal arrived; ``name`` is that signal's name ("SIGTERM")."""

    def __init__(self) -> None:
        self.name: Optional[str] = None

    def __bool__(self) -> bool:
        return self.name is not None


@contextmanager
def stop_requests(signals=STOP_SIGNALS):
    """Catch ``signals`` for the block and yield the StopRequest they set; the previous handlers
    come back afterwards. Outside the main thread (where Python cannot install handlers) the
    request never becomes true."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        request.name = request.name or signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
