"""Sampling a configured model in batches over a device mesh: the part training and sample.py share.

Batch ``i`` of a run with key ``rng`` draws its x_T and its sampler noise from
``fold_in(rng, i)``: a batch is a pure function of (params, rng, i), whatever the batches
before it or an interruption in between. A class-conditional model samples sample j of the run
as class ``labels(j)`` (every class in turn unless told otherwise), guided at
``config.sample.guidance`` (``guidance.guided``). Long runs write each batch as shards, one per
process, and resume after the last complete one.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import guidance, image_io, sampler_registry, schedule, storage
from diffusion_jax.errors import ConfigError
from diffusion_jax.models.unet import UNet


def sampler_timesteps(config, sched: schedule.Schedule):
    """The timesteps ``config.sample`` visits, or None for all T (the full DDPM chain)."""
    return sampler_registry.visited_timesteps(config.sample, sched)


def sample_images(params, x_T, rng, *, model: UNet, sched: schedule.Schedule, config, y=None, record=()):
    """Images in [-1, 1] from x_T by the sampler of ``config.sample`` (see ``sampler_registry``); a
    class-conditional model samples the labels ``y`` [B] at guidance scale ``config.sample.guidance``."""
    d, s = config.diffusion, config.sample
    sampler = sampler_registry.get(s.sampler)
    if model.num_classes:
        if y is None:
            raise ValueError(f"this model is class-conditional ({model.num_classes} classes): give labels "
                             "to sample")
        model_fn = guidance.guided(lambda x, t, y: model.apply({"params": params}, x, t, y), y, s.guidance,
                                   model.null_label)
    else:
        if y is not None:
            raise ValueError("this model is unconditional (model.num_classes = 0): it samples no labels")

        def model_fn(x, t):
            return model.apply({"params": params}, x, t)

    timesteps, options = sampler_timesteps(config, sched), {key: s[key] for key in sampler.options}
    return sampler.run(model_fn, sched, x_T, rng, timesteps=timesteps, mean_type=d.mean_type,
                       var_type=d.var_type, clip_x0=s.clip_x0, record=record, **options)


def batch_keys(rng, index: int):
    """(x_T key, sampler key) of batch ``index``."""
    return jax.random.split(jax.random.fold_in(rng, index))


def cycle_labels(num_classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """Sample j as class j mod K: every class in turn, equally often over any K consecutive samples."""
    return lambda j: (j % num_classes).astype(np.int32)


def in_order_labels(num_classes: int, total: int) -> Callable[[np.ndarray], np.ndarray]:
    """Sample j of ``total`` as class floor(j K / total): the classes in order, equally many of each.

    Past ``total`` the order starts again (j mod total): a last batch that is only partly wanted,
    when the batch size does not divide ``total``, samples its unused rows as valid classes."""
    if total % num_classes:
        raise ConfigError(f"{total} samples do not divide into equal numbers of the {num_classes} classes: "
                          f"sample a multiple of {num_classes}")
    return lambda j: (j % total * num_classes // total).astype(np.int32)


def check_label(label: int, num_classes: int) -> None:
    """A ConfigError unless ``label`` is a class of a model of ``num_classes``."""
    if not num_classes:
        raise ConfigError("this model is unconditional (model.num_classes = 0): it has no classes to sample")
    if not 0 <= label < num_classes:
        raise ConfigError(f"class label {label} is outside the model's classes [0, {num_classes})")


class Generator:
    """Compiled sampling of ``num`` images a call, sharded over ``mesh``'s ``data`` axis when it divides.

    ``labels(j)``: the classes of the run's samples j (int arrays) for a class-conditional model;
    every class in turn by default (:func:`cycle_labels`)."""

    def __init__(self, config, model: UNet, sched: schedule.Schedule, mesh: Mesh,
                 labels: Callable[[np.ndarray], np.ndarray] | None = None):
        self.config, self.model, self.sched, self.mesh = config, model, sched, mesh
        self.replicated = NamedSharding(mesh, P())
        self._compiled = {}  # number of images -> compiled sampler
        self.labels = None
        if model.num_classes:
            self.labels = labels or cycle_labels(model.num_classes)

    def batch_labels(self, num: int, index: int) -> np.ndarray | None:
        """The labels of batch ``index`` of ``num`` samples (None for an unconditional model)."""
        if self.labels is None:
            return None
        y = np.asarray(self.labels(index * num + np.arange(num)), np.int32)
        if y.min() < 0 or y.max() >= self.model.num_classes:
            raise ConfigError(f"class labels {sorted(set(y.tolist()))} are outside the model's classes "
                              f"[0, {self.model.num_classes})")
        return y

    def _shape(self, num: int):
        d = self.config.data
        return (num, d.image_size, d.image_size, d.channels)

    def compiled(self, num: int):
        """The jitted sampler of ``num`` images: (params, rng, index, y) -> images in [-1, 1], with ``y``
        the labels [num] of a class-conditional model, None otherwise."""
        if num not in self._compiled:
            shape = self._shape(num)
            out = NamedSharding(self.mesh, P("data")) if num % self.mesh.size == 0 else self.replicated

            def generate(params, rng, index, y):
                noise_key, sampler_key = batch_keys(rng, index)
                x_T = jax.random.normal(noise_key, shape)
                return sample_images(params, x_T, sampler_key, model=self.model, sched=self.sched,
                                     config=self.config, y=y).images

            self._compiled[num] = jax.jit(generate, in_shardings=(self.replicated,) * 4, out_shardings=out)
        return self._compiled[num]

    def __call__(self, params, num: int, rng, index: int = 0) -> np.ndarray:
        """Batch ``index``: ``num`` uint8 NHWC images, on every process."""
        images = self.compiled(num)(params, rng, np.int32(index), self.batch_labels(num, index))
        return image_io.to_uint8(multihost_utils.process_allgather(images, tiled=True))

    def local(self, params, num: int, rng, index: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's share of batch ``index`` (``num`` a multiple of the devices): the rows it
        holds and their uint8 NHWC images, computed on its own devices only."""
        if num % self.mesh.size:
            raise ConfigError(f"a batch of {num} images does not divide over the {self.mesh.size} devices")
        images = self.compiled(num)(params, rng, np.int32(index), self.batch_labels(num, index))
        shards = sorted(images.addressable_shards, key=lambda shard: shard.index[0].start)
        rows = np.concatenate([np.arange(num)[shard.index[0]] for shard in shards])
        return rows, image_io.to_uint8(np.concatenate([np.asarray(shard.data) for shard in shards]))


