"""The one exception type that the entry scripts turn into a one-line message and a non-zero exit.

It sits below every package (all of them raise it), so that imports point one way: entry scripts ->
engine/ -> ... -> utils/ -> this module (docs/EXTENDING.md, "Layout").
"""
import re


class UserError(Exception):
    """Something the user can fix (a path, a file, a flag); the message says what and how."""

    exit_code = 2


class Preempted(UserError):
    """SIGTERM or SIGUSR1 (a scheduler's preemption) stopped the run after saving; the message says
    how to resume. Exit status 143, as for a process ended by SIGTERM."""

    exit_code = 143


LONG_WORD = 200  # characters of one path or value in a message, beyond which its middle is left out


def one_line(exc: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker re-raised it with a traceback;
    a path or value longer than LONG_WORD characters is shortened in its middle, so the line stays
    readable (a 100,000-character path would make a 100 KB line)."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = (last.split(": ", 1)[1] if ": " in last else last) or exc.__class__.__name__
    # A newline inside the message (a file name can hold one) is shown escaped, not as a line break.
    text = text.replace("\r", "\\r").replace("\n", "\\n") if text else exc.__class__.__name__
    return re.sub(r"\S{%d,}" % (LONG_WORD + 1), _shortened, text)


def _shortened(match) -> str:
    word = match.group(0)
    return f"{word[:80]}...({len(word) - 160} characters)...{word[-80:]}"


def load_refusal(exc: BaseException) -> str:
    """The line of a ``torch.load(weights_only=True)`` error that says what the file holds: the global
    it asks for where it names one (torch's first line advises loading with ``weights_only=False``,
    which this code never does), else its first line that is not blank, else the error's class."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line), lines[0] if lines else exc.__class__.__name__)
