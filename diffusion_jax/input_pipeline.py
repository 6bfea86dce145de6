"""Training data: tfds image datasets and the embedded offline default.

Each process loads only its share of the split (``tfds.split_for_jax_process``) into host
memory as uint8 NHWC. The batch at a step is a pure function of (seed, process index,
step): epochs are seeded permutations of the process's examples, flips are seeded by the
step. A run resumed at step s therefore reads exactly the batches the uninterrupted run
would have read, with no iterator state to save. A background thread prepares the next
batches while the devices compute.

TensorFlow only decodes images here and is kept off the accelerators.
"""

from __future__ import annotations

import queue
import threading

import numpy as np

from diffusion_jax import image_io
from diffusion_jax.errors import ConfigError, DataError

# name -> (tfds name, image feature); "digits" is the embedded offline default
TFDS_DATASETS = {
    "cifar10": ("cifar10", "image"),
    "celeb_a_hq": ("celeb_a_hq/256", "image"),  # manual download: see configs/celebahq256.py
    "lsun_church": ("lsun/church_outdoor", "image"),
    "lsun_bedroom": ("lsun/bedroom", "image"),
    "lsun_cat": ("lsun/cat", "image"),
}
DATASETS = ("digits",) + tuple(TFDS_DATASETS)


class DatasetNotPreparedError(DataError):
    """A tfds dataset that is not on disk: what is missing and how to prepare it."""


def digits(split: str) -> np.ndarray:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), as uint8 16x16x1.

    Upsampled by pixel repetition; ``train`` is the first 1,500 images, ``test`` the
    other 297 (held out for the quickstart's quality figure).
    """
    from sklearn.datasets import load_digits

    images = np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)
    images = images.repeat(2, axis=1).repeat(2, axis=2)[..., None]
    if split not in ("train", "test"):
        raise ConfigError(f"digits has splits 'train' and 'test', got {split!r}")
    return images[:1500] if split == "train" else images[1500:]


def _not_prepared(tfds_name: str, builder) -> DatasetNotPreparedError:
    return DatasetNotPreparedError(
        f"dataset {tfds_name!r} is not prepared in {builder.data_dir_root}. On a machine with network "
        f"access run: python -c \"import tensorflow_datasets as tfds; tfds.builder('{tfds_name}')"
        f".download_and_prepare()\" and copy the directory here, or pass --config.data.data_dir=DIR "
        "(datasets with manual downloads: see the config's docstring)")


def num_examples(name: str, split: str, *, data_dir=None, process_index: int = 0,
                 process_count: int = 1) -> int:
    """How many images of ``split`` this process's share (``load``) holds, from the dataset's metadata:
    nothing is read, so that a run can check its batch before it writes anything."""
    if name == "digits":
        return len(np.array_split(digits(split), process_count)[process_index])
    if name not in TFDS_DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    import tensorflow_datasets as tfds

    tfds_name = TFDS_DATASETS[name][0]
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    if not builder.info.splits:  # no metadata on disk: never prepared here
        raise _not_prepared(tfds_name, builder)
    return builder.info.splits[split].num_examples // process_count  # even_splits drops the remainder


def _tfds_images(name: str, split: str, data_dir, image_size: int, process_index: int, process_count: int):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    tf.config.set_visible_devices([], "GPU")
    tfds_name, feature = TFDS_DATASETS[name]
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    shard = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
    try:
        ds = builder.as_dataset(split=shard, shuffle_files=False)
    except AssertionError as e:  # tfds's "could not find data": never download here (no hanging retries)
        raise _not_prepared(tfds_name, builder) from e

    def prepare(example):  # center crop to a square, resize to image_size (as the DDPM code's datasets)
        image = example[feature]
        side = tf.minimum(tf.shape(image)[0], tf.shape(image)[1])
        image = tf.image.resize_with_crop_or_pad(image, side, side)
        if image.shape[0] != image_size:
            image = tf.image.resize(image, (image_size, image_size), antialias=True)
        return tf.cast(tf.round(tf.clip_by_value(tf.cast(image, tf.float32), 0, 255)), tf.uint8)

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(1024)
    return np.concatenate(list(tfds.as_numpy(ds)), axis=0)


def load(name: str, split: str, *, image_size: int, data_dir=None, process_index: int = 0,
         process_count: int = 1) -> np.ndarray:
    """This process's share of a split: uint8 [N, image_size, image_size, C]."""
    if name == "digits":
        images = digits(split)
        if images.shape[1] != image_size:
            raise ConfigError(f"digits images are 16x16, got image_size {image_size}")
        return np.array_split(images, process_count)[process_index]
    if name not in TFDS_DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    return _tfds_images(name, split, data_dir, image_size, process_index, process_count)


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


def make_batch(images: np.ndarray, step: int, *, batch_size: int, seed: int, randflip: bool,
               process_index: int = 0) -> np.ndarray:
    """This process's batch at ``step``: float32 NHWC in [-1, 1], flipped left-right at random."""
    x = images[batch_indices(len(images), batch_size, step, seed, process_index)]
    if randflip:
        flip = np.random.default_rng([seed, process_index, step, 1]).random(batch_size) < 0.5
        x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
    return image_io.from_uint8(x)


class Prefetcher:
    """Yields ``make_batch`` for steps start, start + 1, ... prepared ``depth`` ahead in a thread.

    An exception in the thread ends it and is raised by the ``next`` that would have received
    its batch, so that the consumer never waits for a batch that cannot come.
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
            except Exception as e:  # noqa: BLE001  (handed over whole: __next__ raises it)
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

    def __next__(self) -> np.ndarray:
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
