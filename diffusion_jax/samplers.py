"""Samplers: DDPM ancestral sampling, generalized DDIM, DPM-Solver++, Karras et al.'s Euler and Heun (EDM),
DDIM inversion and interpolation.

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

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import schedule as sch
from diffusion_jax.spacings import DPM_SOLVER_SKIPS, SPACINGS


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
        raise ValueError(f"x_T must be a batch [B, ...] of at least 2 dimensions, got "
                         f"{getattr(x_T, 'shape', x_T)}")
    if needs_rng and rng is None:
        raise ValueError("rng is required: this sampler adds noise (pass a jax.random key)")


def dynamic_threshold(pred_x0, ratio: float):
    """Dynamic thresholding (Saharia et al. 2022, Imagen; as DPM-Solver++ applies it): per sample,
    s = max(1, the ``ratio`` quantile of |x_0|), and x_0 clipped to [-s, s] and divided by s, so that
    the large x_0 predictions of strong guidance are pulled back into [-1, 1] without saturating."""
    flat = jnp.abs(pred_x0.reshape(pred_x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, ratio, axis=1), 1.0).reshape((-1,) + (1,) * (pred_x0.ndim - 1))
    return jnp.clip(pred_x0, -s, s) / s


def _eps_and_x0(model_fn, sched, x, t, *, mean_type, var_type, clip_x0):
    """The model's eps and x_0 predictions at (x, t); eps is recomputed from a clipped x_0."""
    mean_out, _ = sch.split_model_output(model_fn(x, t), x, var_type)
    if mean_type == "eps" and not clip_x0:
        return mean_out, sch.predict_x0_from_eps(sched, x, t, mean_out)
    if mean_type == "v" and not clip_x0:
        return sch.predict_eps_from_v(sched, x, t, mean_out), sch.predict_x0_from_v(sched, x, t, mean_out)
    pred_x0 = sch.predict_x0(sched, x, t, mean_out, mean_type)
    if clip_x0:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    return sch.predict_eps_from_x0(sched, x, t, pred_x0), pred_x0


def _reverse_loop(step, x_T, timesteps: np.ndarray, record: Sequence[int], state=()) -> Samples:
    """Runs ``step(x, state, i) -> (x_prev, state, pred_x0)`` for i = n-1, ..., 0 in one scan, recording."""
    record = list(record)
    missing = [r for r in record if r not in set(timesteps.tolist())]
    if missing:
        raise ValueError(f"record timesteps {missing} are not among the sampled timesteps "
                         f"{timesteps.tolist()}")
    slot = np.full(len(timesteps), len(record), np.int32)  # out of range: not recorded
    for k, r in enumerate(record):
        slot[int(np.flatnonzero(timesteps == r)[0])] = k
    slot = jnp.asarray(slot)
    buffer = jnp.zeros((len(record),) + x_T.shape, x_T.dtype)

    def body(carry, i):
        x, state, xs, x0s = carry
        x_prev, state, pred_x0 = step(x, state, i)
        if record:
            xs = xs.at[slot[i]].set(x, mode="drop")
            x0s = x0s.at[slot[i]].set(pred_x0, mode="drop")
        return (x_prev, state, xs, x0s), None

    indices = jnp.arange(len(timesteps) - 1, -1, -1, dtype=jnp.int32)
    (images, _, xs, x0s), _ = jax.lax.scan(body, (x_T, state, buffer, buffer), indices)
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

    def step(x, state, i):
        out = model_fn(x, jnp.full((batch,), model_t[i], jnp.int32))
        p = sch.p_mean_variance(
            chain, out, x, jnp.full((batch,), i, jnp.int32), mean_type=mean_type, var_type=var_type,
            clip_x0=clip_x0,
        )
        noise = jax.random.normal(jax.random.fold_in(rng, model_t[i]), x.shape, x.dtype)
        return p.mean + (i > 0) * jnp.exp(0.5 * p.log_variance) * noise, state, p.pred_x0

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

    def step(x, state, i):
        t = jnp.full((batch,), model_t[i], jnp.int32)
        eps, pred_x0 = _eps_and_x0(model_fn, sched, x, t, mean_type=mean_type, var_type=var_type,
                                   clip_x0=clip_x0)
        var = eta**2 * chain.posterior_variance[i]  # sigma^2 of eq. 16, beta~ of the subsequence
        direction = jnp.sqrt(jnp.maximum(one_minus_prev[i] - var, 0.0))
        x_prev = jnp.sqrt(chain.alphas_cumprod_prev[i]) * pred_x0 + direction * eps
        if eta > 0:
            x_prev += jnp.sqrt(var) * jax.random.normal(jax.random.fold_in(rng, model_t[i]), x.shape, x.dtype)
        return x_prev, state, pred_x0

    return _reverse_loop(step, x_T, steps, record)


