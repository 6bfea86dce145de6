"""Training data: where the images come from (``config.data.name``) and the batch of each step.

Sources:

- ``digits``: scikit-learn's handwritten digits, embedded (the offline default);
- ``cifar10``, ``celeb_a_hq``, ``lsun_church``, ``lsun_bedroom``, ``lsun_cat``: the papers'
  datasets, short names of ``tfds:`` ones;
- ``tfds:NAME[/CONFIG][:SPLIT]``: any tfds dataset with an image feature, prepared beforehand as
  tfds prepares datasets; ``:SPLIT`` replaces the config's split;
- ``folder:PATH``: a tree of PNG, JPEG or WebP images, local or ``gs://``, classes from its
  first-level subfolders (``image_files``); one split, whatever its name;
- ``prepared:DIR``: the ArrayRecord shards of ``python -m diffusion_jax.prepare_data``.

Each process reads its share, a contiguous 1/P of the split, as (uint8 image [S, S, C], label)
pairs with label -1 where the source has no classes. The batch at a step is a pure function of
(seed, process index, step), so a run resumed at step s reads exactly the batches the
uninterrupted run would have read, with no iterator state to save. ``digits`` and ``tfds:`` are
read into host memory as uint8 and batched with NumPy: epochs are seeded permutations of the
process's examples and flips are seeded by the step (``make_batch``). ``folder:`` and
``prepared:`` are read image by image by grain, so host memory does not grow with the dataset:
its index shuffle (a seeded permutation per epoch, computed per index), a flip seeded by the
element's index, and batch s as element s of the batched dataset (``Streamed``). Either way
``batches(start)`` yields dicts of ``image`` (float32 NHWC in [-1, 1]) and ``label`` (int32),
prepared ahead in threads while the devices compute.

TensorFlow only decodes images here and is kept off the accelerators.
"""

from __future__ import annotations

import queue
import threading
from typing import NamedTuple

import numpy as np

from diffusion_jax import errors, host_tensorflow, image_files, image_io, records
from diffusion_jax.errors import ConfigError, DataError

# short name -> tfds name; "digits" is the embedded offline default
TFDS_DATASETS = {
    "cifar10": "cifar10",
    "celeb_a_hq": "celeb_a_hq/256",  # manual download: see configs/celebahq256.py
    "lsun_church": "lsun/church_outdoor",
    "lsun_bedroom": "lsun/bedroom",
    "lsun_cat": "lsun/cat",
}
DATASETS = ("digits",) + tuple(TFDS_DATASETS)
SOURCE_KINDS = ("tfds", "folder", "prepared")  # data.name = KIND:VALUE
ALLOWED = f"one of {', '.join(DATASETS)}, or tfds:NAME[/CONFIG][:SPLIT], folder:PATH, prepared:DIR"
STREAMED_KINDS = ("folder", "prepared")
# batches grain's threads prepare ahead, and the threads
_PREFETCH, _THREADS = 4, 2


class DatasetNotPreparedError(DataError):
    """A tfds dataset that is not on disk: what is missing and how to prepare it."""


class Source(NamedTuple):
    """``data.name`` parsed: ``kind`` one of digits, tfds, folder, prepared; ``value`` the tfds name,
    folder or directory; ``split`` the split it names, if any."""

    kind: str
    value: str
    split: str | None


def parse(name: str) -> Source:
    """``data.name`` as a :class:`Source`; a ConfigError naming what is allowed otherwise."""
    if name == "digits":
        return Source("digits", "", None)
    if name in TFDS_DATASETS:
        return Source("tfds", TFDS_DATASETS[name], None)
    kind, colon, value = name.partition(":")
    if not colon or kind not in SOURCE_KINDS or not value:
        raise ConfigError(f"unknown dataset {name!r}; allowed: {ALLOWED}")
    if kind == "tfds":
        value, _, split = value.partition(":")
        return Source(kind, value, split or None)
    return Source(kind, value, None)


def one_set(name: str) -> bool:
    """Whether the source is one set of images whatever split is asked for (a folder; a tfds name that
    names its split), so that its held-out images would be its training images."""
    source = parse(name)
    return source.kind == "folder" or source.split is not None


