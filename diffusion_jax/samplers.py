"""Samplers: DDPM ancestral sampling, generalized DDIM, DDIM inversion and interpolation.

Every sampler takes a denoiser ``model_fn(x_t, t)`` (integer ``t`` [B] on the original
[0, T) scale), a :class:`~diffusion_jax.schedule.Schedule` and the model's ``mean_type`` and
``var_type``, and runs its loop over timesteps as one ``lax.scan``: call it inside
``jax.jit``, passing network parameters as arguments of the jitted function (not as
closed-over constants), and compile time does not grow with the number of steps.

Random draws are stateless: the noise added at timestep ``t`` is
``normal(fold_in(rng, t))``, so samplers that visit the same t with the same ``rng`` add
the same noise (DDIM with eta = 1 on the full chain then equals DDPM ancestral sampling).

Samplers can record, at requested timesteps, the state x_t before the step and the x_0
predicted from it (DDPM figure 6, "progressive generation").
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import schedule as sch

SPACINGS = ("uniform", "quad", "trailing", "linspace")


class Samples(NamedTuple):
    """A sampler's result; ``x_t`` and ``pred_x0`` are [R, B, ...] for R recorded timesteps."""

    images: jnp.ndarray
    x_t: jnp.ndarray
    pred_x0: jnp.ndarray


def ddim_timesteps(num_timesteps: int, num_steps: int, spacing: str = "uniform") -> np.ndarray:
    """Increasing timesteps of an S-step sampler (DDIM section 4.2 and appendix D.2).

    ``uniform``: k * (T // S) for k < S, the DDIM code's ``range(0, T, T // S)`` when S
    divides T (every setting of the papers); ``quad``: int(linspace(0, sqrt(0.8 T), S)^2),
    the DDIM code's CIFAR-10 choice, kept with its repeated entries, which samplers skip as
    the exact no-ops they are; ``trailing`` and ``linspace``: Lin et al. 2023, table 2.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not (
        1 <= num_steps <= num_timesteps
    ):
        raise ValueError(f"num_steps must be an integer in [1, T = {num_timesteps}], got {num_steps!r}")
    T, S = num_timesteps, int(num_steps)
    if spacing == "uniform":
        steps = np.arange(S) * (T // S)
    elif spacing == "quad":
        steps = np.array([int(s) for s in np.linspace(0, np.sqrt(T * 0.8), S) ** 2])
    elif spacing == "trailing":
        steps = (np.round(np.arange(T, 0, -T / S)) - 1)[::-1]
    elif spacing == "linspace":
        steps = np.linspace(0, T - 1, S).round()
    else:
        raise ValueError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
    return steps.astype(np.int32)


def _distinct(timesteps, num_timesteps: int) -> np.ndarray:
    steps = np.asarray(timesteps)
    if steps.ndim == 1 and steps.size > 1 and np.all(np.diff(steps) >= 0):
        steps = np.unique(steps)  # repeats are no-ops of eq. 12 (a_prev = a_t, sigma = 0)
    return sch.check_timesteps(steps, num_timesteps)


def _ddim_chain(sched: sch.Schedule, timesteps):
    """Distinct steps, the respaced chain, and 1 - a-bar of the level before each step."""
    steps = _distinct(timesteps, sched.num_timesteps)
    chain = sch.respace(sched, steps)
    one_minus_prev = jnp.concatenate([jnp.zeros((1,)), jnp.square(chain.sqrt_one_minus_alphas_cumprod[:-1])])
    return steps, chain, one_minus_prev


def _check_input(x_T, rng, needs_rng: bool) -> None:
    if getattr(x_T, "ndim", 0) < 2:
        raise ValueError(f"x_T must be a batch [B, ...] of at least 2 dimensions, got {getattr(x_T, 'shape', x_T)}")
    if needs_rng and rng is None:
        raise ValueError("rng is required: this sampler adds noise (pass a jax.random key)")


def _eps_and_x0(model_fn, sched, x, t, *, mean_type, var_type, clip_x0):
    """The model's eps and x_0 predictions at (x, t); eps is recomputed from a clipped x_0."""
    mean_out, _ = sch.split_model_output(model_fn(x, t), x, var_type)
    if mean_type == "eps" and not clip_x0:
        return mean_out, sch.predict_x0_from_eps(sched, x, t, mean_out)
    pred_x0 = sch.predict_x0(sched, x, t, mean_out, mean_type)
    if clip_x0:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    return sch.predict_eps_from_x0(sched, x, t, pred_x0), pred_x0