def dpm_solver_timesteps(sched: sch.Schedule, num_steps: int, skip_type: str = "logSNR") -> np.ndarray:
    """Increasing timesteps of an S-step DPM-Solver run, T - 1 down to 0 (Lu et al. 2022a, section 3.3).

    DPM-Solver's discrete time is t = (n + 1) / T for timestep n. ``logSNR``: S points uniform
    in lambda_t = log(alpha_t / sigma_t) from lambda_{T-1} to lambda_0, mapped to timesteps
    by interpolating lambda linearly between integer timesteps (the paper's recommendation and
    diffusers' ``use_lu_lambdas``); ``time_uniform``: uniform in t; ``time_quadratic``: uniform
    in sqrt(t). Points are rounded to integer timesteps, where discrete models are trained;
    a point that rounds onto another is dropped, so S close to T can give fewer steps.
    """
    T = sched.num_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be an integer in [1, T = {T}], got {num_steps!r}")
    if skip_type == "logSNR":
        lam = log_snr(sched, np)
        points = np.interp(np.linspace(lam[-1], lam[0], num_steps), lam[::-1], np.arange(T - 1, -1, -1.0))
    elif skip_type == "time_uniform":
        points = np.linspace(T - 1, 0, num_steps)
    elif skip_type == "time_quadratic":
        points = np.linspace(1.0, np.sqrt(1.0 / T), num_steps) ** 2 * T - 1
    else:
        raise ValueError(f"unknown skip_type {skip_type!r}; allowed: {', '.join(DPM_SOLVER_SKIPS)}")
    return np.unique(np.round(points).astype(np.int32))


def log_snr(sched: sch.Schedule, xp=jnp):
    """lambda_t = log(alpha_t / sigma_t) = (log a-bar_t - log(1 - a-bar_t)) / 2 [T], decreasing in t.

    ``xp=np`` computes it on the host in float64 (a schedule of concrete arrays), also under ``jit``.
    """
    to = (lambda a: np.asarray(a, np.float64)) if xp is np else jnp.asarray
    return 0.5 * (xp.log(to(sched.alphas_cumprod)) - to(sched.log_one_minus_alphas_cumprod))


