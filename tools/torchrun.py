"""torchrun, with the exit status of a stopped job: ``python -m tools.torchrun ARGS`` is ``torchrun ARGS``.

When a scheduler signals the whole process group (Slurm, Kubernetes), torchrun's agent forwards the
signal to the ranks, waits for them (they save and exit 143, docs/OPERATIONS.md) and then raises its
own ``SignalException``: plain torchrun ends with a traceback and status 1, which a scheduler reads as
a failure. Here that exception ends the launcher with one line and the status of a process stopped
by that signal (143 for SIGTERM), as the ranks' own. Every other outcome is torchrun's.
"""
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main as torchrun_main


def main(argv=None) -> None:
    try:
        torchrun_main(argv)
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        print(f"torchrun: {name} received; the ranks were asked to stop (each rank's last line says whether it "
              f"saved)", file=sys.stderr)
        sys.exit(128 + int(e.sigval))


if __name__ == "__main__":
    main()