def digits(split: str) -> np.ndarray:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), as uint8 16x16x1.

    Upsampled by pixel repetition; ``train`` is the first 1,500 images, ``test`` the
    other 297 (held out for the quickstart's quality figure).
    """
    return _digits(split)[0]


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
    images = images.repeat(2, axis=1).repeat(2, axis=2)[..., None]
    labels = data.target.astype(np.int32)
    if split not in ("train", "test"):
        raise ConfigError(f"digits has splits 'train' and 'test', got {split!r}")
    part = slice(None, 1500) if split == "train" else slice(1500, None)
    return images[part], labels[part]


def _share(count: int, process_index: int, process_count: int) -> slice:
    """This process's contiguous share of ``count`` examples (NumPy's array_split)."""
    bounds = [len(part) for part in np.array_split(np.empty(count, np.int8), process_count)]
    start = sum(bounds[:process_index])
    return slice(start, start + bounds[process_index])


def _not_prepared(tfds_name: str, builder) -> DatasetNotPreparedError:
    return DatasetNotPreparedError(
        f"dataset {tfds_name!r} is not prepared in {builder.data_dir_root}. On a machine with network "
        f"access run: python -c \"import tensorflow_datasets as tfds; tfds.builder('{tfds_name}')"
        f".download_and_prepare()\" and copy the directory here, or pass --config.data.data_dir=DIR "
        "(datasets with manual downloads: see the config's docstring)")


def tfds_builder(tfds_name: str, data_dir=None, *, prepared: bool = True):
    """The tfds builder of ``tfds_name`` (NAME or NAME/CONFIG), with a DataError for an unknown name and,
    if ``prepared``, a DatasetNotPreparedError when its metadata is not on disk (nothing is ever
    downloaded here)."""
    tfds = host_tensorflow.tfds()
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
    except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
        raise DataError(f"tfds has no dataset {tfds_name!r} ({errors.first_line(e)})") from e
    if prepared and not builder.info.splits:  # no metadata on disk: never prepared here
        raise _not_prepared(tfds_name, builder)
    return builder


def tfds_features(builder) -> tuple[str, str | None]:
    """The keys of ``builder``'s image feature and of its class label (None without one)."""
    tfds = host_tensorflow.tfds()
    features = builder.info.features
    supervised = builder.info.supervised_keys
    images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    if supervised and len(supervised) == 2 and supervised[0] in images:
        images = [supervised[0]]
        labels = [supervised[1]] if supervised[1] in labels else labels
    if not images:
        raise DataError(f"tfds dataset {builder.name!r} has no image feature (its features: "
                        f"{', '.join(features)})")
    return images[0], (labels[0] if labels else None)


def tfds_classes(builder) -> tuple[str, ...]:
    """The names of ``builder``'s classes, empty without a class label."""
    label = tfds_features(builder)[1]
    return tuple(builder.info.features[label].names) if label else ()


def tfds_examples(builder, tfds_name: str, split: str, image_size: int, channels: int,
                  process_index: int = 0, process_count: int = 1):
    """Batches of (uint8 images [n, S, S, C], int32 labels [n]) of this process's share of a split of
    ``builder`` (:func:`tfds_builder` of ``tfds_name``), center-cropped and resized as the DDPM code's
    datasets (``image_files.center_crop_resize``'s rule)."""
    tf, tfds = host_tensorflow.tensorflow(), host_tensorflow.tfds()
    check_split(builder, tfds_name, split)
    image_key, label_key = tfds_features(builder)
    shard = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
    try:
        ds = builder.as_dataset(split=shard, shuffle_files=False)
    except AssertionError as e:  # tfds's "could not find data": never download here (no hanging retries)
        raise _not_prepared(tfds_name, builder) from e

    def prepare(example):  # center crop to a square, resize to image_size (as the DDPM code's datasets)
        image = example[image_key]
        side = tf.minimum(tf.shape(image)[0], tf.shape(image)[1])
        image = tf.image.resize_with_crop_or_pad(image, side, side)
        if image.shape[0] != image_size:
            image = tf.image.resize(image, (image_size, image_size), antialias=True)
        if image.shape[-1] != channels:
            image = tf.image.grayscale_to_rgb(image) if channels == 3 else tf.image.rgb_to_grayscale(image)
        image = tf.cast(tf.round(tf.clip_by_value(tf.cast(image, tf.float32), 0, 255)), tf.uint8)
        label = tf.cast(example[label_key], tf.int32) if label_key else tf.constant(-1, tf.int32)
        return image, label

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(1024)
    return tfds.as_numpy(ds)


