"""Noise schedules, the forward process q and its posterior (DDPM, Ho et al. 2020).

Notation follows the paper and its code: ``betas`` = beta_t, ``alphas`` = 1 - beta_t,
``alphas_cumprod`` = alpha-bar_t. Timesteps are integer arrays in ``[0, T)``; index ``t``
is the paper's ``t + 1``.

The per-timestep table is computed in float64 NumPy and stored as float32 arrays in
a :class:`Schedule`, an immutable pytree (a ``NamedTuple``) that can be passed into
``jax.jit``-compiled code. ``T`` is read from the arrays' static shape.

Model parameterizations (``mean_type``): ``eps`` (the noise, DDPM eq. 11), ``x0`` (the
clean image), ``mean`` (the posterior mean mu~_t, called ``xprev`` in the original code)
and ``v`` (Salimans & Ho 2022, v = sqrt(alpha-bar) eps - sqrt(1 - alpha-bar) x_0).
Variance types (``var_type``): ``fixed_small`` (sigma^2 = beta~_t), ``fixed_large``
(sigma^2 = beta_t), ``learned`` (the network outputs log sigma^2) and ``learned_range``
(improved DDPM eq. 15).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Beta schedules by name, in the order errors list them (see register_beta_schedule)
SCHEDULES: dict[str, Callable[..., np.ndarray]] = {}
MEAN_TYPES = ("eps", "x0", "mean", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LEARNED_VAR_TYPES = ("learned", "learned_range")  # the network outputs the variance as well as the mean

# Largest beta kept by the `cosine` and `jsd` schedules (improved DDPM section 3.2):
# beta = 1 would make alpha-bar_T = 0 and the eps -> x_0 conversion infinite.
MAX_BETA = 0.999

# A denoiser: x_t [B, ...] and integer timesteps t [B] in [0, T) -> C or 2C output channels.
ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def check_types(mean_type: str | None = None, var_type: str | None = None) -> None:
    """Raise a ValueError naming the allowed values for an unknown mean or variance type."""
    if mean_type is not None and mean_type not in MEAN_TYPES:
        raise ValueError(f"unknown model_mean_type {mean_type!r}; allowed: {', '.join(MEAN_TYPES)}")
    if var_type is not None and var_type not in VAR_TYPES:
        raise ValueError(f"unknown model_var_type {var_type!r}; allowed: {', '.join(VAR_TYPES)}")


class Schedule(NamedTuple):
    """Per-timestep coefficients of the diffusion, each a float32 array of shape [T]."""

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    log_one_minus_alphas_cumprod: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray
    sqrt_recipm1_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def register_beta_schedule(name: str, betas: Callable[..., np.ndarray]) -> None:
    """Make ``name`` a schedule of :func:`get_beta_schedule` (and of ``config.diffusion.schedule``):
    ``betas(T, *, beta_start, beta_end, cosine_s)`` -> float64 [T] in (0, 1), taking the keywords it
    uses and ``**_`` for the others."""
    if name in SCHEDULES:
        raise ValueError(f"a beta schedule named {name!r} is registered already")
    SCHEDULES[name] = betas


def _linear(T, *, beta_start, beta_end, **_):
    """beta_start to beta_end linearly (DDPM section 4: 1e-4 to 0.02)."""
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def _linear_scaled(T, *, beta_start, beta_end, **_):
    """``linear`` with both ends scaled by 1000 / T (improved DDPM's ``linear``, their section 3.2), so
    that any T keeps about the a-bar_T of T = 1000; not diffusers' ``scaled_linear``, which is ``quad``."""
    scale = 1000 / T
    if scale * beta_end >= 1:
        raise ValueError(f"schedule 'linear_scaled' needs T > 1000 * beta_end = {1000 * beta_end:g} "
                         f"(its last beta, 1000 / T * beta_end, must stay below 1), got T = {T}")
    return np.linspace(scale * beta_start, scale * beta_end, T, dtype=np.float64)


def _quad(T, *, beta_start, beta_end, **_):
    """sqrt(beta) linear from sqrt(beta_start) to sqrt(beta_end)."""
    return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2


def _cosine(T, *, cosine_s, **_):
    """Improved DDPM eq. 17: a-bar_t = f(t) / f(0) with f(t) = cos((t / T + s) / (1 + s) pi / 2)^2."""
    steps = np.arange(T + 1, dtype=np.float64) / T
    alpha_bar = np.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], MAX_BETA)


