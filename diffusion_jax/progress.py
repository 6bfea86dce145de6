"""What a run prints on the console: one-line messages and progress lines with rate and ETA, from
process 0; what the libraries would print besides, in the debug log."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import traceback

import jax
from absl import logging as absl_logging


def console(message: str) -> None:
    """A line on the console, from process 0."""
    if jax.process_index() == 0:
        print(message, flush=True)


def duration(seconds: float) -> str:
    """``seconds`` as 1h02m03s (hours only when there are some)."""
    seconds = int(seconds)
    hours, minutes = divmod(seconds // 60, 60)
    return (f"{hours}h{minutes:02d}m" if hours else f"{minutes}m") + f"{seconds % 60:02d}s"


class Progress:
    """A progress line ``label: done/total`` with the rate and ETA measured from the first call's end on,
    so that the first batch's compilation stays out of them. On a terminal the line is rewritten in
    place at each call; in a log, a line every ``every`` seconds, and the first and the last."""

    def __init__(self, label: str, unit: str = "img", every: float = 30.0):
        self.label, self.unit, self.every, self._first, self._printed = (label, unit, every, None,
                                                                          -float("inf"))

    def __call__(self, done: int, total: int) -> None:
        if jax.process_index() != 0:
            return
        now, line, terminal = time.perf_counter(), f"{self.label}: {done}/{total}", sys.stdout.isatty()
        if not terminal and self._first is not None and done < total and now - self._printed < self.every:
            return
        self._printed = now
        if self._first is None:
            self._first = (now, done)
        elif done > self._first[1]:
            rate = (done - self._first[1]) / (now - self._first[0])
            line += f"  {rate:.2f} {self.unit}/s  ETA {duration((total - done) / rate)}"
        end = "\n" if done == total or not terminal else "\r"
        print(line.ljust(60), end=end, flush=True)


def _noise(record: logging.LogRecord) -> bool:
    """A log record of Orbax or asyncio above DEBUG: the traceback of each array of a failed
    asynchronous save, 'Future exception was never retrieved'."""
    return record.levelno > logging.DEBUG and (record.name == "asyncio" or "/orbax/" in record.pathname)


@contextlib.contextmanager
def library_errors_to_debug_log():
    """Orbax's and asyncio's error logs, and the exceptions that their background threads cannot
    raise ('Event loop is closed' once a failed save's loop is gone), go to absl's DEBUG log
    (``--verbosity=1`` shows them) while the block runs: a full disk made ~1,500 lines of them,
    around the run's own one-line error, which says what failed."""
    def demote(record: logging.LogRecord) -> bool:
        if not _noise(record):
            return True
        trace = "".join(traceback.format_exception(*record.exc_info)) if record.exc_info else ""
        absl_logging.debug("%s: %s%s", record.name, record.getMessage(), "\n" + trace if trace else "")
        return False

    previous_hook = sys.unraisablehook

    def unraisable(raised) -> None:
        frames = traceback.extract_tb(raised.exc_traceback) if raised.exc_traceback else []
        if isinstance(raised.exc_value, RuntimeError) and any("/asyncio/" in f.filename for f in frames):
            absl_logging.debug("unraisable in a background thread: %r", raised.exc_value)
        else:
            previous_hook(raised)

    handlers = logging.getLogger().handlers
    for handler in handlers:
        handler.addFilter(demote)
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for handler in handlers:
            handler.removeFilter(demote)
