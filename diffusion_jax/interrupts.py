"""SIGINT and SIGTERM during a run: stop at once while nothing is unsaved, after a save once training.

While an entry point starts JAX and imports its modules (``stop_at_once``) a signal ends the
process at once with one line: nothing needs unwinding yet. Afterwards (``Signals``: loading
data, restoring, compiling) the handler raises ``Interrupted`` in the main thread, which unwinds
through the ``finally`` blocks (the input thread, the workdir's lock) like any exception; JAX
checks for signals while XLA compiles, so this is prompt there too. Two places cannot take the
exception: a garbage-collector callback or a ``__del__`` (JAX runs one at every collection),
where Python reports it as "Exception ignored" and goes on, and an import, where a C extension's
initialisation aborts the interpreter on it. From the first the exception is caught by
``sys.unraisablehook``, in the second the handler does not raise: either way ``Signals`` sends
the signal to the main thread again a moment later, until it is raised in ordinary code. In the
training loop (``Signals.deferring``) the first signal asks the loop to save the step it is on
and stop; a second stops at once. The entry points then exit by the signal itself (``exit_by``),
as a shell expects of an interrupted program (status 130 for SIGINT, 143 for SIGTERM): a
scheduler restarts a preempted run, and ``train.py && sample.py`` does not go on.

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

AGAIN_SECONDS = 0.05  # from a swallowed Interrupted to its signal's delivery again (Signals._again)


class Interrupted(BaseException):
    """A run stopped by the signal ``signum``; the message says what was saved. Like KeyboardInterrupt
    a BaseException, so that ``except Exception`` does not swallow it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def stop_at_once(signums=(signal.SIGINT, signal.SIGTERM)) -> None:
    """From now on each of ``signums`` ends the process at once by that signal, with one line on stderr:
    for an entry point's start, before anything is written that an exit would leave half-done."""
    for signum in signums:
        signal.signal(signum, _exit_at_once)


def _exit_at_once(signum, frame) -> None:
    print(f"interrupted by {signal.Signals(signum).name}: stopped at once", file=sys.stderr)
    exit_by(signum)


class Signals:
    """The handlers of ``signums`` while the context is open (in the main thread; elsewhere a no-op),
    and the delivery again of an ``Interrupted`` that Python had to swallow (see the module's text).
    ``at_once``: what an ``Interrupted`` raised at once says was saved."""

    def __init__(self, signums=(signal.SIGINT, signal.SIGTERM),
                 at_once: str = "stopped at once; nothing after the last checkpoint was saved"):
        self.signums, self.received, self.deferring, self._previous = tuple(signums), None, False, {}
        self.at_once = at_once
        self._previous_hook, self._in_hook = None, False

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signums}
            self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if self._previous_hook is not None:
            sys.unraisablehook, self._previous_hook = self._previous_hook, None
        self._previous = {}

    def _unraisable(self, unraisable) -> None:
        """``sys.unraisablehook``: an ``Interrupted`` raised where Python could not propagate it (a
        garbage-collector callback, a ``__del__``) is delivered again; anything else goes to the
        previous hook."""
        stopped = unraisable.exc_value
        if isinstance(stopped, Interrupted) and stopped.signum in self._previous:
            self._in_hook = True
            try:
                self._again(stopped.signum)
            finally:
                self._in_hook = False
        else:
            self._previous_hook(unraisable)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.deferring and self.received is None:
            self.received = signum
            print(f"{name}: saving after this step, then stopping ({name} again stops at once, without "
                  "saving)", flush=True)
            return
        self.received = signum
        if self._in_hook or _importing(frame):  # lost for good, or a C extension's import aborted
            self._again(signum)
            return
        raise Interrupted(signum, self.at_once)

    @staticmethod
    def _again(signum: int) -> None:
        """``signum`` sent to the main thread again ``AGAIN_SECONDS`` from now, by another thread: until
        the main thread has left the callback that swallowed it or the import it was in."""
        again = threading.Timer(AGAIN_SECONDS, signal.pthread_kill, (threading.main_thread().ident, signum))
        again.daemon = True
        again.start()

    @property
    def requested(self) -> bool:
        """Whether a deferred signal asks the loop to save and stop."""
        return self.received is not None


def _importing(frame) -> bool:
    """Whether ``frame`` runs inside an import: a module's code, or Python called by a C extension's
    initialisation, which aborts the interpreter on an exception it did not expect (jaxlib's does)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def exit_by(signum: int) -> None:
    """End the process by ``signum`` with its default action: the status a shell or scheduler reads as
    'interrupted', without Python's shutdown (which waits for, or crashes in, abandoned compiles)."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # should kill return before another thread takes the signal: the same status
