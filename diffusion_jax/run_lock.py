"""One run per directory (a training run's workdir, sample.py's --out): an owner file that a
second run finds and refuses.

``WORKDIR/run.lock`` holds JSON: host, pid, a random run id, the start time and the time it
was last refreshed. Process 0 creates it before the run writes anything else: on local and
network filesystems with ``O_CREAT | O_EXCL``, which only one creator can win; on object
stores (gs://), which have no exclusive create, by writing it and reading it back after
``SETTLE_SECONDS``, so that of two runs starting together the later writer wins and the other
sees a foreign id and stops. The owner refreshes it after a step at most every ``REFRESH_SECONDS``,
checks it before every checkpoint, and removes it when the run ends, however it ends.

A lock whose owner is provably gone (on this host, no process of its pid: a crash, kill -9, a
restarted VM) is taken over at once, with a message, so that a restart loop resumes the run. One
of another host that was not refreshed for ``STALE_AFTER_SECONDS`` is stale, but its run may
live behind a network partition: a new run stops naming the owner, as for a live one, and takes
it over only with ``take_over``.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from diffusion_jax import storage
from diffusion_jax.errors import StorageError

LOCK_FILE = "run.lock"
STALE_AFTER_SECONDS = 30 * 60  # longer than any gap between refreshes: compiling, an evaluation, a save
REFRESH_SECONDS = 60.0  # the training loop refreshes the lock after a step at most this often
SETTLE_SECONDS = 2.0


def _owner_text(owner: dict) -> str:
    age = time.time() - owner.get("refreshed", 0)
    return (f"run {owner.get('run_id')} of host {owner.get('host')}, pid {owner.get('pid')}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner.get('started', 0)))}, "
            f"last seen {age:.0f} s ago")


def is_gone(owner: dict) -> bool:
    """Whether ``owner`` ran on this host and its process no longer exists."""
    if owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):  # alive, another user's; or no pid to ask
        return False
    return False


def is_stale(owner: dict, now: float | None = None) -> bool:
    """Whether ``owner`` stopped refreshing the lock ``STALE_AFTER_SECONDS`` ago."""
    return (time.time() if now is None else now) - owner.get("refreshed", 0) > STALE_AFTER_SECONDS


class RunLock:
    """``DIRECTORY/run.lock``, held by this process for the run (create it on process 0 only);
    ``flag`` names the directory in the messages (``--workdir``, ``--out``)."""

    def __init__(self, directory: epath.Path, *, take_over: bool = False, flag: str = "--workdir"):
        self.path, self.flag = directory / LOCK_FILE, flag
        now = time.time()
        self.owner = dict(host=socket.gethostname(), pid=os.getpid(), run_id=secrets.token_hex(8),
                          started=now, refreshed=now)
        self._acquire(take_over)

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign file: nobody's lock that can be refreshed
            return {}

    def _create(self) -> bool:
        """Write the lock if there is none; False if another run's is there."""
        data = json.dumps(self.owner)
        if "://" not in os.fspath(self.path):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(data)
            return True
        if self._read() is not None:
            return False
        self.path.write_text(data)
        time.sleep(SETTLE_SECONDS)  # a run that wrote at the same time: the last writer's lock stands
        return (self._read() or {}).get("run_id") == self.owner["run_id"]

    def _acquire(self, take_over: bool) -> None:
        if self._create():
            return
        owner = self._read() or {}
        if not owner:  # empty or not JSON: nobody to wait for, nothing to say of its age
            if not take_over:
                raise StorageError(f"{self.path} names no run: it is empty or damaged (a run killed while "
                                   f"writing it?); if no run uses this {self.flag} directory, add "
                                   "--take_over_lock")
            print(f"taking over {self.path}, which names no run", flush=True)
            storage.write_bytes(self.path, json.dumps(self.owner).encode())
            return
        gone, stale = is_gone(owner), is_stale(owner)
        if not (gone or stale and take_over):
            advice = (f"it was not refreshed for {STALE_AFTER_SECONDS // 60} minutes: if that run is gone, "
                      "add --take_over_lock" if stale else f"wait for it to end, or use another {self.flag}")
            raise StorageError(f"{self.path.parent} is in use by {_owner_text(owner)}; {advice}")
        print(f"taking over the lock of {_owner_text(owner)}, which is "
              f"{'gone' if gone else 'stale'}", flush=True)
        storage.write_bytes(self.path, json.dumps(self.owner).encode())

    def refresh(self, every: float = 0.0) -> None:
        """Renew the lock (if it is ``every`` seconds old); a StorageError if another run has taken it
        over."""
        if time.time() - self.owner["refreshed"] < every:
            return
        current = self._read()
        if not current or current.get("run_id") != self.owner["run_id"]:
            raise StorageError(f"{self.path.parent} was taken over by "
                               f"{_owner_text(current) if current else 'nobody (its lock was removed)'}; "
                               "this run stops without writing more")
        self.owner["refreshed"] = time.time()
        storage.write_bytes(self.path, json.dumps(self.owner).encode())

    def release(self) -> None:
        """Remove the lock if it is still this run's."""
        current = self._read()
        if current and current.get("run_id") == self.owner["run_id"]:
            self.path.unlink()


def take(directory: epath.Path, *, take_over: bool = False, flag: str = "--workdir") -> RunLock | None:
    """Process 0 takes ``directory``'s lock (its RunLock; None on the other processes); every process
    stops with a StorageError if it cannot."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = RunLock(directory, take_over=take_over, flag=flag)
        except StorageError as e:
            error = e
    if jax.process_count() > 1 and not multihost_utils.broadcast_one_to_all(np.int32(error is None)):
        error = error or StorageError(f"process 0 could not take the lock of {directory} "
                                      "(its message says why)")
    if error is not None:
        raise error
    return lock