def _piece(directory: epath.Path, index: int, process: int) -> epath.Path:
    """Process ``process``'s share of batch ``index``, in a run of ``jax.process_count()`` processes."""
    return directory / f"{index:06d}-{process:03d}-of-{jax.process_count():03d}.npz"


def completed_batches(directory: epath.Path) -> int:
    """The number of consecutive complete batches 0, 1, ... in ``directory``: those with the share of
    every process of this run (as process 0 sees them, for all processes to agree)."""
    names = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    index = 0
    while all(_piece(directory, index, process).name in names for process in range(jax.process_count())):
        index += 1
    return int(multihost_utils.broadcast_one_to_all(np.int32(index)))


def sample_to_shards(generate: Generator, params, rng, directory: epath.Path, num: int, batch_size: int,
                     progress=None) -> np.ndarray | None:
    """``num`` images in batches of ``batch_size``, resumed after the last complete batch in ``directory``.

    Each process computes its share of batch i (``Generator.local``) and writes it as
    ``directory/i-PROCESS-of-COUNT.npz`` with the rows it holds; as batch i depends on i alone,
    a resumed run writes what an uninterrupted one would. After a barrier process 0 assembles
    and returns all ``num`` images (uint8 NHWC); the other processes return None.
    ``directory`` must be shared by all processes (``storage.check_shared``).
    ``progress(done, total)`` is called after each batch.
    """
    total = -(-num // batch_size)
    if jax.process_index() == 0:  # before the others write: they wait in completed_batches' broadcast
        storage.remove_temporaries(directory)  # shares half-written by a killed run
    for index in range(completed_batches(directory), total):
        rows, images = generate.local(params, batch_size, rng, index)
        storage.save_npz(_piece(directory, index, jax.process_index()), images=images, rows=rows)
        if progress is not None:
            progress(min((index + 1) * batch_size, num), num)
    multihost_utils.sync_global_devices("sample_to_shards")  # every share written before process 0 reads
    if jax.process_index() != 0:
        return None
    assembled = None
    for index in range(total):
        for process in range(jax.process_count()):
            piece = storage.load_npz(_piece(directory, index, process))
            if assembled is None:
                assembled = np.empty((total * batch_size,) + piece["images"].shape[1:], np.uint8)
            assembled[index * batch_size + piece["rows"]] = piece["images"]
    return assembled[:num]


def sample_to_file(generate: Generator, params, rng, directory: epath.Path, num: int, batch_size: int,
                   progress=None) -> np.ndarray | None:
    """:func:`sample_to_shards` under ``directory/shards``, then ``directory/samples.npz`` from process 0
    (``arr_0``: the uint8 NHWC images; ``labels``: their classes, for a class-conditional model).
    Returns the images on process 0 and None on the others (:func:`on_every_process` for all)."""
    images = sample_to_shards(generate, params, rng, directory / "shards", num, batch_size, progress)
    if images is not None:
        labels = {} if generate.labels is None else {"labels": generate.labels(np.arange(num))}
        storage.save_npz(directory / "samples.npz", images, **labels)
    return images


def on_every_process(images: np.ndarray | None, directory: epath.Path) -> np.ndarray:
    """The images of :func:`sample_to_file` on every process: the others read ``samples.npz`` after a
    barrier (``directory`` is shared)."""
    multihost_utils.sync_global_devices(f"{directory}/samples.npz written")
    return images if images is not None else storage.load_npz(directory / "samples.npz")["arr_0"]
