"""What a run prints on the console: one-line messages and progress lines with rate and ETA, from
process 0; what the libraries would print besides, in the debug log."""

from __future__ import annotations

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


def _demote(record: logging.LogRecord) -> bool:
    """A logging filter: Orbax's and asyncio's records (:func:`_noise`) to absl's DEBUG log."""
    if not _noise(record):
        return True
    trace = "".join(traceback.format_exception(*record.exc_info)) if record.exc_info else ""
    absl_logging.debug("%s: %s%s", record.name, record.getMessage(), "\n" + trace if trace else "")
    return False


def library_errors_to_debug_log() -> None:
    """From now to the process's exit, Orbax's and asyncio's error logs, and the exceptions that their
    background threads cannot raise ('Event loop is closed' once a failed save's loop is gone), go to
    absl's DEBUG log (``--verbosity=1`` shows them): a full disk made ~1,500 lines of them around the
    run's own one-line error, which says what failed. For the whole process, not a block: the tasks
    of a failed save live in the error that reports it and log 'Task exception was never retrieved'
    when they are collected, at the exit. The entry points call it once absl's handler is set."""
    previous_hook, debug, finalizing = sys.unraisablehook, absl_logging.debug, sys.is_finalizing

    def unraisable(raised) -> None:  # only names bound here: at the exit, the modules' are gone
        frame, from_asyncio = raised.exc_traceback, False
        while frame is not None and not from_asyncio:
            from_asyncio, frame = "/asyncio/" in frame.tb_frame.f_code.co_filename, frame.tb_next
        if not from_asyncio:
            previous_hook(raised)
        elif not finalizing():  # at the exit, not even the debug log can be written
            debug("unraisable in a background thread: %r", raised.exc_value)

    for handler in logging.getLogger().handlers:
        handler.addFilter(_demote)
    sys.unraisablehook = unraisable
