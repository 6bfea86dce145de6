"""Negative log-likelihood in bits/dim on a dataset, and the rate-distortion data of DDPM section 4.3.

The NLL is the full variational bound L of DDPM eq. 5 for each image (all T terms and the
prior, ``losses.bits_per_dim``), on uint8 images mapped to [-1, 1] with the discretized
decoder of DDPM section 3.3: the quantity of DDPM Table 2 ("NLL Test <= 3.75"). Images are
sharded over the devices in batches; batch i draws its noise from ``fold_in(rng, i)``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import image_io, losses
from diffusion_jax.errors import ConfigError, DataError
from diffusion_jax.mesh import data_mesh


class Likelihood(NamedTuple):
    """Bits/dim per image, with the mean of the per-timestep data behind the rate-distortion curve."""

    bpd: np.ndarray  # [N], the bound per image
    terms: np.ndarray  # [T], mean over images of L_t (bits/dim), t = 0 (decoder) .. T - 1
    prior: float  # mean L_T (bits/dim)
    rmse: np.ndarray  # [T], mean over images of the RMSE of the x_0 prediction from x_t, [0, 255] scale

    @property
    def mean(self) -> float:
        return float(np.mean(self.bpd))

    @property
    def stderr(self) -> float:
        """Standard error of the mean over images."""
        return float(np.std(self.bpd, ddof=1) / np.sqrt(len(self.bpd))) if len(self.bpd) > 1 else float("nan")

    def rate(self) -> np.ndarray:
        """[T]: bits/dim received when the reverse process reaches x_t: L_T + sum of L_s for s >= t
        (DDPM 4.3)."""
        return self.prior + np.cumsum(self.terms[::-1])[::-1]


class Bound:
    """The variational bound (bits/dim) of a model, compiled once, for batches of ``batch_size`` (a
    multiple of the device count).

    ``apply(params, x_t, t)`` is the network's output (eps or x_0, and the variance if learned), as
    ``mean_type`` and ``var_type`` say; ``sched`` the schedule it was trained with."""

    def __init__(self, apply, sched, *, mean_type: str, var_type: str, batch_size: int):
        num_devices = jax.device_count()
        if batch_size < 1 or batch_size % num_devices:
            raise ConfigError(f"batch_size {batch_size} must be a positive multiple of the {num_devices} "
                              "devices")
        mesh = data_mesh()
        self.batch_size, self.data, replicated = (batch_size, NamedSharding(mesh, P("data")),
                                                  NamedSharding(mesh, P()))

        def bound(params, x, key):
            out = losses.bits_per_dim(functools.partial(apply, params), sched, image_io.from_uint8(x), key,
                                      mean_type=mean_type, var_type=var_type)
            return out.total, out.terms, out.prior, jnp.sqrt(out.x0_mse) * 127.5

        # the jitted bound: (params, uint8 [batch, H, W, C], key) -> (total, terms, prior, rmse) per image
        self.bound = jax.jit(bound, in_shardings=(replicated, self.data, replicated), out_shardings=self.data)

    def __call__(self, params, images: np.ndarray, rng, progress=None) -> Likelihood:
        """The bound of each of ``images`` (uint8 NHWC); noise of batch i from ``fold_in(rng, i)``.

        The last batch is padded with copies and the padding dropped; ``progress(done, total)``
        is called after each batch.
        """
        if len(images) < 1:
            raise DataError("no images to evaluate")
        results = []
        for i, start in enumerate(range(0, len(images), self.batch_size)):
            batch = images[start:start + self.batch_size]
            padded = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - len(batch), axis=0)])
            x = jax.make_array_from_callback(padded.shape, self.data,  # any process count
                                             lambda index, padded=padded: padded[index])
            out = self.bound(params, x, jax.random.fold_in(rng, i))
            results.append([np.asarray(multihost_utils.process_allgather(a, tiled=True))[:len(batch)]
                            for a in out])
            if progress is not None:
                progress(start + len(batch), len(images))
        total, terms, prior, rmse = (np.concatenate(parts) for parts in zip(*results, strict=True))
        return Likelihood(total.astype(np.float64), terms.mean(0), float(prior.mean()), rmse.mean(0))


def plot_rate_distortion(result: Likelihood, path) -> None:
    """DDPM Fig. 5: distortion and rate against the reverse-process step, and distortion against rate, as a
    PNG at ``path`` (any filesystem of ``storage``)."""
    steps = np.arange(len(result.terms))
    rate = result.rate()
    image_io.save_plots([image_io.Panel(steps, result.rmse, "timestep t", "distortion (RMSE, [0, 255])",
                                        invert_x=True),
                         image_io.Panel(steps, rate, "timestep t", "rate (bits/dim)", invert_x=True),
                         image_io.Panel(rate, result.rmse, "rate (bits/dim)", "distortion (RMSE, [0, 255])")],
                        f"NLL {result.mean:.3f} +- {result.stderr:.3f} bits/dim over {len(result.bpd)} "
                        "images", path)
