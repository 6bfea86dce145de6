"""Prepare images once for training: decode, crop and resize them into random-access ArrayRecord files.

    python -m diffusion_jax.prepare_data --source=folder:PATH --image_size=256 --out=DIR
        [--channels=3] [--split=train] [--images_per_shard=10000] [--threads=N]
    python -m diffusion_jax.prepare_data --source=tfds:NAME[/CONFIG][:SPLIT] [--data_dir=DIR] ...

Every image of the source is decoded, centre-cropped and resized once, as the DDPM code's data
(``diffusion_jax.image_files``), and written as one record of ArrayRecord shards that grain (or
``array_record``'s reader) reads in any order. ``DIR`` may be local or a URL (``gs://...``).

**Files.** ``DIR/{split}.array_record-{i:05d}-of-{n:05d}``: the shards, ``--images_per_shard``
records each (the last one fewer), in the source's order (a folder's sorted paths) without the
skipped files; ``DIR/{split}.json``: what the shards hold (``records.read_metadata``), written last::

    {"format": 1, "source": "folder:...", "split": "train", "image_size": S, "channels": C,
     "num_examples": N, "classes": [names; empty without classes], "shards": [file names],
     "num_skipped": k, "skipped": [{"path": ..., "error": ...}, ...], "preprocessing": "..."}

**Records** (format 1, defined in ``diffusion_jax.records``, which reads them back): a
little-endian int32 label (-1 when the source has no classes) followed by the image's S * S * C
bytes, uint8 in row-major [S, S, C] order.

**Whole or absent.** Shards are written under temporary names (``....tmp-PID``; for a URL, to a
local temporary file first, since ArrayRecord writes local files only) and take their final
names when all are written, before the JSON, which is the mark of a finished run: a failed run
removes its temporaries, and a killed one leaves only names that do not look finished, which the
next run on ``DIR`` removes (so: one run at a time per ``DIR`` and split). An existing
``{split}.json`` is never overwritten.

**Unreadable files** (corrupt, truncated, not images) are skipped: each is printed on stderr,
listed in the JSON and counted in the summary line. An unknown ``--source`` is status 2; a missing
folder, a folder without images, or a source with no readable image is status 6.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Generator, Iterable
from typing import NamedTuple

import numpy as np

from diffusion_jax import errors, image_files, input_pipeline, progress, records, storage
from diffusion_jax.errors import ConfigError, DataError

# ---- sources: each kind of --source=KIND:VALUE is a function listed in SOURCES


class Example(NamedTuple):
    """One example of a source: ``image`` uint8 [S, S, C], or None with ``error`` set if unreadable;
    ``name`` (a path) for the list of skipped files."""

    image: np.ndarray | None
    label: int
    name: str
    error: str = ""


class Reading(NamedTuple):
    """What a reader of :data:`SOURCES` returns: the class names (empty without classes), how many
    examples it will yield (for the progress line), and the examples in a deterministic order."""

    classes: tuple[str, ...]
    total: int
    examples: Generator[Example]  # closed when the run ends, so that its threads stop


def in_order(function: Callable, items: Iterable, threads: int) -> Generator:
    """``map(function, items)`` computed by ``threads`` threads, in the items' order, with a bounded
    number in flight (PIL releases the GIL while it decodes and resizes)."""
    window = 4 * threads
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="prepare_data")
    pending = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _folder_examples(value: str, *, split: str, image_size: int, channels: int, threads: int,
                     data_dir=None) -> Reading:
    """``folder:PATH``: the images of a folder (``image_files.list_folder``), in sorted order; ``split``
    is only the output's name."""
    del split, data_dir
    folder = image_files.list_folder(value)

    def read(index: int) -> Example:
        path, label = folder.paths[index], int(folder.labels[index])
        try:
            return Example(image_files.read_image(path, image_size, channels), label, path)
        except image_files.UnreadableImageError as e:
            return Example(None, label, path, e.reason)

    return Reading(folder.classes, len(folder.paths), in_order(read, range(len(folder.paths)), threads))


def _tfds_examples(value: str, *, split: str, image_size: int, channels: int, threads: int,
                   data_dir=None) -> Reading:
    """``tfds:NAME[/CONFIG][:SPLIT]``: a prepared tfds dataset's image feature (and class label), in its
    order, cropped and resized as training reads it (``input_pipeline.tfds_examples``); ``:SPLIT``
    (default: ``split``) is the split read."""
    del threads  # tf.data decodes in its own threads
    source = input_pipeline.parse(f"tfds:{value}")
    tfds_split = source.split or split
    builder = input_pipeline.tfds_builder(source.value, data_dir)
    input_pipeline.check_split(builder, source.value, tfds_split)

    def examples():
        index = 0
        for images, labels in input_pipeline.tfds_examples(builder, source.value, tfds_split, image_size,
                                                           channels):
            for image, label in zip(images, labels, strict=True):
                yield Example(image, int(label), f"{source.value}:{tfds_split}[{index}]")
                index += 1

    return Reading(input_pipeline.tfds_classes(builder), builder.info.splits[tfds_split].num_examples,
                   examples())