def _const(T, *, beta_end, **_):
    return np.full(T, beta_end, dtype=np.float64)


def _jsd(T, **_):
    """1/T, 1/(T-1), ..., 1."""
    return np.minimum(1.0 / np.linspace(T, 1, T, dtype=np.float64), MAX_BETA)


def _warmup(fraction: float):
    """beta_end after a linear warmup from beta_start over the first ``fraction`` of the timesteps."""

    def warmup_betas(T, *, beta_start, beta_end, **_):
        betas = np.full(T, beta_end, dtype=np.float64)
        warmup = int(T * fraction)
        betas[:warmup] = np.linspace(beta_start, beta_end, warmup, dtype=np.float64)
        return betas

    return warmup_betas


register_beta_schedule("linear", _linear)
register_beta_schedule("linear_scaled", _linear_scaled)
register_beta_schedule("quad", _quad)
register_beta_schedule("cosine", _cosine)
register_beta_schedule("const", _const)
register_beta_schedule("jsd", _jsd)
register_beta_schedule("warmup10", _warmup(0.1))
register_beta_schedule("warmup50", _warmup(0.5))


def get_beta_schedule(
    name: str,
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
) -> np.ndarray:
    """Betas of a schedule of :data:`SCHEDULES` as float64 [T].

    ``linear``, ``quad``, ``const``, ``jsd``, ``warmup10``, ``warmup50`` are the schedules
    of the DDPM code (``get_beta_schedule``); ``cosine`` is improved DDPM eq. 17 with offset
    ``s`` and betas capped at 0.999, and ``linear_scaled`` their linear schedule (the betas of
    ``linear`` times 1000 / T). ``jsd`` (1/T, 1/(T-1), ..., 1) is capped the same way.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)):
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps}")
    if name not in SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    T = int(num_timesteps)
    betas = SCHEDULES[name](T, beta_start=beta_start, beta_end=beta_end, cosine_s=cosine_s)
    betas = np.asarray(betas, dtype=np.float64)
    if betas.shape != (T,):
        raise ValueError(f"beta schedule {name!r} gave betas of shape {betas.shape}, not [T] = [{T}]")
    return betas


def schedule_from_betas(betas) -> Schedule:
    """The table of DDPM's ``GaussianDiffusion2`` for any betas in (0, 1), shape [T]."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f"betas must be a 1-D array with T >= 1 entries, got shape {betas.shape}")
    bad = np.flatnonzero(~((betas > 0) & (betas < 1)))
    if bad.size:
        raise ValueError(
            f"betas must lie in the open interval (0, 1); betas[{bad[0]}] = {float(betas[bad[0]])} "
            f"({bad.size} entries out of range)"
        )
    table = _table(np, betas, np.log1p(-betas))
    return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in table.items()})


