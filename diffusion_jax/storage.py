"""The project's files on any filesystem etils.epath opens: local paths, gs:// (and s3://, az://, hf://).

Every path a user gives (workdir, checkpoints, samples and shards, metrics, grids, FID
statistics, Inception weights, converted checkpoints, figures) goes through :func:`path`, so
that ``gs://bucket/run`` is a bucket on every host of a pod, not ``./gs:/bucket/run`` on one
host's disk; files are read and written with epath, as Orbax does. Checkpoints are Orbax's,
whose arrays TensorStore writes to local paths and gs:// only (:func:`checkpoint_path`).

Files written here are whole or absent: each goes to a temporary name first and is then
renamed (on object stores the rename is a copy, which is atomic per object).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import zipfile

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from diffusion_jax.errors import DataError, StorageError

URL_SCHEMES = ("gs", "s3", "az", "hf")  # the URLs epath opens
CHECKPOINT_SCHEMES = ("gs",)  # the URLs Orbax's TensorStore writes arrays to (besides local paths)


def path(value, *, what: str = "path") -> epath.Path:
    """``value`` (a str or path) as an ``epath.Path``: a URL as it is, a local path made absolute.

    A URL whose scheme epath cannot open is a StorageError naming ``what`` it was.
    """
    text = os.fspath(value)
    scheme, separator, _ = text.partition("://")
    if not separator:
        return epath.Path(text).expanduser().resolve()
    if scheme not in URL_SCHEMES:
        raise StorageError(f"{what} {text}: {scheme}:// is not a filesystem this program can open; use a "
                           f"local path or one of {', '.join(s + '://' for s in URL_SCHEMES)}")
    return epath.Path(text)


def checkpoint_path(value, *, what: str = "workdir") -> epath.Path:
    """:func:`path` of a directory that holds Orbax checkpoints: a local path or gs://."""
    result = path(value, what=what)
    scheme = os.fspath(result).partition("://")[0]
    if "://" in os.fspath(result) and scheme not in CHECKPOINT_SCHEMES:
        raise StorageError(f"{what} {result}: Orbax checkpoints are written to local paths and gs:// only, "
                           f"not {scheme}://; use a bucket on gs:// or a filesystem mounted on every host")
    return result


def check_reachable(directory: epath.Path, *, what: str = "path") -> None:
    """Ask ``directory``'s filesystem once whether it exists, so that a missing client library
    (gcsfs, TensorFlow's gfile), missing credentials or a file in its place fail here, before
    anything is written, as a StorageError naming the path and the cause."""
    try:
        is_file = directory.exists() and not directory.is_dir()
    except Exception as e:  # each filesystem raises its own kinds; the message names the cause
        raise StorageError(f"cannot open {what} {directory}: {type(e).__name__}: {e}") from e
    if is_file:
        raise StorageError(f"{what} {directory} is a file, not a directory")


def check_writable(directory: epath.Path, *, what: str = "path") -> None:
    """Make ``directory`` (local paths; object stores have no directories) and write and remove a file
    there, so that a read-only or full filesystem or missing permissions fail here, before anything
    else is written, as a StorageError naming the directory and the cause."""
    probe = directory / f".write-check-{secrets.token_hex(8)}"
    try:
        if "://" not in os.fspath(directory):
            directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except Exception as e:  # each filesystem raises its own kinds; the message names the cause
        raise StorageError(f"cannot write to {what} {directory}: {type(e).__name__}: {e}") from e


def write_bytes(destination: epath.Path, data: bytes) -> None:
    """``destination`` with ``data``, written whole or not at all (a temporary name, then a rename).

    Local parent directories are made as needed; object stores (URLs) have none to make."""
    if "://" not in os.fspath(destination):
        destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f"{destination.name}.tmp-{os.getpid()}")
    temporary.write_bytes(data)
    temporary.replace(destination)


def remove_temporaries(directory: epath.Path) -> list[epath.Path]:
    """Delete the temporary files that ``write_bytes`` leaves in ``directory`` when its process is
    killed while writing (``NAME.tmp-PID``); they are never read."""
    removed = [p for p in directory.glob("*.tmp-*") if p.is_file()] if directory.is_dir() else []
    for p in removed:
        p.unlink()
    return removed


def save_npz(destination: epath.Path, *args, **arrays) -> None:
    """``np.savez(destination, *args, **arrays)``, written whole or not at all."""
    buffer = io.BytesIO()
    np.savez(buffer, *args, **arrays)
    write_bytes(destination, buffer.getvalue())


def load_npz(source: epath.Path) -> dict[str, np.ndarray]:
    """Every array of the .npz ``source``, read at once (no pickled objects)."""
    try:
        data = source.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"{source}: no such file") from e
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            return {name: f[name] for name in f.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{source} is not an .npz file of arrays (as numpy.savez writes): "
                        f"{type(e).__name__}: {e}") from e


def write_json(destination: epath.Path, value) -> None:
    write_bytes(destination, json.dumps(value, indent=1).encode())


def read_json(source: epath.Path):
    try:
        return json.loads(source.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise DataError(f"{source} is not a JSON file: {e}") from e


def check_shared(directory: epath.Path) -> None:
    """In a multi-process run, a StorageError on every process unless all of them see ``directory``
    as process 0 does: process 0 writes a marker there, every process looks for it, and the
    answers are gathered so that all stop together rather than some waiting for the others."""
    if jax.process_count() == 1:
        return
    token = int(multihost_utils.broadcast_one_to_all(np.int64(secrets.randbits(62))))
    marker = directory / f".shared-check-{token}"
    if jax.process_index() == 0:
        write_bytes(marker, str(token).encode())
    multihost_utils.sync_global_devices("storage.check_shared: marker written")
    try:
        seen = marker.exists() and marker.read_text() == str(token)
    except OSError:
        seen = False
    everyone = np.asarray(multihost_utils.process_allgather(np.bool_(seen)))
    if jax.process_index() == 0:
        marker.unlink()
    if not everyone.all():
        blind = ", ".join(str(i) for i in np.flatnonzero(~everyone))
        raise StorageError(f"{directory} is not shared between the processes: process(es) {blind} cannot "
                           "see a file that process 0 wrote there; give a directory every host reads and "
                           "writes (gs://bucket/... or a shared filesystem)")
