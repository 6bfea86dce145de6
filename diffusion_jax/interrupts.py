"""SIGINT and SIGTERM during a run: stop at once while nothing is unsaved, after a save once training.

Outside the training loop (loading data, restoring, compiling) a signal stops the run at once:
the handler raises ``Interrupted`` in the main thread, which unwinds through the ``finally``
blocks (the input thread, the workdir's lock) like any exception; JAX checks for signals while
XLA compiles, so this is prompt there too. In the loop (``Signals.deferring``) the first signal
asks the loop to save the step it is on and stop; a second stops at once. The entry points then
exit by the signal itself (``exit_by``), as a shell expects of an interrupted program (status
130 for SIGINT, 143 for SIGTERM): a scheduler restarts a preempted run, and
``train.py && sample.py`` does not go on.

With several processes SIGTERM is left to JAX, whose preemption notifier has every process
save the same step (``CheckpointManager.reached_preemption``), and SIGINT stops at once: a
save needs every process, and each would stop at a different step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Self


class Interrupted(BaseException):
    """A run stopped by the signal ``signum``; the message says what was saved. Like KeyboardInterrupt
    a BaseException, so that ``except Exception`` does not swallow it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class Signals:
    """The handlers of ``signums`` while the context is open (in the main thread; elsewhere a no-op)."""

    def __init__(self, signums=(signal.SIGINT, signal.SIGTERM)):
        self.signums, self.received, self.deferring, self._previous = tuple(signums), None, False, {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signums}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.deferring and self.received is None:
            self.received = signum
            print(f"{name}: saving after this step, then stopping ({name} again stops at once, without "
                  "saving)", flush=True)
            return
        self.received = signum
        raise Interrupted(signum, "stopped at once; nothing after the last checkpoint was saved")

    @property
    def requested(self) -> bool:
        """Whether a deferred signal asks the loop to save and stop."""
        return self.received is not None


def exit_by(signum: int) -> None:
    """End the process by ``signum`` with its default action: the status a shell or scheduler reads as
    'interrupted', without Python's shutdown (which waits for, or crashes in, abandoned compiles)."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # should kill return before another thread takes the signal: the same status