def _table(xp, betas, log_alphas) -> dict:
    """The coefficients of DDPM eqs. 4 and 6-7 from beta_t and log alpha_t = log(1 - beta_t), in ``xp``.

    alpha is exp(log alpha), 1 - a-bar is -expm1(log a-bar) and log(1 - a-bar) is log1p(-a-bar)
    where a-bar < 1/2, so that all three keep float32 precision at either end of the chain,
    where beta is near 0 and where it is near 1.
    """
    alphas = xp.exp(log_alphas)
    log_alphas_cumprod = xp.cumsum(log_alphas)
    alphas_cumprod = xp.exp(log_alphas_cumprod)
    one_minus = -xp.expm1(log_alphas_cumprod)
    alphas_cumprod_prev = xp.concatenate([xp.ones_like(betas[:1]), alphas_cumprod[:-1]])
    one_minus_prev = xp.concatenate([xp.zeros_like(betas[:1]), one_minus[:-1]])
    posterior_variance = betas * one_minus_prev / one_minus
    # beta~_1 = 0, so the log is clipped by repeating beta~_2 (T = 1 has only beta~_1 = 0
    # and keeps log beta_1, the only variance the single step can have).
    first = posterior_variance[1:2] if betas.shape[0] > 1 else betas[:1]
    return dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=xp.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=xp.sqrt(one_minus),
        log_one_minus_alphas_cumprod=xp.where(
            alphas_cumprod < 0.5, xp.log1p(-alphas_cumprod), xp.log(one_minus)
        ),
        sqrt_recip_alphas_cumprod=xp.exp(-0.5 * log_alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=xp.sqrt(one_minus / alphas_cumprod),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=xp.log(xp.concatenate([first, posterior_variance[1:]])),
        posterior_mean_coef1=betas * xp.sqrt(alphas_cumprod_prev) / one_minus,
        posterior_mean_coef2=one_minus_prev * xp.sqrt(alphas) / one_minus,
    )


def respace(sched: Schedule, timesteps) -> Schedule:
    """The diffusion restricted to increasing ``timesteps`` (improved DDPM section 4).

    Entry i has a-bar of ``timesteps[i]`` and beta = 1 - a-bar_{t_i} / a-bar_{t_{i-1}} (a-bar
    before the first is 1), both from the sum of log(1 - beta) over the skipped steps, so that
    betas near 0 and near 1 keep their float32 precision. Traceable.
    """
    timesteps = check_timesteps(timesteps, sched.num_timesteps)
    segments = np.searchsorted(timesteps, np.arange(timesteps[-1] + 1))  # step s -> its entry
    log_alphas = jax.ops.segment_sum(
        jnp.log1p(-sched.betas[: timesteps[-1] + 1]), segments, num_segments=len(timesteps)
    )
    return Schedule(**_table(jnp, -jnp.expm1(log_alphas), log_alphas))


def check_timesteps(timesteps, num_timesteps: int) -> np.ndarray:
    """``timesteps`` as an int32 array, refused unless strictly increasing within [0, T)."""
    ts = np.asarray(timesteps)
    if ts.ndim != 1 or ts.size < 1 or not np.issubdtype(ts.dtype, np.integer):
        raise ValueError(f"timesteps must be a non-empty 1-D list of integers, got {timesteps!r}")
    if ts[0] < 0 or ts[-1] >= num_timesteps or np.any(np.diff(ts) <= 0):
        raise ValueError(
            f"timesteps must increase strictly within [0, {num_timesteps}), got {ts.tolist()}"
        )
    return ts.astype(np.int32)


def make_schedule(name: str = "linear", num_timesteps: int = 1000, **kwargs) -> Schedule:
    """The table for a named schedule (see :func:`get_beta_schedule` for ``kwargs``)."""
    return schedule_from_betas(get_beta_schedule(name, num_timesteps, **kwargs))


def extract(a: jnp.ndarray, t: jnp.ndarray, x_shape) -> jnp.ndarray:
    """``a[t]`` for integer timesteps ``t`` [B], shaped [B, 1, ..., 1] to broadcast with x."""
    if t.ndim != 1 or t.shape[0] != x_shape[0]:
        raise ValueError(f"timesteps must have shape [B] = [{x_shape[0]}], got {t.shape}")
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"timesteps must be integers in [0, T), got dtype {t.dtype}")
    return a[t].reshape((x_shape[0],) + (1,) * (len(x_shape) - 1))


