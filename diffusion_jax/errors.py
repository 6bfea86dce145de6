"""The project's errors: problems of a run's inputs and surroundings, not of its code.

The entry points (train.py, sample.py, evaluate.py, the converters) print one of these as a
single line, ``error: <message>``, and exit with its kind's status; anything else that reaches
them is a bug and keeps its traceback. Each message names what is wrong (the config key, the
file, the directory) and what would fix it. The kinds subclass ValueError (RuntimeError for a
non-finite run), so that code catching those keeps working.
"""

import re


class Error(Exception):
    """Base of the project's errors; ``exit_status`` is the entry points' status for it."""

    exit_status = 1


class ConfigError(Error, ValueError):
    """A config value, command-line flag or argument that cannot be used."""

    exit_status = 2


class NonFiniteError(Error, RuntimeError):
    """The loss or a gradient became NaN or infinite."""

    exit_status = 3


class StorageError(Error, ValueError):
    """A directory or file that cannot be reached or written: scheme, permissions, disk full, sharing."""

    exit_status = 4


class CheckpointError(Error, ValueError):
    """A checkpoint that is missing, unreadable, or of another run."""

    exit_status = 5


class DataError(Error, ValueError):
    """A dataset, weights, statistics or samples file that is missing or not what was expected."""

    exit_status = 6


# what TensorStore appends to its messages: the store's whole JSON spec, its C++ source lines
_TENSORSTORE_ANNOTATIONS = re.compile(r" \[(?:tensorstore_spec|source locations)\b.*$")


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message ('' if it has none), without TensorStore's annotations:
    a library's error, quoted in ours."""
    lines = str(error).strip().splitlines()
    return _TENSORSTORE_ANNOTATIONS.sub("", lines[0]) if lines else ""


def described(error: BaseException) -> str:
    """``Type: first line of the message`` of a library's error, for a message of ours: of the
    error it was raised from, if any (``__cause__``, to the first), which says what went wrong;
    Orbax's wrapper of a failed array read names only the index and quotes a bound method's repr."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {first_line(error)}"