def _dpm_solver_coefficients(sched: sch.Schedule, steps: np.ndarray, order: int, lower_order_final: bool,
                             singlestep: bool = False):
    """Per step i (from timestep s = steps[i] to t = steps[i-1], or to x_0 at i = 0): c [n], w [n, 3]
    and from_start [n] with x_t = c x_ref + w_0 D(s) + w_1 D(previous) + w_2 D(the one before), D the
    data predictions and x_ref = x_s, or the previous step's start where ``from_start``.

    DPM-Solver++ (Lu et al. 2022b) with h = lambda_t - lambda_s, phi = e^{-h} - 1 and
    r_k = (k-th previous step's h) / h: order 1 is x_t = sigma_t / sigma_s x_s - alpha_t phi D_0
    (DDIM); order 2 adds -alpha_t phi / 2 * D1 with D1 = (D_0 - D_1) / r_0 (Algorithm 2,
    multistep 2M); order 3 adds alpha_t (phi / h + 1) D1' - alpha_t ((phi + h) / h^2 - 1/2) D2
    with the divided differences of the authors' 3M code, here expanded into weights of D_0,
    D_1, D_2. The first steps use the orders their history allows; the step to x_0 (h = inf) is
    first order, and with ``lower_order_final`` and fewer than 15 steps the last two are at
    most first and second order (the authors' and diffusers' stabilisation of few-step runs).

    ``singlestep`` (order 2 only) is DPM-Solver++(2S) (Algorithm 1) on pairs of steps, as
    diffusers' singlestep scheduler: a first-order step s_1 -> s_0, then from s_1 again to t with
    h = lambda_t - lambda_{s_1}, r_0 = (lambda_{s_0} - lambda_{s_1}) / h and
    x_t = sigma_t / sigma_{s_1} x_{s_1} - alpha_t phi (D(s_1) + (D(s_0) - D(s_1)) / (2 r_0)); on
    log-SNR-uniform steps s_0 is the pair's midpoint in lambda, the paper's r = 1/2.
    """
    n = len(steps)
    k = np.arange(n - 1, -1, -1)  # steps taken before step i
    if singlestep:
        orders = 1 + k % 2
    else:
        orders = np.minimum(order, k + 1)
        if lower_order_final and n < 15:
            orders = np.minimum(orders, n - k)
    orders[0] = 1
    lam = log_snr(sched)[steps]
    alpha, sigma = sched.sqrt_alphas_cumprod[steps], sched.sqrt_one_minus_alphas_cumprod[steps]
    alpha_t = jnp.concatenate([jnp.ones((1,)), alpha[:-1]])
    sigma_t = jnp.concatenate([jnp.zeros((1,)), sigma[:-1]])
    h = jnp.concatenate([jnp.ones((1,)), lam[:-1] - lam[1:]])  # h of step 0 is infinite: unused below
    phi = jnp.concatenate([-jnp.ones((1,)), jnp.expm1(-h[1:])])
    h_prev = jnp.concatenate([h[1:], jnp.ones((1,))])  # the step before i is step i + 1
    r0 = h_prev / h
    r1 = jnp.concatenate([h_prev[1:], jnp.ones((1,))]) / h
    base = -alpha_t * phi
    second = jnp.stack([base * (1 + 0.5 / r0), -0.5 * base / r0, jnp.zeros(n)], axis=1)
    a = alpha_t * (phi / h + 1)  # weight of the first divided difference
    b = -alpha_t * ((phi + h) / h**2 - 0.5)  # weight of the second
    u = (a * (1 + r0 / (r0 + r1)) + b / (r0 + r1)) / r0  # per unit of D_0 - D_1
    v = (-a * r0 / (r0 + r1) - b / (r0 + r1)) / r1  # per unit of D_1 - D_2
    third = jnp.stack([base + u, v - u, -v], axis=1)
    first = jnp.stack([base, jnp.zeros(n), jnp.zeros(n)], axis=1)
    o = jnp.asarray(orders)[:, None]
    w = jnp.where(o == 1, first, jnp.where(o == 2, second, third))
    c = sigma_t / sigma
    from_start = np.asarray(singlestep & (orders == 2))
    if singlestep:  # the second step of a pair spans both: h and phi from the pair's start
        sigma_start = jnp.concatenate([sigma[1:], jnp.ones((1,))])
        h_pair = h + h_prev
        phi_pair = jnp.expm1(-h_pair)
        r = h_prev / h_pair
        pair = jnp.stack([-0.5 * alpha_t * phi_pair / r, -alpha_t * phi_pair * (1 - 0.5 / r), jnp.zeros(n)],
                         axis=1)
        w = jnp.where(from_start[:, None], pair, w)
        c = jnp.where(from_start, sigma_t / sigma_start, c)
    return c, w, jnp.asarray(from_start)