def check_split(builder, tfds_name: str, split: str) -> None:
    """A DataError naming the splits ``builder`` has when it lacks ``split`` (unknown before preparing)."""
    splits = builder.info.splits
    if splits and split not in splits:
        raise DataError(f"tfds dataset {tfds_name!r} has no split {split!r}; it has {', '.join(splits)}")


def _split(source: Source, split: str) -> str:
    return source.split or split


def num_examples(name: str, split: str, *, data_dir=None, process_index: int = 0,
                 process_count: int = 1) -> int:
    """How many examples of ``split`` this process's share holds, from the source's metadata or
    listing: no image is read, so that a run can check its data before it writes anything (a
    ``prepared:`` source's image size is checked by :func:`open_streamed`)."""
    source = parse(name)
    if source.kind == "digits":
        count = len(_digits(split)[0])
    elif source.kind == "tfds":
        builder = tfds_builder(source.value, data_dir)
        split = _split(source, split)
        check_split(builder, source.value, split)
        return builder.info.splits[split].num_examples // process_count  # even_splits drops the remainder
    elif source.kind == "folder":
        count = len(image_files.list_folder(source.value).paths)
    else:
        count = records.read_metadata(source.value, split)["num_examples"]
    share = _share(count, process_index, process_count)
    return share.stop - share.start


def classes(name: str, split: str, *, data_dir=None) -> tuple[str, ...]:
    """The names of the source's classes, label k naming the k-th (empty without classes); from its
    metadata or listing, no image read."""
    source = parse(name)
    if source.kind == "digits":
        return tuple(str(k) for k in range(10))
    if source.kind == "tfds":
        return tfds_classes(tfds_builder(source.value, data_dir))
    if source.kind == "folder":
        return image_files.list_folder(source.value).classes
    return tuple(records.read_metadata(source.value, split)["classes"])


def check_classes(name: str, split: str, num_classes: int, *, data_dir=None) -> None:
    """A class-conditional network of ``num_classes`` (> 0) trains on a source with as many classes."""
    _check_class_count(classes(name, split, data_dir=data_dir), name, num_classes)


def _check_class_count(found: tuple[str, ...], name: str, num_classes: int) -> None:
    if not found:
        raise ConfigError(f"model.num_classes = {num_classes} asks for a class-conditional network, but "
                          f"{name!r} has no classes (a folder: one subfolder per class): set "
                          "model.num_classes = 0, or give labelled data")
    if len(found) != num_classes:
        raise ConfigError(f"model.num_classes = {num_classes}, but {name!r} has {len(found)} classes "
                          f"({', '.join(found[:5])}{', ...' if len(found) > 5 else ''}): set "
                          f"model.num_classes = {len(found)}")


class Examples(NamedTuple):
    """A process's share in host memory: uint8 images [N, S, S, C] and int32 labels [N] (-1: none)."""

    images: np.ndarray
    labels: np.ndarray


def load_examples(name: str, split: str, *, image_size: int, channels: int | None = None, data_dir=None,
                  process_index: int = 0, process_count: int = 1) -> Examples:
    """This process's share of a split in host memory (every source; ``channels`` None keeps a tfds
    dataset's own and is 3 for folders)."""
    source = parse(name)
    if source.kind == "digits":
        images, labels = _digits(split)
        if images.shape[1] != image_size:
            raise ConfigError(f"digits images are 16x16, got image_size {image_size}")
        if channels not in (None, 1):
            raise ConfigError(f"digits images have 1 channel, got channels {channels}")
        share = _share(len(images), process_index, process_count)
        return Examples(images[share], labels[share])
    if source.kind == "tfds":
        builder = tfds_builder(source.value, data_dir, prepared=False)  # as_dataset says when it is not
        channels = channels or builder.info.features[tfds_features(builder)[0]].shape[-1]
        parts = list(tfds_examples(builder, source.value, _split(source, split), image_size, channels,
                                   process_index, process_count))
        if not parts:
            return Examples(np.zeros((0, image_size, image_size, channels), np.uint8), np.zeros(0, np.int32))
        return Examples(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    streamed = open_streamed(name, split, image_size=image_size, channels=channels or 3,
                             process_index=process_index, process_count=process_count)
    pairs = [streamed.example(i) for i in range(len(streamed))]
    return Examples(np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs], np.int32))


