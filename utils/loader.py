"""The decoding loader: DataLoaders of decoded images, and the life cycle of their worker processes.

A scheduler's stop signal must reach the main process, which saves and exits 143, and must not
end the decoding workers first: a dead worker makes the loader raise "DataLoader worker killed by
signal" in the main process, before the save. Slurm signals every process of a job step (its
cgroup, not only a process group), torchrun's agent and Kubernetes the process group. So:

1. workers ignore the stop signals (``ignore_stop_signals``), and are forked with those signals
   blocked (``decoded``), so that a signal arriving during the fork waits until they ignore it;
2. workers that ignore SIGTERM cannot be ended by multiprocessing's exit handler (SIGTERM, then a
   join that would wait forever), so at exit the ones still alive (a loader left open by an error)
   are killed (``_kill_workers_at_exit``), with SIGCHLD back at its default first (the loader's
   handler would raise at the first death).

The simpler alternative, workers in a process group of their own with default signal handling, was
tried and rejected: it survives a SIGTERM to the process group, but a SIGTERM to every process (what
Slurm does) kills the workers and loses the save (docs/OPERATIONS.md; tests/test_loader.py keeps
both cases).
"""
import atexit
import logging
import multiprocessing
import shutil
import signal

from torch.utils.data import DataLoader

from utils.preemption import STOP_SIGNALS

log = logging.getLogger("dlsr")
SHM = "/dev/shm"
_exit_handler = []
_said_shm = []


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """In a decoding worker: the stop signals are for the main process (see the module's docstring)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _kill_workers_at_exit() -> None:
    """At exit, end the decoding workers still alive with SIGKILL (they ignore multiprocessing's
    SIGTERM). Registered after multiprocessing's exit handler, so it runs first."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the loader's handler would raise at the first death
    workers = [c for c in multiprocessing.active_children() if c.daemon]  # DataLoader's; others left as they are
    for child in workers:
        child.kill()
    for child in workers:
        child.join(timeout=5)


def shm_workers(num_workers: int, batch_bytes: int, local_processes: int = 1, folder: str = SHM) -> int:
    """At most as many decoding workers as /dev/shm can serve: each worker keeps about two batches
    there (the loader's prefetch), and the node's ``local_processes`` share it. Uses half of what is
    free; says so when it cuts (a container's default 64 MB holds fewer 224 px batches than 8 workers
    queue)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return num_workers
    fit = max(0, int(free // 2 // max(1, local_processes) // max(1, 2 * batch_bytes)))
    if fit < num_workers:
        if not _said_shm:
            _said_shm.append(True)
            log.warning("%s has %.0f MB free for %d process(es): decoding with %d worker(s) each instead of %d "
                        "(each queues ~%.0f MB); give the container more (docker --shm-size=8g) to decode faster",
                        folder, free / 2 ** 20, local_processes, fit, num_workers, 2 * batch_bytes / 2 ** 20)
        return fit
    return num_workers


def decoded(loader: DataLoader):
    """Iterate ``loader``, its workers started with the stop signals blocked (see the module's docstring)."""
    if not loader.num_workers:
        yield from loader
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        batches = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    try:
        yield from batches
    finally:
        # An error (here or in the caller's loop) or a loop left early ends the workers now. Not when the
        # iterator is collected: the error's traceback keeps it alive, and collected later, with the
        # traceback's reference cycle, its queues may be gone first; the workers never hear that they
        # are done, the loader's join waits 5 s for each and its SIGTERM (ignored here) leaves them
        # running until the process exits.
        shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator
        if shutdown is not None:
            shutdown()
        del batches


def image_loader(dataset, batch_size: int, num_workers: int, image_size: int = 0, *, pin_memory: bool = False,
                 local_processes: int = 1, **kwargs) -> DataLoader:
    """A DataLoader of decoded uint8 images; with workers, as many as /dev/shm holds batches of
    ``image_size`` px for, each deaf to the stop signals. Iterate it through ``decoded``."""
    if num_workers and image_size:
        num_workers = shm_workers(num_workers, batch_size * image_size * image_size * 3, local_processes)
    if num_workers and not _exit_handler:
        atexit.register(_kill_workers_at_exit)
        _exit_handler.append(True)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, worker_init_fn=ignore_stop_signals if num_workers else None,
                      **kwargs)
