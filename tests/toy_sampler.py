"""A sampler added from outside the package, as a user adds one: one function and one registration.

It returns the model's x_0 prediction at t = T - 1, one model evaluation from x_T. Importing this
module registers it as ``one_step_x0`` (tests/test_registry.py).
"""

import jax.numpy as jnp
import numpy as np

from diffusion_jax import sampler_registry, samplers, schedule


def one_step_x0(model_fn, sched, x_T, rng, *, timesteps, mean_type, var_type, clip_x0, record):
    """x_0 predicted from x_T at the last timestep, recorded as the one step taken (whatever ``record``)."""
    t = jnp.full((x_T.shape[0],), timesteps[-1], jnp.int32)
    mean_out, _ = schedule.split_model_output(model_fn(x_T, t), x_T, var_type)
    x0 = schedule.predict_x0(sched, x_T, t, mean_out, mean_type)
    x0 = jnp.clip(x0, -1.0, 1.0) if clip_x0 else x0
    return samplers.Samples(x0, x_T[None], x0[None])


sampler_registry.register("one_step_x0", one_step_x0, spacings=("last",), default_spacing="last",
                          timesteps=lambda sched, steps, spacing: np.array([sched.num_timesteps - 1]))
