"""Prepared datasets: images decoded, cropped and resized once, in random-access ArrayRecord files.

``python -m diffusion_jax.prepare_data`` writes, for a split, the shards
``DIR/{split}.array_record-{i:05d}-of-{n:05d}`` and last ``DIR/{split}.json``: the format, the
source, ``image_size``, ``channels``, ``num_examples``, the ``classes``, the shard names in
order and the files that were skipped. A record is one example: its label as a little-endian
int32 (-1 without classes) followed by the uint8 image [S, S, C] in C order. Records are stored
one per group (``group_size:1``), as grain's random access needs.
"""

from __future__ import annotations

import re
import struct

import numpy as np

from diffusion_jax import storage
from diffusion_jax.errors import DataError

FORMAT = 1
WRITER_OPTIONS = "group_size:1"
_LABEL = struct.Struct("<i")


def _shard_prefix(split: str) -> str:
    return f"{split}.array_record-"


def shard_stem(split: str, index: int) -> str:
    """The name of shard ``index`` of ``split`` without its count: a temporary name's start."""
    return f"{_shard_prefix(split)}{index:05d}"


def shard_name(split: str, index: int, count: int) -> str:
    return f"{shard_stem(split, index)}-of-{count:05d}"


def is_shard(split: str, name: str) -> bool:
    """Whether ``name`` is a shard of ``split``: finished (:func:`shard_name`) or temporary
    (:func:`shard_stem` and ``.tmp-PID``)."""
    prefix = _shard_prefix(split)
    tail = name[len(prefix):] if name.startswith(prefix) else ""
    return re.fullmatch(r"\d{5}(-of-\d{5}|\.tmp-\d+)", tail) is not None


def metadata_path(directory: str, split: str):
    return storage.path(directory, what="prepared dataset") / f"{split}.json"


def encode_example(image: np.ndarray, label: int) -> bytes:
    """One record: the label, then the image's bytes."""
    return _LABEL.pack(int(label)) + np.ascontiguousarray(image, np.uint8).tobytes()


def decode_example(record: bytes, image_size: int, channels: int) -> tuple[np.ndarray, int]:
    """(uint8 image [S, S, C], label) of a record of :func:`encode_example`."""
    expected = _LABEL.size + image_size * image_size * channels
    if len(record) != expected:
        raise DataError(f"a record of {len(record)} bytes is not a {image_size}x{image_size}x{channels} "
                        f"example ({expected} bytes): the metadata and the shards disagree; prepare the "
                        "data again")
    label = _LABEL.unpack_from(record)[0]
    image = np.frombuffer(record, np.uint8, offset=_LABEL.size).reshape(image_size, image_size, channels)
    return image, label


def read_metadata(directory: str, split: str) -> dict:
    """``DIR/{split}.json``, with a DataError naming the file and the fix when it is missing or is not
    this format."""
    path = metadata_path(directory, split)
    fix = (f"prepare it with python -m diffusion_jax.prepare_data --source=... --out={directory} "
           f"--split={split}")
    if not path.exists():
        listed = sorted(p.name for p in path.parent.glob("*.json")) if path.parent.is_dir() else []
        have = f" (it has {', '.join(listed)})" if listed else ""
        raise DataError(f"{path}: no such file, so {directory} holds no prepared split {split!r}{have}; "
                        f"{fix}")
    metadata = storage.read_json(path)
    keys = ("format", "image_size", "channels", "num_examples", "classes", "shards")
    if not (isinstance(metadata, dict) and metadata.get("format") == FORMAT
            and all(k in metadata for k in keys)):
        raise DataError(f"{path} is not the metadata of a prepared dataset (format {FORMAT}); {fix}")
    return metadata


def shard_paths(directory: str, split: str, metadata: dict | None = None) -> list[str]:
    """The split's shard files, in order."""
    metadata = metadata or read_metadata(directory, split)
    base = storage.path(directory, what="prepared dataset")
    return [str(base / name) for name in metadata["shards"]]


def open_records(directory: str, split: str):
    """The split's records by global index (grain's ``ArrayRecordDataSource`` over its shards): ``len``
    and ``[i]`` -> bytes, each shard opened when first read. A shard missing or unreadable is a
    DataError naming it."""
    import grain

    metadata = read_metadata(directory, split)
    paths = shard_paths(directory, split, metadata)
    missing = [p for p in paths if not storage.path(p).exists()]
    if missing:
        raise DataError(f"{missing[0]} is missing ({len(missing)} of the {len(paths)} shards of "
                        f"{split!r}): copy the whole prepared directory, or prepare the data again")
    source = grain.sources.ArrayRecordDataSource(paths)
    if len(source) != metadata["num_examples"]:
        raise DataError(f"the shards of {split!r} in {directory} hold {len(source)} records, its metadata "
                        f"says {metadata['num_examples']}: prepare the data again")
    return source
