"""What a run shows while it works: progress bars (live on a terminal, a line every 30 s in logs,
off on ranks other than 0) and the log lines printed between them."""
import logging
import sys

from tqdm import tqdm


def progress(iterable, desc: str, enabled: bool = True, **kwargs) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, disable=not enabled, mininterval=0.1 if interactive else 30.0,
                leave=kwargs.pop("leave", not interactive), dynamic_ncols=True, **kwargs)


log = logging.getLogger("dlsr")


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(is_main: bool) -> None:
    """Rank 0 logs INFO; other ranks only warnings and errors."""
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