def _reverse_loop(step, x_T, timesteps: np.ndarray, record: Sequence[int]) -> Samples:
    """Runs ``step(x, i) -> (x_prev, pred_x0)`` for i = n-1, ..., 0 in one scan, recording."""
    record = list(record)
    missing = [r for r in record if r not in set(timesteps.tolist())]
    if missing:
        raise ValueError(f"record timesteps {missing} are not among the sampled timesteps {timesteps.tolist()}")
    slot = np.full(len(timesteps), len(record), np.int32)  # out of range: not recorded
    for k, r in enumerate(record):
        slot[int(np.flatnonzero(timesteps == r)[0])] = k
    slot = jnp.asarray(slot)
    buffer = jnp.zeros((len(record),) + x_T.shape, x_T.dtype)

    def body(carry, i):
        x, xs, x0s = carry
        x_prev, pred_x0 = step(x, i)
        if record:
            xs = xs.at[slot[i]].set(x, mode="drop")
            x0s = x0s.at[slot[i]].set(pred_x0, mode="drop")
        return (x_prev, xs, x0s), None

    indices = jnp.arange(len(timesteps) - 1, -1, -1, dtype=jnp.int32)
    (images, xs, x0s), _ = jax.lax.scan(body, (x_T, buffer, buffer), indices)
    return Samples(images, xs, x0s)


def ddpm_sample(
    model_fn: sch.ModelFn,
    sched: sch.Schedule,
    x_T,
    rng,
    *,
    mean_type: str,
    var_type: str,
    clip_x0: bool = True,
    timesteps=None,
    record: Sequence[int] = (),
) -> Samples:
    """Ancestral sampling, DDPM Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z.

    x_0 predictions are clipped to [-1, 1] by default, as in the DDPM code, and no noise is
    added at the last step. With ``timesteps`` (increasing) the chain runs on that
    subsequence with betas recomputed from a-bar (:func:`~diffusion_jax.schedule.respace`);
    on the DDIM ``quad`` steps with ``var_type='fixed_large'`` this is DDIM table 1's
    sigma-hat sampler. ``x_T`` may start part-way: with timesteps 0..t it is an x_t.
    """
    sch.check_types(mean_type, var_type)
    _check_input(x_T, rng, needs_rng=True)
    steps = np.arange(sched.num_timesteps, dtype=np.int32) if timesteps is None else _distinct(
        timesteps, sched.num_timesteps
    )
    chain = sched if timesteps is None else sch.respace(sched, steps)
    model_t = jnp.asarray(steps)
    batch = x_T.shape[0]

    def step(x, i):
        out = model_fn(x, jnp.full((batch,), model_t[i], jnp.int32))
        p = sch.p_mean_variance(
            chain, out, x, jnp.full((batch,), i, jnp.int32), mean_type=mean_type, var_type=var_type,
            clip_x0=clip_x0,
        )
        noise = jax.random.normal(jax.random.fold_in(rng, model_t[i]), x.shape, x.dtype)
        return p.mean + (i > 0) * jnp.exp(0.5 * p.log_variance) * noise, p.pred_x0

    return _reverse_loop(step, x_T, steps, record)


def ddim_sample(
    model_fn: sch.ModelFn,
    sched: sch.Schedule,
    x_T,
    *,
    timesteps,
    mean_type: str,
    var_type: str,
    eta: float = 0.0,
    rng=None,
    clip_x0: bool = False,
    record: Sequence[int] = (),
) -> Samples:
    """Generalized DDIM sampling, DDIM eq. 12, on increasing ``timesteps`` (see :func:`ddim_timesteps`).

    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z with
    sigma = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)) (eq. 16) and a_prev = 1
    after the last step. eta = 0 is deterministic, eta = 1 is DDPM's posterior variance.
    x_0 is not clipped by default (as in the DDIM code); when clipped, eps is recomputed
    from the clipped x_0 (as in improved DDPM's code).
    """
    sch.check_types(mean_type, var_type)
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM variance), got {eta!r}")
    _check_input(x_T, rng, needs_rng=eta > 0)
    steps, chain, one_minus_prev = _ddim_chain(sched, timesteps)
    model_t = jnp.asarray(steps)
    batch = x_T.shape[0]

    def step(x, i):
        t = jnp.full((batch,), model_t[i], jnp.int32)
        eps, pred_x0 = _eps_and_x0(model_fn, sched, x, t, mean_type=mean_type, var_type=var_type, clip_x0=clip_x0)
        var = eta**2 * chain.posterior_variance[i]  # sigma^2 of eq. 16, beta~ of the subsequence
        direction = jnp.sqrt(jnp.maximum(one_minus_prev[i] - var, 0.0))
        x_prev = jnp.sqrt(chain.alphas_cumprod_prev[i]) * pred_x0 + direction * eps
        if eta > 0:
            x_prev += jnp.sqrt(var) * jax.random.normal(jax.random.fold_in(rng, model_t[i]), x.shape, x.dtype)
        return x_prev, pred_x0

    return _reverse_loop(step, x_T, steps, record)


