"""The one exception type that the entry scripts turn into a one-line message and a non-zero exit.

It sits below every package (models/, datasets/ and utils/ all raise it), so that imports point
one way: entry scripts -> utils/ -> models/, datasets/ -> this module.
"""


class UserError(Exception):
    """Something the user can fix (a path, a file, a flag); the message says what and how."""

    exit_code = 2


class Preempted(UserError):
    """SIGTERM or SIGUSR1 (a scheduler's preemption) stopped the run after saving; the message says
    how to resume. Exit status 143, as for a process ended by SIGTERM."""

    exit_code = 143


def one_line(exc: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker re-raised it with a traceback."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        return (last.split(": ", 1)[1] if ": " in last else last) or exc.__class__.__name__
    # A newline inside the message (a file name can hold one) is shown escaped, not as a line break.
    return text.replace("\r", "\\r").replace("\n", "\\n") if text else exc.__class__.__name__