def dpm_solver_sample(
    model_fn: sch.ModelFn,
    sched: sch.Schedule,
    x_T,
    *,
    timesteps,
    mean_type: str,
    var_type: str,
    order: int = 2,
    singlestep: bool = False,
    clip_x0: bool = False,
    threshold: float = 0.0,
    lower_order_final: bool = True,
    record: Sequence[int] = (),
) -> Samples:
    """DPM-Solver++ multistep of ``order`` 1, 2 (2M) or 3 (3M) on increasing ``timesteps`` (Lu et al. 2022b),
    or with ``singlestep`` its 2S on pairs of timesteps.

    Solves the diffusion ODE in lambda = log(alpha / sigma) with the model's x_0 prediction
    (data prediction) at each timestep and one model evaluation per timestep, reusing the
    previous ones; the last step goes to x_0 (a-bar = 1), as DDIM's and diffusers'
    ``final_sigmas_type='zero'``. Order 1 is DDIM with eta = 0. ``clip_x0`` clips the x_0
    predictions (DPM-Solver++'s thresholding with ratio 1); ``threshold`` > 0 applies
    :func:`dynamic_threshold` at that ratio instead. See :func:`dpm_solver_timesteps` for step
    selection and :func:`_dpm_solver_coefficients` for the update.
    """
    sch.check_types(mean_type, var_type)
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3 (DPM-Solver++ 2M: 2, 3M: 3), got {order!r}")
    if singlestep and order != 2:
        raise ValueError(f"singlestep is DPM-Solver++(2S), of order 2; got order {order!r}")
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1) (0: off, 0.995 in DPM-Solver++), got {threshold!r}")
    _check_input(x_T, None, needs_rng=False)
    steps = sch.check_timesteps(timesteps, sched.num_timesteps)
    c, w, from_start = _dpm_solver_coefficients(sched, steps, order, lower_order_final, singlestep)
    model_t = jnp.asarray(steps)
    batch = x_T.shape[0]

    def step(x, history, i):
        t = jnp.full((batch,), model_t[i], jnp.int32)
        _, d0 = _eps_and_x0(model_fn, sched, x, t, mean_type=mean_type, var_type=var_type,
                            clip_x0=clip_x0 and not threshold)
        if threshold:
            d0 = dynamic_threshold(d0, threshold)
        d1, d2, x_prev_start = history
        x_ref = jnp.where(from_start[i], x_prev_start, x)
        return c[i] * x_ref + w[i, 0] * d0 + w[i, 1] * d1 + w[i, 2] * d2, (d0, d1, x), d0

    zeros = jnp.zeros_like(x_T)
    return _reverse_loop(step, x_T, steps, record, state=(zeros, zeros, zeros))


def log_sigmas(sched: sch.Schedule) -> np.ndarray:
    """log sigma_t [T] of the VP diffusion in Karras et al. 2022's form, float64 on the host, increasing in t.

    Their Table 1 writes VP as x = s(t) x~ with s(t) = sqrt(a-bar_t) and x~ ~ N(x_0, sigma(t)^2 I),
    sigma(t) = sqrt(1 / a-bar_t - 1) (the schedule's ``sqrt_recipm1_alphas_cumprod``): so
    log sigma_t = -lambda_t of :func:`log_snr`.
    """
    return -log_snr(sched, np)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """The N noise levels of Karras et al. 2022, eq. 5, float64, decreasing from sigma_max to sigma_min:

        sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i < N.

    rho = 7 (theirs) shortens the steps near sigma_min; rho = 1 is uniform in sigma, and a large rho
    nears uniform in log sigma. sigma_N = 0 is not included.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2 (eq. 5 spaces N >= 2 levels), got {num_steps!r}")
    if not 0 < rho < np.inf:
        raise ValueError(f"rho must be > 0 and finite (7 in Karras et al.), got {rho!r}")
    if not 0 < sigma_min <= sigma_max < np.inf:
        raise ValueError(f"need 0 < sigma_min <= sigma_max < inf, got {sigma_min!r} and {sigma_max!r}")
    i = np.arange(num_steps, dtype=np.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + i / (num_steps - 1) * (lo - hi)) ** rho


def sigma_to_timestep(log_sigma_t: np.ndarray, sigma) -> np.ndarray:
    """The timesteps [int32] of noise levels ``sigma`` on a schedule of increasing ``log_sigma_t`` [T]
    (:func:`log_sigmas`): t by linear interpolation in log sigma between the discrete levels (a
    fractional t), rounded to the nearest integer, which is the level nearest in log sigma; levels
    beyond the schedule's end clamp to 0 and T - 1."""
    t = np.interp(np.log(np.asarray(sigma, np.float64)), log_sigma_t, np.arange(len(log_sigma_t)))
    return np.round(t).astype(np.int32)


