"""Sampling a configured model in batches over a device mesh: the part training and sample.py share.

Batch ``i`` of a run with key ``rng`` draws its x_T and its sampler noise from
``fold_in(rng, i)``: a batch is a pure function of (params, rng, i), whatever the batches
before it or an interruption in between. Long runs write each batch as a shard and resume
after the last complete one.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import image_io, samplers, schedule
from diffusion_jax.models.unet import UNet


def sampler_timesteps(config, sched: schedule.Schedule):
    """The timesteps ``config.sample`` visits, or None for the full DDPM chain."""
    d, s = config.diffusion, config.sample
    if s.sampler == "ddpm" and s.steps == d.num_timesteps:
        return None
    if s.sampler == "dpm_solver++":
        return samplers.dpm_solver_timesteps(sched, s.steps, s.spacing)
    return samplers.ddim_timesteps(d.num_timesteps, s.steps, s.spacing)


def sample_images(params, x_T, rng, *, model: UNet, sched: schedule.Schedule, config, record=()):
    """Images in [-1, 1] from x_T by the sampler of ``config.sample`` (DDPM ancestral, DDIM with eta
    or DPM-Solver++)."""
    d, s = config.diffusion, config.sample

    def model_fn(x, t):
        return model.apply({"params": params}, x, t)

    types = dict(mean_type=d.mean_type, var_type=d.var_type, clip_x0=s.clip_x0, record=record)
    timesteps = sampler_timesteps(config, sched)
    if s.sampler == "ddpm":
        return samplers.ddpm_sample(model_fn, sched, x_T, rng, timesteps=timesteps, **types)
    if s.sampler == "dpm_solver++":
        return samplers.dpm_solver_sample(model_fn, sched, x_T, timesteps=timesteps, order=s.order, **types)
    return samplers.ddim_sample(model_fn, sched, x_T, timesteps=timesteps, eta=s.eta,
                                rng=rng if s.eta > 0 else None, **types)


def batch_keys(rng, index: int):
    """(x_T key, sampler key) of batch ``index``."""
    return jax.random.split(jax.random.fold_in(rng, index))


class Generator:
    """Compiled sampling of ``num`` images a call, sharded over ``mesh``'s ``data`` axis when it divides."""

    def __init__(self, config, model: UNet, sched: schedule.Schedule, mesh: Mesh):
        self.config, self.model, self.sched, self.mesh = config, model, sched, mesh
        self.replicated = NamedSharding(mesh, P())
        self._compiled = {}  # number of images -> compiled sampler

    def _shape(self, num: int):
        d = self.config.data
        return (num, d.image_size, d.image_size, d.channels)

    def compiled(self, num: int):
        """The jitted sampler of ``num`` images: (params, rng, index) -> images in [-1, 1]."""
        if num not in self._compiled:
            shape = self._shape(num)
            out = NamedSharding(self.mesh, P("data")) if num % self.mesh.size == 0 else self.replicated

            def generate(params, rng, index):
                noise_key, sampler_key = batch_keys(rng, index)
                x_T = jax.random.normal(noise_key, shape)
                return sample_images(params, x_T, sampler_key, model=self.model, sched=self.sched,
                                     config=self.config).images

            self._compiled[num] = jax.jit(generate, in_shardings=(self.replicated,) * 3, out_shardings=out)
        return self._compiled[num]

    def __call__(self, params, num: int, rng, index: int = 0) -> np.ndarray:
        """Batch ``index``: ``num`` uint8 NHWC images, on every process."""
        images = self.compiled(num)(params, rng, np.int32(index))
        return image_io.to_uint8(multihost_utils.process_allgather(images, tiled=True))


def _shard_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"{index:06d}.npz")


def completed_shards(directory: str) -> int:
    """The number of consecutive complete shards 0, 1, ... in ``directory``."""
    index = 0
    while os.path.exists(_shard_path(directory, index)):
        index += 1
    return index


def write_npz(path: str, array: np.ndarray) -> None:
    """``path`` with ``arr_0`` = ``array``, written whole or not at all (a temp file, then a rename)."""
    temp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(temp, array)
    os.replace(temp, path)


def sample_to_shards(generate, params, rng, directory: str, num: int, batch_size: int, progress=None) -> np.ndarray:
    """``num`` images in shards of ``batch_size`` (batch i in ``directory/i.npz``), resumed after the last complete one.

    ``generate(params, batch_size, rng, i)`` gives batch i; as it depends on i alone, a resumed
    run writes what an uninterrupted one would. Returns all ``num`` images (uint8 NHWC).
    Only process 0 writes; ``progress(done, total)`` is called after each batch.
    """
    os.makedirs(directory, exist_ok=True)
    total = -(-num // batch_size)
    start = completed_shards(directory)
    for index in range(start, total):
        images = generate(params, batch_size, rng, index)
        if jax.process_index() == 0:
            write_npz(_shard_path(directory, index), images)
        if progress is not None:
            progress(min((index + 1) * batch_size, num), num)
    multihost_utils.sync_global_devices("sample_to_shards")  # every shard written before anyone reads
    shards = [np.load(_shard_path(directory, i))["arr_0"] for i in range(total)]
    return np.concatenate(shards)[:num]


class Progress:
    """A console progress line, ``done/total`` with the rate and ETA from the batches after the first (compiling)."""

    def __init__(self, label: str):
        self.label, self._first = label, None

    def __call__(self, done: int, total: int) -> None:
        if jax.process_index() != 0:
            return
        now, line = time.perf_counter(), f"{self.label}: {done}/{total}"
        if self._first is None:
            self._first = (now, done)
        elif done > self._first[1]:
            rate = (done - self._first[1]) / (now - self._first[0])
            eta = (total - done) / rate
            line += f"  {rate:.2f} img/s  ETA {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m{int(eta % 60):02d}s"
        end = "\n" if done == total or not sys.stdout.isatty() else "\r"
        print(line.ljust(60), end=end, flush=True)