def load(name: str, split: str, *, image_size: int, channels: int | None = None, data_dir=None,
         process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """This process's share of a split's images, uint8 [N, image_size, image_size, C]."""
    return load_examples(name, split, image_size=image_size, channels=channels, data_dir=data_dir,
                         process_index=process_index, process_count=process_count).images


def check_batch_size(num_examples: int, batch_size: int) -> None:
    """A batch holds each of a process's examples at most once (``batch_indices``)."""
    if batch_size > num_examples:
        raise ConfigError(f"a batch of {batch_size} images a process is more than the {num_examples} "
                          "training examples this process holds: lower train.batch_size (the global batch of "
                          "all processes)")


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int,
                  process_index: int = 0) -> np.ndarray:
    """Indices of the examples of this process's batch at ``step``.

    Step s reads positions [s B, (s + 1) B) of the endless sequence made of one seeded
    permutation per epoch.
    """
    check_batch_size(num_examples, batch_size)
    start = step * batch_size
    epoch, offset = divmod(start, num_examples)
    parts, need = [], batch_size
    while need:
        perm = np.random.default_rng([seed, process_index, epoch]).permutation(num_examples)
        parts.append(perm[offset: offset + need])
        need -= len(parts[-1])
        epoch, offset = epoch + 1, 0
    return np.concatenate(parts)


def make_batch(examples, step: int, *, batch_size: int, seed: int, randflip: bool,
               process_index: int = 0) -> dict:
    """This process's batch at ``step`` of in-memory ``examples`` (:class:`Examples`, or uint8 images
    alone): ``image`` float32 NHWC in [-1, 1], flipped left-right at random, and ``label``."""
    if not isinstance(examples, Examples):
        examples = Examples(examples, np.full(len(examples), -1, np.int32))
    index = batch_indices(len(examples.images), batch_size, step, seed, process_index)
    x = examples.images[index]
    if randflip:
        flip = np.random.default_rng([seed, process_index, step, 1]).random(batch_size) < 0.5
        x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
    return {"image": image_io.from_uint8(x), "label": examples.labels[index]}


def _grain_seed(seed: int, process_index: int) -> int:
    """A seed in [0, 2^32) for grain, from the run's seed and the process."""
    return int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])


class Streamed:
    """A process's share of a ``folder:`` or ``prepared:`` source, read image by image with grain.

    ``dataset(batch_size, seed, randflip)`` is the endless sequence of batches: grain's index
    shuffle (one seeded permutation per epoch, computed per index, no array of N), a flip seeded
    by (seed, element index), batches of consecutive elements; element s is the batch of step s.
    """

    def __init__(self, items, read, process_index: int, classes: tuple[str, ...]):
        self._items, self._read, self.process_index, self.classes = items, read, process_index, classes

    def __len__(self) -> int:
        return len(self._items)

    def example(self, i: int) -> tuple[np.ndarray, int]:
        return self._read(self._items[i])

    @property
    def images(self) -> _Images:
        """The share's images, read when indexed: ``images[indices]`` is uint8 [n, S, S, C]."""
        return _Images(self)

    def dataset(self, *, batch_size: int, seed: int, randflip: bool):
        import grain

        check_batch_size(len(self), batch_size)
        grain_seed = _grain_seed(seed, self.process_index)
        ds = grain.MapDataset.source(self._items).shuffle(seed=grain_seed).repeat().map(self._read)

        def flip(example, rng: np.random.Generator):
            image, label = example
            return (image[:, ::-1] if randflip and rng.random() < 0.5 else image), label

        ds = ds.random_map(flip, seed=grain_seed).batch(batch_size, drop_remainder=True)
        return ds.map(lambda batch: {"image": image_io.from_uint8(batch[0]),
                                     "label": np.asarray(batch[1], np.int32)})

    def batch(self, step: int, **kwargs) -> dict:
        return self.dataset(**kwargs)[step]


class _Images:
    def __init__(self, streamed: Streamed):
        self._streamed = streamed

    def __len__(self) -> int:
        return len(self._streamed)

    def __getitem__(self, index) -> np.ndarray:
        return np.stack([self._streamed.example(int(i))[0] for i in np.atleast_1d(index)])