def edm_timesteps(sched: sch.Schedule, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Timesteps [N] of Karras et al.'s N-step sampler on ``sched``: eq. 5's sigma_i with rho between the
    schedule's own sigma_min = sigma_0 and sigma_max = sigma_{T-1}, each mapped to its nearest level
    (:func:`sigma_to_timestep`), increasing. Two sigma_i that round onto one level are kept as a
    repeated entry, which :func:`edm_sample` skips as the no-op it is (a step of length 0): N stays
    the paper's step count, and the model is evaluated at the distinct levels only.

    Why the nearest level rather than the fractional t that k-diffusion and diffusers give the
    network: a ``model_fn`` here takes integer t (the schedule's conversions and the exact denoisers
    index their tables by it), and a discrete-time network is trained at integer t only. The U-Net's
    sinusoidal embedding would take a float t (it casts t to float32), but its fastest frequency turns
    by 1 radian per timestep, so t + 1/2 is an input it never saw. Moving sigma_i itself onto the
    level, not only the t given to the network, keeps the noise level of x and the network's t the
    same, so each step is exactly Algorithm 1's, on a grid of trained levels (as
    :func:`dpm_solver_timesteps` rounds its points). Interpolating in log sigma, where eq. 5 and the
    log-SNR time of the ODE are smooth, makes the rounding the nearest level in log sigma: at most
    half a level's gap, a ratio of at most 1.22 in sigma on the linear schedule (between t = 0 and 1).
    On the cosine schedule, whose sigma_{T-1} = 2e4 is 32 times sigma_{T-2}, the top levels of eq. 5
    fall on the last timesteps: 18 levels visit 11.
    """
    log_sigma_t = log_sigmas(sched)
    sigmas = karras_sigmas(np.exp(log_sigma_t[0]), np.exp(log_sigma_t[-1]), num_steps, rho)
    return sigma_to_timestep(log_sigma_t, sigmas)[::-1].copy()


def check_churn(S_churn: float, S_tmin: float, S_tmax: float, S_noise: float) -> None:
    """A ValueError naming the first of Karras et al.'s Algorithm 2 settings out of its range."""
    if not 0 <= S_churn < np.inf:
        raise ValueError(f"S_churn must be >= 0 and finite (0: deterministic), got {S_churn!r}")
    if not 0 <= S_tmin <= S_tmax:
        raise ValueError(f"need 0 <= S_tmin <= S_tmax (the sigmas where noise is added), got S_tmin = "
                         f"{S_tmin!r} and S_tmax = {S_tmax!r}")
    if not 0 < S_noise < np.inf:
        raise ValueError(f"S_noise must be > 0 and finite (1: the exact noise), got {S_noise!r}")