def q_mean_variance(sched: Schedule, x0, t):
    """Mean, variance and log-variance of q(x_t | x_0) (DDPM eq. 4)."""
    mean = extract(sched.sqrt_alphas_cumprod, t, x0.shape) * x0
    variance = extract(1.0 - sched.alphas_cumprod, t, x0.shape)
    log_variance = extract(sched.log_one_minus_alphas_cumprod, t, x0.shape)
    return mean, variance, log_variance


def q_sample(sched: Schedule, x0, t, noise):
    """A draw of x_t ~ q(x_t | x_0) (DDPM eq. 4): sqrt(a-bar_t) x_0 + sqrt(1 - a-bar_t) eps."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {noise.shape} differs from x0 shape {x0.shape}")
    return (
        extract(sched.sqrt_alphas_cumprod, t, x0.shape) * x0
        + extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
    )


def q_posterior_mean_variance(sched: Schedule, x0, x_t, t):
    """Mean mu~_t, variance beta~_t and clipped log beta~_t of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7)."""
    mean = (
        extract(sched.posterior_mean_coef1, t, x_t.shape) * x0
        + extract(sched.posterior_mean_coef2, t, x_t.shape) * x_t
    )
    variance = extract(sched.posterior_variance, t, x_t.shape)
    log_variance = extract(sched.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance


def predict_x0_from_eps(sched: Schedule, x_t, t, eps):
    """x_0 = (x_t - sqrt(1 - a-bar_t) eps) / sqrt(a-bar_t), eq. 4 solved for x_0."""
    return (
        extract(sched.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
        - extract(sched.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
    )


def predict_eps_from_x0(sched: Schedule, x_t, t, x0):
    """eps = (x_t - sqrt(a-bar_t) x_0) / sqrt(1 - a-bar_t), eq. 4 solved for eps."""
    return (
        extract(sched.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0
    ) / extract(sched.sqrt_recipm1_alphas_cumprod, t, x_t.shape)


def predict_x0_from_mean(sched: Schedule, x_t, t, mean):
    """x_0 from the posterior mean mu~_t (eq. 7 solved for x_0): (mu~ - coef2 x_t) / coef1."""
    coef1 = extract(sched.posterior_mean_coef1, t, x_t.shape)
    coef2 = extract(sched.posterior_mean_coef2, t, x_t.shape)
    return (mean - coef2 * x_t) / coef1


def predict_x0_from_v(sched: Schedule, x_t, t, v):
    """x_0 = sqrt(a-bar_t) x_t - sqrt(1 - a-bar_t) v (Salimans & Ho 2022, section 4)."""
    return (
        extract(sched.sqrt_alphas_cumprod, t, x_t.shape) * x_t
        - extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
    )


def predict_eps_from_v(sched: Schedule, x_t, t, v):
    """eps = sqrt(1 - a-bar_t) x_t + sqrt(a-bar_t) v: with :func:`predict_x0_from_v`, the rotation
    (x_t, v) -> (x_0, eps) by the angle of (sqrt(a-bar_t), sqrt(1 - a-bar_t)), with no division."""
    return (
        extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t
        + extract(sched.sqrt_alphas_cumprod, t, x_t.shape) * v
    )


def get_v(sched: Schedule, x0, t, eps):
    """The v target: sqrt(a-bar_t) eps - sqrt(1 - a-bar_t) x_0 (Salimans & Ho 2022)."""
    return (
        extract(sched.sqrt_alphas_cumprod, t, x0.shape) * eps
        - extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0
    )


def predict_x0(sched: Schedule, x_t, t, model_mean_output, mean_type: str):
    """x_0 implied by the mean part of the model's output under ``mean_type``."""
    check_types(mean_type=mean_type)
    if mean_type == "x0":
        return model_mean_output
    convert = {"eps": predict_x0_from_eps, "mean": predict_x0_from_mean, "v": predict_x0_from_v}
    return convert[mean_type](sched, x_t, t, model_mean_output)


