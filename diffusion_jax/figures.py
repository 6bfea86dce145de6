"""The sampling figures of the papers, as PNG grids: progressive generation, the two interpolations,
reconstruction.

Each takes the config and parameters of a model (see ``checkpoints.load``), a handful of
rows, and writes ``OUT/<figure>.png`` from process 0. Rows are few, so each figure is one
compiled call on the default device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from diffusion_jax import builders, image_io, input_pipeline, sample_lib, samplers, storage
from diffusion_jax.errors import DataError
from diffusion_jax.progress import console

NUM_RECORDED = 10  # columns of the progressive figure


class Model:
    """A model to draw with: the config, parameters, network, schedule and the eps-or-x_0 function."""

    def __init__(self, config, params):
        self.config, self.params = config, params
        self.net, self.sched = builders.make_model(config), builders.make_schedule(config)
        self.types = dict(mean_type=config.diffusion.mean_type, var_type=config.diffusion.var_type)

    def model_fn(self, params):
        return lambda x, t: self.net.apply({"params": params}, x, t)

    def shape(self, num: int):
        d = self.config.data
        return (num, d.image_size, d.image_size, d.channels)

    def test_images(self, num: int) -> np.ndarray:
        """The first ``num`` images of the eval split as model inputs in [-1, 1]."""
        d = self.config.data
        images = input_pipeline.load(d.name, d.eval_split, image_size=d.image_size, channels=d.channels,
                                     data_dir=d.data_dir)
        if len(images) < num:
            raise DataError(f"the {d.eval_split} split of {d.name} has {len(images)} images, fewer than "
                            f"{num}")
        return image_io.from_uint8(images[:num])


def _save(out: epath.Path, name: str, images, columns: int) -> str:
    path = out / f"{name}.png"
    if jax.process_index() == 0:
        image_io.save_grid(image_io.to_uint8(images), path, columns=columns, scale=2)
    return str(path)


def _row_major(stacked):
    """[C, R, ...] (columns of rows) -> [R * C, ...], row by row."""
    stacked = jnp.asarray(stacked)
    return jnp.swapaxes(stacked, 0, 1).reshape((-1,) + stacked.shape[2:])


def progressive(m: Model, rng, out: epath.Path, num: int) -> list[str]:
    """DDPM Fig. 6: x_t and the predicted x_0 at ``NUM_RECORDED`` timesteps from T-1 to 0, one row an
    image."""
    visited = sample_lib.sampler_timesteps(m.config, m.sched)
    visited = np.arange(m.config.diffusion.num_timesteps) if visited is None else visited
    picks = np.unique(np.linspace(0, len(visited) - 1, NUM_RECORDED).round().astype(int))
    record = [int(t) for t in visited[picks][::-1]]
    noise_key, sampler_key = sample_lib.batch_keys(rng, 0)

    @jax.jit
    def draw(params):
        x_T = jax.random.normal(noise_key, m.shape(num))
        return sample_lib.sample_images(params, x_T, sampler_key, model=m.net, sched=m.sched, config=m.config,
                                        record=record)

    result = draw(m.params)
    return [_save(out, "progressive_xt", _row_major(result.x_t), len(record)),
            _save(out, "progressive_x0", _row_major(result.pred_x0), len(record))]


def interpolate(m: Model, rng, out: epath.Path, num: int, num_interp: int) -> list[str]:
    """DDIM section 5.3: each row decodes slerp(z_a, z_b, alpha) for ``num_interp`` alphas from 0 to 1."""
    alphas = jnp.linspace(0.0, 1.0, num_interp)
    za, zb = jax.random.normal(sample_lib.batch_keys(rng, 0)[0], (2,) + m.shape(num))

    @jax.jit
    def draw(params):
        x_T = jax.vmap(functools.partial(samplers.slerp, alphas=alphas))(za, zb)  # [num, num_interp, ...]
        x_T = x_T.reshape((-1,) + x_T.shape[2:])
        return sample_lib.sample_images(params, x_T, None, model=m.net, sched=m.sched, config=m.config).images

    return [_save(out, "interpolate", draw(m.params), num_interp)]


def interpolate_diffused(m: Model, rng, out: epath.Path, num: int, num_interp: int, t: int) -> list[str]:
    """DDPM section 4.4 (Fig. 8): test images a, b in the first and last columns; between, decodings of
    (1 - lambda) x_t^a + lambda x_t^b for lambdas from 0 to 1."""
    x0 = m.test_images(2 * num)
    lambdas = jnp.linspace(0.0, 1.0, num_interp)

    @jax.jit
    def row(params, a, b, key):
        return samplers.interpolate_diffused(m.model_fn(params), m.sched, a, b, lambdas, t, key,
                                             clip_x0=m.config.sample.clip_x0, **m.types)

    rows = []
    for i in range(num):
        a, b = x0[2 * i], x0[2 * i + 1]
        decoded = row(m.params, a, b, jax.random.fold_in(rng, i))
        rows.append(jnp.concatenate([a[None], decoded, b[None]]))
    return [_save(out, "interpolate_diffused", jnp.concatenate(rows), num_interp + 2)]


def reconstruct(m: Model, out: epath.Path, num: int) -> list[str]:
    """DDIM section 5.4: test images (top row) encoded by DDIM inversion and decoded (bottom row).

    Also writes ``reconstruct.json`` with the RMSE on the [0, 255] scale, as DDIM Table 2.
    """
    x0 = m.test_images(num)
    steps = sample_lib.sampler_timesteps(m.config, m.sched)

    @jax.jit
    def round_trip(params):
        x_T = samplers.ddim_invert(m.model_fn(params), m.sched, x0, timesteps=steps, **m.types)
        return sample_lib.sample_images(params, x_T, None, model=m.net, sched=m.sched, config=m.config).images

    back = round_trip(m.params)
    rmse = float(jnp.sqrt(jnp.mean(jnp.square((back - x0) * 127.5))))
    if jax.process_index() == 0:
        storage.write_json(out / "reconstruct.json", {"rmse_0_255": rmse, "steps": len(steps), "images": num})
    console(f"reconstruction RMSE over {num} test images ([0, 255] scale): {rmse:.3f}")
    return [_save(out, "reconstruct", jnp.concatenate([x0, back]), num)]