def edm_sample(
    model_fn: sch.ModelFn,
    sched: sch.Schedule,
    x_T,
    *,
    timesteps,
    mean_type: str,
    var_type: str,
    second_order: bool = True,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = float("inf"),
    S_noise: float = 1.0,
    rng=None,
    clip_x0: bool = False,
    record: Sequence[int] = (),
) -> Samples:
    """Karras et al. 2022's samplers on increasing ``timesteps`` (:func:`edm_timesteps`): Algorithm 1, Heun's
    2nd-order method, or Euler's with ``second_order=False``; with ``S_churn`` > 0, Algorithm 2.

    The VP model in their form (Table 1; the ODE of eq. 4 with s(t) = 1): x = x_t / sqrt(a-bar_t) at
    sigma_t = sqrt((1 - a-bar_t) / a-bar_t), and D(x; sigma_t) the model's x_0 prediction at
    x_t = x / sqrt(1 + sigma_t^2) and the integer timestep t (eps, x0 or v through the schedule's
    conversions; clipped to [-1, 1] with ``clip_x0``). With sigma_i the levels of the timesteps, from
    T - 1 down, and sigma_N = 0, step i is

        d_i = (x_i - D(x_i; sigma_i)) / sigma_i,   x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i      (Euler)
        x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d_i + d'_i) / 2,  d'_i = (x_{i+1} - D(x_{i+1}; sigma_{i+1}))
                  / sigma_{i+1}, except at the last step (sigma_N = 0)                            (Heun)

    so N distinct levels cost 2N - 1 model evaluations (Heun) or N (Euler, which is DDIM with eta = 0
    on the same timesteps). x_T is x_t at T - 1 and is returned as x_0; recorded states are x_t.

    Algorithm 2 first raises the level of x_i to sigma^_i = (1 + gamma_i) sigma_i with
    gamma_i = min(S_churn / N, sqrt(2) - 1) where S_tmin <= sigma_i <= S_tmax (else 0), N the length
    of ``timesteps``, by adding sqrt(sigma^_i^2 - sigma_i^2) S_noise z with z = normal(fold_in(rng,
    t_i)) (this module's convention), then steps from sigma^_i. The network is trained at integer
    timesteps only, and is evaluated only there: sigma^_i is rounded to the level nearest in log
    sigma (:func:`sigma_to_timestep`), whose sigma is used for both the noise added and the step (a
    level that rounds onto t_i adds no noise). These levels are chosen on the host: with churn,
    ``sched`` must be concrete (closed over, not an argument of the jitted function). S_churn = 0
    traces the deterministic sampler unchanged.
    """
    sch.check_types(mean_type, var_type)
    check_churn(S_churn, S_tmin, S_tmax, S_noise)
    _check_input(x_T, rng, needs_rng=S_churn > 0)
    num_steps = len(np.asarray(timesteps))  # the paper's N, repeated levels included
    steps = _distinct(timesteps, sched.num_timesteps)
    sigma = sched.sqrt_recipm1_alphas_cumprod[steps]
    sigma_next = jnp.concatenate([jnp.zeros((1,)), sigma[:-1]])  # sigma_{i+1}: the level below, 0 after t_0
    level_next = jnp.asarray(np.concatenate([[0], steps[:-1]]), jnp.int32)  # its timestep (unused at i = 0)
    to_x_t = jnp.concatenate([jnp.ones((1,)), sched.sqrt_alphas_cumprod[steps[:-1]]])  # x_t = sqrt(a-bar) x
    levels = model_t = jnp.asarray(steps)  # t_i, and the timestep the model is evaluated at
    churn = S_churn > 0
    if churn:
        log_sigma_t = log_sigmas(sched)
        sigma_t = np.exp(log_sigma_t)
        gamma = np.where((S_tmin <= sigma_t[steps]) & (sigma_t[steps] <= S_tmax),
                         min(S_churn / num_steps, np.sqrt(2) - 1), 0.0)
        hat = np.maximum(sigma_to_timestep(log_sigma_t, (1 + gamma) * sigma_t[steps]), steps)
        noise_std = jnp.asarray(S_noise * np.sqrt(sigma_t[hat] ** 2 - sigma_t[steps] ** 2), jnp.float32)
        model_t, sigma_hat = jnp.asarray(hat), sched.sqrt_recipm1_alphas_cumprod[hat]
    batch = x_T.shape[0]

    def denoise(x, level):
        t = jnp.full((batch,), level, jnp.int32)
        return _eps_and_x0(model_fn, sched, x * sched.sqrt_alphas_cumprod[level], t, mean_type=mean_type,
                           var_type=var_type, clip_x0=clip_x0)[1]

    def step(x_t, state, i):
        x = x_t * sched.sqrt_recip_alphas_cumprod[levels[i]]  # x_t / sqrt(a-bar_t)
        sigma_from = sigma[i]
        if churn:
            noise = jax.random.normal(jax.random.fold_in(rng, levels[i]), x.shape, x.dtype)
            x, sigma_from = x + noise_std[i] * noise, sigma_hat[i]
        denoised = denoise(x, model_t[i])
        d = (x - denoised) / sigma_from
        x_next = x + (sigma_next[i] - sigma_from) * d
        if second_order:
            def heun(x_next):
                d_next = (x_next - denoise(x_next, level_next[i])) / sigma_next[i]
                return x + (sigma_next[i] - sigma_from) * (0.5 * d + 0.5 * d_next)

            x_next = jax.lax.cond(i > 0, heun, lambda x_next: x_next, x_next)
        return to_x_t[i] * x_next, state, denoised

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