def ddim_invert(
    model_fn: sch.ModelFn,
    sched: sch.Schedule,
    x0,
    *,
    timesteps,
    mean_type: str,
    var_type: str,
):
    """x_0 -> x_T by the eta = 0 update of eq. 12 run forwards (DDIM section 4.3, eq. 14).

    From level t_{i-1} (a = 1 for x_0) to t_i, eps is the model's at the current point and
    the target timestep t_i; ``ddim_sample`` on the same timesteps decodes it back.
    """
    sch.check_types(mean_type, var_type)
    _check_input(x0, None, needs_rng=False)
    steps, chain, one_minus_prev = _ddim_chain(sched, timesteps)
    model_t = jnp.asarray(steps)
    batch = x0.shape[0]

    def body(x, i):
        t = jnp.full((batch,), model_t[i], jnp.int32)
        eps, _ = _eps_and_x0(model_fn, sched, x, t, mean_type=mean_type, var_type=var_type, clip_x0=False)
        pred_x0 = (x - jnp.sqrt(one_minus_prev[i]) * eps) / jnp.sqrt(chain.alphas_cumprod_prev[i])
        return chain.sqrt_alphas_cumprod[i] * pred_x0 + chain.sqrt_one_minus_alphas_cumprod[i] * eps, None

    x_T, _ = jax.lax.scan(body, x0, jnp.arange(len(steps), dtype=jnp.int32))
    return x_T


def slerp(z0, z1, alphas):
    """Spherical interpolation of two latents (DDIM section 5.3), one row per ``alphas`` entry.

    z0, z1 [...] -> [N, ...]: sin((1 - a) theta) / sin(theta) z0 + sin(a theta) / sin(theta) z1
    with theta the angle between z0 and z1.
    """
    z0, z1, alphas = jnp.asarray(z0), jnp.asarray(z1), jnp.asarray(alphas)
    if z0.shape != z1.shape:
        raise ValueError(f"latents to interpolate differ in shape: {z0.shape} and {z1.shape}")
    if alphas.ndim != 1:
        raise ValueError(f"alphas must be a 1-D array of weights in [0, 1], got shape {alphas.shape}")
    cos = jnp.vdot(z0, z1) / (jnp.linalg.norm(z0) * jnp.linalg.norm(z1))
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    a = alphas.reshape((-1,) + (1,) * z0.ndim)
    return (jnp.sin((1 - a) * theta) * z0 + jnp.sin(a * theta) * z1) / jnp.sin(theta)


def interpolate_diffused(
    model_fn: sch.ModelFn,
    sched: sch.Schedule,
    x0_a,
    x0_b,
    lambdas,
    t: int,
    rng,
    *,
    mean_type: str,
    var_type: str,
    clip_x0: bool = True,
):
    """DDPM section 4.4: encode two images with q(x_t | x_0), interpolate linearly, decode.

    x0_a, x0_b [...] -> [N, ...], one image per ``lambdas`` entry: x_t = (1 - l) x_t^a + l x_t^b
    decoded by the reverse process from t. The encoding and decoding noise is the same for
    every lambda, as in the paper's figure 8.
    """
    x0_a, x0_b, lambdas = jnp.asarray(x0_a), jnp.asarray(x0_b), jnp.asarray(lambdas)
    if x0_a.shape != x0_b.shape:
        raise ValueError(f"images to interpolate differ in shape: {x0_a.shape} and {x0_b.shape}")
    if not (isinstance(t, (int, np.integer)) and 0 <= t < sched.num_timesteps):
        raise ValueError(f"t must be an integer timestep in [0, {sched.num_timesteps}), got {t!r}")
    encode_rng, decode_rng = jax.random.split(rng)
    pair = jnp.stack([x0_a, x0_b])
    noise = jax.random.normal(encode_rng, pair.shape, pair.dtype)
    x_t = sch.q_sample(sched, pair, jnp.full((2,), t, jnp.int32), noise)
    lam = lambdas.reshape((-1,) + (1,) * x0_a.ndim)
    mixed = (1 - lam) * x_t[0] + lam * x_t[1]

    def decode(x):
        return ddpm_sample(
            model_fn, sched, x[None], decode_rng, mean_type=mean_type, var_type=var_type, clip_x0=clip_x0,
            timesteps=np.arange(t + 1),
        ).images[0]

    return jax.vmap(decode)(mixed)