# KIND -> reader(VALUE, *, split, image_size, channels, threads, data_dir) -> Reading. New kinds of
# --source go here.
SOURCES: dict[str, Callable[..., Reading]] = {
    "folder": _folder_examples,
    "tfds": _tfds_examples,
}


def parse_source(source: str) -> tuple[str, str]:
    """``KIND:VALUE`` as (kind, value); a ConfigError listing the kinds of :data:`SOURCES` otherwise."""
    kind, colon, value = source.partition(":")
    if not colon or kind not in SOURCES or not value:
        raise ConfigError(f"--source={source}: expected KIND:VALUE with KIND one of "
                          f"{', '.join(k + ':' for k in SOURCES)} (e.g. --source=folder:PATH/TO/IMAGES)")
    return kind, value


# ---- writing the shards


def _remote(directory) -> bool:
    """Whether ``directory`` is a URL, which ArrayRecord cannot write to."""
    return "://" in os.fspath(directory)


def _leftovers(directory, split: str) -> list:
    """The shards of an unfinished run on ``split`` (finished or temporary names): there is no JSON."""
    return sorted(p for p in directory.glob(f"{split}.*") if records.is_shard(split, p.name))


class ShardWriter:
    """Records into shards of ``per_shard`` under temporary names; :meth:`finish` gives them their final
    names, :meth:`abort` removes them."""

    def __init__(self, directory, split: str, per_shard: int):
        self.directory, self.split, self.per_shard = directory, split, per_shard
        self.written: list = []  # finished shards, under their temporary names
        self._writer = self._temporary = self._local = None
        self._count = 0

    def write(self, record: bytes) -> None:
        if self._writer is None:
            self._open()
        self._writer.write(record)
        self._count += 1
        if self._count == self.per_shard:
            self._close()

    def _open(self) -> None:
        from array_record.python import array_record_module

        index = len(self.written)
        self._temporary = self.directory / f"{records.shard_stem(self.split, index)}.tmp-{os.getpid()}"
        if _remote(self.directory):
            handle, self._local = tempfile.mkstemp(suffix=".array_record", prefix="prepare_data-")
            os.close(handle)
        else:
            self._local = os.fspath(self._temporary)
        self._writer = array_record_module.ArrayRecordWriter(self._local, records.WRITER_OPTIONS)
        self._count = 0

    def _close(self) -> None:
        self._writer.close()
        self._writer = None
        if _remote(self.directory):
            with open(self._local, "rb") as source, self._temporary.open("wb") as destination:
                shutil.copyfileobj(source, destination, 1 << 24)
            os.unlink(self._local)
        self._local = None
        self.written.append(self._temporary)

    def finish(self) -> list[str]:
        """Close the last shard and rename all to ``shard_name(split, i, n)``; their names."""
        if self._writer is not None:
            self._close()
        count = len(self.written)
        names = [records.shard_name(self.split, i, count) for i in range(count)]
        for temporary, name in zip(self.written, names, strict=True):
            temporary.replace(self.directory / name)
        return names

    def abort(self) -> None:
        """Remove every file written so far (after a failure: nothing of the run is left)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):  # the failure being handled is the one to report
                self._writer.close()
        if self._local is not None and os.path.exists(self._local):
            os.unlink(self._local)
        for temporary in self.written + [self._temporary]:
            if temporary is not None and temporary.exists():
                temporary.unlink()


# ---- the run


def _check_arguments(image_size: int, channels: int, images_per_shard: int, threads: int, split: str) -> None:
    if image_size < 1:
        raise ConfigError(f"--image_size must be positive, got {image_size}")
    if channels not in (1, 3):
        raise ConfigError(f"--channels must be 1 (grey) or 3 (RGB), got {channels}")
    if images_per_shard < 1:
        raise ConfigError(f"--images_per_shard must be positive, got {images_per_shard}")
    if threads < 1:
        raise ConfigError(f"--threads must be positive, got {threads}")
    if not split or "/" in split or split.startswith("."):
        raise ConfigError(f"--split must be a plain name (it names the files), got {split!r}")


def _write_examples(examples: Generator[Example], writer: ShardWriter, total: int, label: str):
    """Write the readable examples; (how many, the skipped as JSON entries), printing each skip and the
    progress."""
    show, count, skipped = progress.Progress(label), 0, []
    show(0, total)
    with contextlib.closing(examples):  # a generator's threads stop here, whatever happens
        for done, example in enumerate(examples, 1):
            if example.image is None:
                skipped.append({"path": example.name, "error": example.error})
                print(f"skipped {example.name}: {example.error}", file=sys.stderr, flush=True)
            else:
                writer.write(records.encode_example(example.image, example.label))
                count += 1
            show(done, total)
    return count, skipped


def prepare(source: str, out: str, *, image_size: int, channels: int = 3, split: str = "train",
            images_per_shard: int = 10000, threads: int | None = None, data_dir=None) -> dict:
    """Write ``source``'s images as the prepared split ``split`` in ``out``; its metadata (the JSON).

    The source is listed before anything is written, so that a bad one leaves ``out`` untouched.
    """
    threads = threads or min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default: reads wait on I/O
    _check_arguments(image_size, channels, images_per_shard, threads, split)
    kind, value = parse_source(source)
    directory = storage.path(out, what="--out")
    storage.check_reachable(directory, what="--out")
    metadata_file = records.metadata_path(out, split)
    if metadata_file.exists():
        raise ConfigError(f"{metadata_file} exists: {directory} already holds a prepared {split!r} split; "
                          "choose another --out or --split, or delete its files first")
    data = SOURCES[kind](value, split=split, image_size=image_size, channels=channels, threads=threads,
                         data_dir=data_dir)
    storage.check_writable(directory, what="--out")
    leftovers = _leftovers(directory, split)
    for p in leftovers:
        p.unlink()
    if leftovers:
        print(f"removed {len(leftovers)} shard files of an unfinished run (no {metadata_file.name}) from "
              f"{directory}", flush=True)
    writer = ShardWriter(directory, split, images_per_shard)
    try:
        count, skipped = _write_examples(data.examples, writer, data.total, f"preparing {split}")
        if not count:
            raise DataError(f"no readable images in {source}: all {len(skipped)} files were unreadable "
                            "(listed above)")
        shards = writer.finish()
    except BaseException:
        writer.abort()
        raise
    metadata = {
        "format": records.FORMAT, "source": source, "split": split, "image_size": image_size,
        "channels": channels, "num_examples": count, "classes": list(data.classes), "shards": shards,
        "num_skipped": len(skipped), "skipped": skipped, "preprocessing": image_files.PREPROCESSING,
    }
    storage.write_json(metadata_file, metadata)
    return metadata


def summary(metadata: dict, out: str) -> str:
    """The last line of a run: what was written where, and how many files were skipped."""
    size, count, shards = metadata["image_size"], metadata["num_examples"], len(metadata["shards"])
    line = (f"wrote {count} images of {size}x{size} in {shards} shard{'s' * (shards != 1)} to {out}")
    if metadata["num_skipped"]:
        json_file = storage.path(out) / f"{metadata['split']}.json"
        line += f"; skipped {metadata['num_skipped']} unreadable files (listed in {json_file})"
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True,
                        help="folder:PATH (local or gs://...) or tfds:NAME[/CONFIG][:SPLIT]")
    parser.add_argument("--out", required=True, help="directory for the shards and SPLIT.json")
    parser.add_argument("--image_size", type=int, required=True, help="side S of the square images")
    parser.add_argument("--channels", type=int, default=3, help="3 (RGB, default) or 1 (grey)")
    parser.add_argument("--split", default="train", help="name of the split written (default train)")
    parser.add_argument("--images_per_shard", type=int, default=10000,
                        help="records per shard (default 10000)")
    parser.add_argument("--data_dir", default=None, help="tfds sources: tfds's data directory")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads reading and decoding (default: the CPUs + 4, at most 32)")
    args = parser.parse_args(argv)
    try:
        metadata = prepare(args.source, args.out, image_size=args.image_size, channels=args.channels,
                           split=args.split, images_per_shard=args.images_per_shard, threads=args.threads,
                           data_dir=args.data_dir)
    except errors.Error as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    print(summary(metadata, os.fspath(storage.path(args.out))))
    return 0


if __name__ == "__main__":
    import jax

    # the progress line asks JAX for the process index, which starts a backend: the CPU's, so that a
    # TPU or GPU host keeps its accelerators for training
    jax.config.update("jax_platforms", "cpu")
    sys.exit(main())