def open_streamed(name: str, split: str, *, image_size: int, channels: int, process_index: int = 0,
                  process_count: int = 1) -> Streamed:
    """This process's share of a ``folder:`` or ``prepared:`` source, nothing read but its listing."""
    source = parse(name)
    if source.kind == "folder":
        folder = image_files.list_folder(source.value)
        share = _share(len(folder.paths), process_index, process_count)
        items = list(zip(folder.paths[share], folder.labels[share].tolist(), strict=True))

        def read(item):
            path, label = item
            return image_files.read_image(path, image_size, channels), label

        return Streamed(items, read, process_index, folder.classes)
    if source.kind != "prepared":
        raise ConfigError(f"{name!r} is read into memory, not streamed")
    metadata = records.read_metadata(source.value, split)
    if (metadata["image_size"], metadata["channels"]) != (image_size, channels):
        raise ConfigError(f"{source.value} holds {metadata['image_size']}x{metadata['image_size']} images of "
                          f"{metadata['channels']} channels; the config asks for {image_size}x{image_size} "
                          f"with {channels}: set data.image_size and data.channels to match, or prepare "
                          "the data again")
    data = records.open_records(source.value, split)
    share = _share(len(data), process_index, process_count)

    def read_record(index):
        return records.decode_example(data[index], image_size, channels)

    return Streamed(range(share.start, share.stop), read_record, process_index, tuple(metadata["classes"]))


def check(name: str, split: str, *, image_size: int, channels: int, batch_size: int, data_dir=None,
          process_index: int = 0, process_count: int = 1, num_classes: int = 0) -> Streamed | None:
    """What a run can check of its data before it writes anything: the source exists and holds images
    (a folder's listing, a prepared source's metadata and image shape, a tfds dataset's metadata),
    it has ``num_classes`` classes if that is not 0 (:func:`check_classes`), and this process's share
    fills a batch of ``batch_size``.

    Returns the share of a streamed source (folder, prepared), opened by the check, to train on
    without listing a folder again; None for the sources :func:`open_share` reads into memory.
    """
    streamed = None
    if parse(name).kind in STREAMED_KINDS:
        streamed = open_streamed(name, split, image_size=image_size, channels=channels,
                                 process_index=process_index, process_count=process_count)
        found, count = streamed.classes, len(streamed)
    else:
        found = classes(name, split, data_dir=data_dir) if num_classes else ()
        count = num_examples(name, split, data_dir=data_dir, process_index=process_index,
                             process_count=process_count)
    if num_classes:
        _check_class_count(found, name, num_classes)
    check_batch_size(count, batch_size)
    return streamed


def open_share(name: str, split: str, *, image_size: int, channels: int, data_dir=None,
               process_index: int = 0, process_count: int = 1) -> Examples | Streamed:
    """This process's share of a split, to batch with :func:`batches`: in memory (digits, tfds) or
    streamed (folder, prepared); either way ``.images`` indexes its uint8 images."""
    if parse(name).kind in STREAMED_KINDS:
        return open_streamed(name, split, image_size=image_size, channels=channels,
                             process_index=process_index, process_count=process_count)
    return load_examples(name, split, image_size=image_size, channels=channels, data_dir=data_dir,
                         process_index=process_index, process_count=process_count)


def batches(share: Examples | Streamed, start_step: int, *, batch_size: int, seed: int, randflip: bool,
            process_index: int = 0):
    """The batches of steps start_step, start_step + 1, ... of this process's ``share`` (dicts of
    ``image`` and ``label``), prepared ahead: a :class:`Prefetcher` over examples in memory, grain's
    threads over a streamed share. An error while preparing one is raised by the ``next`` that would
    have returned it; ``close()`` when done."""
    if isinstance(share, Streamed):
        import grain

        ds = share.dataset(batch_size=batch_size, seed=seed, randflip=randflip)[start_step:]
        options = grain.ReadOptions(num_threads=_THREADS, prefetch_buffer_size=_PREFETCH)
        return iter(ds.to_iter_dataset(options))
    return Prefetcher(share, start_step, batch_size=batch_size, seed=seed, randflip=randflip,
                      process_index=process_index)


class Prefetcher:
    """Yields ``make_batch`` for steps start, start + 1, ... prepared ``depth`` ahead in a thread.

    Any exception in the thread (a SystemExit or KeyboardInterrupt too) ends it and is raised by
    the ``next`` that would have received its batch, so that the consumer never waits for a batch
    that cannot come; a ``next`` that finds the thread gone with nothing queued says so.
    """

    def __init__(self, images, start_step: int, *, depth: int = 2, **batch_kwargs):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()

        def work():
            step = start_step
            try:
                while not self._stop.is_set():
                    self._put(make_batch(images, step, **batch_kwargs))
                    step += 1
            except BaseException as e:  # noqa: BLE001  (handed over whole: __next__ raises it)
                self._put(e)

        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the input thread has stopped without a batch or an error") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
