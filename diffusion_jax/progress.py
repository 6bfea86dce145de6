"""What a run prints on the console: one-line messages and progress lines with rate and ETA, from
process 0."""

from __future__ import annotations

import sys
import time

import jax


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
