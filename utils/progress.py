"""Progress bars: live on a terminal, a line every 30 s in logs (CI, files), off on ranks other than 0."""
import sys

from tqdm import tqdm


def progress(iterable, desc: str, enabled: bool = True, **kwargs) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, disable=not enabled, mininterval=0.1 if interactive else 30.0,
                leave=kwargs.pop("leave", not interactive), dynamic_ncols=True, **kwargs)