def training_target(sched: Schedule, x0, x_t, t, noise, mean_type: str):
    """What a network of ``mean_type`` is trained to output for (x_0, x_t, noise)."""
    check_types(mean_type=mean_type)
    if mean_type == "eps":
        return noise
    if mean_type == "x0":
        return x0
    if mean_type == "mean":
        return q_posterior_mean_variance(sched, x0, x_t, t)[0]
    return get_v(sched, x0, t, noise)


def output_channels(channels: int, var_type: str) -> int:
    """The network's output channels for images of ``channels``: 2C when it learns the variance too."""
    return channels * (2 if var_type in LEARNED_VAR_TYPES else 1)


def split_model_output(model_output, x_t, var_type: str):
    """Split [B, ..., C] or [B, ..., 2C] output into (mean part, variance part or None)."""
    check_types(var_type=var_type)
    learned = var_type in LEARNED_VAR_TYPES
    expected = x_t.shape[:-1] + (output_channels(x_t.shape[-1], var_type),)
    if model_output.shape != expected:
        raise ValueError(
            f"model output has shape {model_output.shape}; var_type {var_type!r} with x_t of "
            f"shape {x_t.shape} needs {expected}"
        )
    if not learned:
        return model_output, None
    mean_out, var_out = jnp.split(model_output, 2, axis=-1)
    return mean_out, var_out


def model_log_variance(sched: Schedule, var_out, x_t, t, var_type: str):
    """log sigma_t^2 of p(x_{t-1} | x_t) for each ``var_type`` (DDPM section 3.2; iDDPM eq. 15).

    ``fixed_large`` uses beta_t except at t = 0, where it takes log beta~_2 (the original
    code's choice, for a better decoder likelihood); ``learned_range`` interpolates between
    log beta~_t (clipped) and log beta_t with the network's v in [-1, 1].
    """
    check_types(var_type=var_type)
    if var_type == "fixed_small":
        log_var = extract(sched.posterior_log_variance_clipped, t, x_t.shape)
    elif var_type == "fixed_large":
        log_betas = jnp.log(sched.betas).at[0].set(sched.posterior_log_variance_clipped[0])
        log_var = extract(log_betas, t, x_t.shape)
    elif var_type == "learned":
        return var_out
    else:  # learned_range
        min_log = extract(sched.posterior_log_variance_clipped, t, x_t.shape)
        max_log = extract(jnp.log(sched.betas), t, x_t.shape)
        frac = (var_out + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log
    return jnp.broadcast_to(log_var, x_t.shape)


class PMeanVariance(NamedTuple):
    """The reverse step p(x_{t-1} | x_t) = N(mean, exp(log_variance)) and its x_0 prediction."""

    mean: jnp.ndarray
    log_variance: jnp.ndarray
    pred_x0: jnp.ndarray


def p_mean_variance(
    sched: Schedule,
    model_output,
    x_t,
    t,
    *,
    mean_type: str,
    var_type: str,
    clip_x0: bool,
) -> PMeanVariance:
    """mu_theta(x_t, t) and Sigma_theta(x_t, t) of p(x_{t-1} | x_t) (DDPM eq. 1, section 3.2).

    The mean is the posterior mean (eq. 7) at the predicted x_0, clipped to [-1, 1] when
    ``clip_x0``; a ``mean`` network's output is used as the mean directly, as in the
    original code.
    """
    check_types(mean_type, var_type)
    mean_out, var_out = split_model_output(model_output, x_t, var_type)
    pred_x0 = predict_x0(sched, x_t, t, mean_out, mean_type)
    if clip_x0:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    if mean_type == "mean":
        mean = mean_out
    else:
        mean = q_posterior_mean_variance(sched, pred_x0, x_t, t)[0]
    log_variance = model_log_variance(sched, var_out, x_t, t, var_type)
    return PMeanVariance(mean, log_variance, pred_x0)
