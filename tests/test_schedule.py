"""Schedules, q and its posterior against float64 computations from the DDPM equations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import schedule as S


def reference_table(betas):
    """The DDPM quantities written term by term from the paper (float64, explicit products)."""
    T = len(betas)
    ab = np.array([math.prod(1.0 - b for b in betas[: i + 1]) for i in range(T)])
    ab_prev = np.array([1.0] + list(ab[:-1]))
    post_var = np.array([(1 - ab_prev[i]) / (1 - ab[i]) * betas[i] for i in range(T)])  # eq. 7
    return dict(
        betas=betas,
        alphas=1 - betas,
        alphas_cumprod=ab,
        alphas_cumprod_prev=ab_prev,
        sqrt_alphas_cumprod=ab**0.5,
        sqrt_one_minus_alphas_cumprod=(1 - ab) ** 0.5,
        log_one_minus_alphas_cumprod=np.log(1 - ab),
        sqrt_recip_alphas_cumprod=ab**-0.5,
        sqrt_recipm1_alphas_cumprod=(1 / ab - 1) ** 0.5,
        posterior_variance=post_var,
        posterior_log_variance_clipped=np.log([post_var[1]] + list(post_var[1:])),
        posterior_mean_coef1=ab_prev**0.5 * betas / (1 - ab),  # eq. 7
        posterior_mean_coef2=(1 - betas) ** 0.5 * (1 - ab_prev) / (1 - ab),
    )


def cosine_betas(T, s=0.008):
    f = [math.cos((i / T + s) / (1 + s) * math.pi / 2) ** 2 for i in range(T + 1)]
    return np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(T)])


EXPECTED_BETAS = {
    "linear": lambda T: np.array([1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]),
    "quad": lambda T: np.array([(0.01 + (0.02**0.5 - 0.01) * i / (T - 1)) ** 2 for i in range(T)]),
    "const": lambda T: np.full(T, 0.02),
    "jsd": lambda T: np.array([min(1.0 / (T - i), 0.999) for i in range(T)]),
    "warmup10": lambda T: np.array(
        [1e-4 + (0.02 - 1e-4) * i / (T // 10 - 1) if i < T // 10 else 0.02 for i in range(T)]
    ),
    "warmup50": lambda T: np.array(
        [1e-4 + (0.02 - 1e-4) * i / (T // 2 - 1) if i < T // 2 else 0.02 for i in range(T)]
    ),
    "cosine": cosine_betas,
    "linear_scaled": lambda T: np.array([1000 / T * (1e-4 + (0.02 - 1e-4) * i / (T - 1)) for i in range(T)]),
}


@pytest.mark.parametrize("name", S.SCHEDULES)
@pytest.mark.parametrize("T", [20, 1000])
def test_table_matches_equations(name, T):
    if name == "linear_scaled" and T <= 20:  # 1000 / T * 0.02 >= 1
        with pytest.raises(ValueError, match=rf"'linear_scaled' needs T > 1000 \* beta_end = 20 .*T = {T}"):
            S.make_schedule(name, T)
        return
    sched = S.make_schedule(name, T)
    assert sched.num_timesteps == T
    expected = reference_table(EXPECTED_BETAS[name](T))
    for field in S.Schedule._fields:
        got = getattr(sched, field)
        assert got.dtype == jnp.float32 and got.shape == (T,), field
        np.testing.assert_allclose(got, expected[field], rtol=2e-6, atol=0, err_msg=field)


def improved_ddpm_steps(T, section_counts):
    """improved DDPM's respacing rule (section 4; their ``space_timesteps``): T split into equal sections
    (the first T % n one longer), in each ``count`` real numbers evenly spaced from its first to its last
    step, rounded to the nearest integer."""
    size, extra = divmod(T, len(section_counts))
    steps, start = [], 0
    for i, count in enumerate(section_counts):
        length = size + (i < extra)
        stride = (length - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += length
    return sorted(set(steps))


def test_respace_keeps_float32_precision_where_a_beta_is_near_one():
    """improved DDPM's sections [10, 15, 20] of the cosine T = 1000 chain: its last respaced beta is
    0.9999965, so alpha = 1 - beta is 3.5e-6, which 1 - beta in float32 gets 1e-3 wrong."""
    T = 1000
    steps = improved_ddpm_steps(T, [10, 15, 20])
    ab = np.cumprod(1.0 - cosine_betas(T))[steps]
    expected = reference_table(1.0 - ab / np.concatenate([[1.0], ab[:-1]]))
    chain = S.respace(S.make_schedule("cosine", T), steps)
    assert len(steps) == 45 and 1 - expected["betas"][-1] < 4e-6
    for field in S.Schedule._fields:
        np.testing.assert_allclose(getattr(chain, field), expected[field], rtol=5e-5, atol=0, err_msg=field)


def test_user_betas_and_tiny_T():
    sched = S.schedule_from_betas([0.1, 0.2, 0.3])
    np.testing.assert_allclose(sched.alphas_cumprod, [0.9, 0.72, 0.504], rtol=1e-6)
    one = S.schedule_from_betas([0.5])  # T = 1: one step straight to the prior
    assert one.num_timesteps == 1
    np.testing.assert_allclose(one.posterior_log_variance_clipped, [np.log(0.5)], rtol=1e-6)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: S.make_schedule("cosinus"), "unknown beta schedule 'cosinus'; allowed: linear"),
        (lambda: S.make_schedule("linear", 0), "num_timesteps must be an integer >= 1"),
        (lambda: S.make_schedule("linear", 2.5), "num_timesteps must be an integer >= 1"),
        (lambda: S.schedule_from_betas([0.1, 0.0]), r"open interval \(0, 1\); betas\[1\] = 0.0"),
        (lambda: S.schedule_from_betas([0.1, 1.0]), r"betas\[1\] = 1.0"),
        (lambda: S.schedule_from_betas([-0.1, 0.2]), r"betas\[0\] = -0.1"),
        (lambda: S.schedule_from_betas([]), "T >= 1"),
        (lambda: S.schedule_from_betas([[0.1]]), "1-D"),
        (lambda: S.make_schedule("linear", 10, beta_end=2.0), r"betas\[5\] = 1.11"),
    ],
)
def test_bad_schedules_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_timesteps_and_types_are_refused():
    sched = S.make_schedule("linear", 10)
    x = jnp.zeros((2, 4, 4, 1))
    with pytest.raises(ValueError, match="timesteps must have shape"):
        S.q_sample(sched, x, jnp.array([1]), x)
    with pytest.raises(ValueError, match="integers"):
        S.q_sample(sched, x, jnp.array([1.0, 2.0]), x)
    with pytest.raises(ValueError, match="noise shape"):
        S.q_sample(sched, x, jnp.array([1, 2]), x[:, :2])
    with pytest.raises(ValueError, match="unknown model_mean_type 'xstart'; allowed: eps, x0, mean, v"):
        S.p_mean_variance(sched, x, x, jnp.array([1, 2]), mean_type="xstart", var_type="fixed_small",
                          clip_x0=True)
    with pytest.raises(ValueError, match="unknown model_var_type 'fixedlarge'"):
        S.p_mean_variance(sched, x, x, jnp.array([1, 2]), mean_type="eps", var_type="fixedlarge",
                          clip_x0=True)
    with pytest.raises(ValueError, match=r"needs \(2, 4, 4, 2\)"):
        S.p_mean_variance(sched, x, x, jnp.array([1, 2]), mean_type="eps", var_type="learned", clip_x0=True)


def test_q_sample_monte_carlo_moments():
    """x_t = sqrt(a-bar) x_0 + sqrt(1 - a-bar) eps has mean sqrt(a-bar) x_0, var 1 - a-bar (eq. 4)."""
    sched = S.make_schedule()
    n, ts = 200_000, np.array([0, 10, 250, 999])
    x0 = jnp.broadcast_to(jnp.array([0.7, -0.3, 0.0, 1.0])[:, None], (4, n))
    noise = jax.random.normal(jax.random.PRNGKey(0), (4, n))
    x_t = jax.jit(S.q_sample)(sched, x0, jnp.asarray(ts), noise)
    ab = reference_table(EXPECTED_BETAS["linear"](1000))["alphas_cumprod"][ts]
    mean, var = np.mean(x_t, 1), np.var(x_t, 1)
    se_mean, se_var = np.sqrt((1 - ab) / n), (1 - ab) * np.sqrt(2 / n)
    assert np.all(np.abs(mean - np.sqrt(ab) * x0[:, 0]) < 4 * se_mean)
    assert np.all(np.abs(var - (1 - ab)) < 4 * se_var)


@pytest.mark.parametrize("t", [1, 5, 500, 999])
def test_posterior_is_consistent_with_the_forward_process(t):
    """x_{t-1} ~ q(x_{t-1}|x_0) then x_t ~ q(x_t|x_{t-1}) has x_t ~ q(x_t|x_0), and regressing
    x_{t-1} on x_t gives back the posterior mean and variance of eqs. 6-7; conversely, x_t ~
    q(x_t|x_0) then x_{t-1} ~ q(x_{t-1}|x_t,x_0) has the moments of q(x_{t-1}|x_0)."""
    sched = S.make_schedule()
    n, x0 = 400_000, 0.6
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(t), 3)
    tb = jnp.full((1,), t)
    x0a = jnp.full((1, n), x0)
    ab = np.float64(sched.alphas_cumprod[t])
    ab_prev = np.float64(sched.alphas_cumprod[t - 1])
    beta = np.float64(sched.betas[t])

    x_prev = S.q_sample(sched, x0a, tb - 1, jax.random.normal(k1, (1, n)))[0]
    x_t = np.sqrt(1 - beta) * x_prev + np.sqrt(beta) * jax.random.normal(k2, (n,))
    assert abs(np.mean(x_t) - np.sqrt(ab) * x0) < 4 * np.sqrt((1 - ab) / n)
    assert abs(np.var(x_t) / (1 - ab) - 1) < 4 * np.sqrt(2 / n)
    slope, intercept = np.polyfit(np.asarray(x_t, np.float64), np.asarray(x_prev, np.float64), 1)
    residual = np.var(np.asarray(x_prev, np.float64) - slope * x_t - intercept)
    mean0, var, _ = S.q_posterior_mean_variance(sched, jnp.zeros((1, 1)), jnp.zeros((1, 1)), tb)
    mean1, _, _ = S.q_posterior_mean_variance(sched, jnp.zeros((1, 1)), jnp.ones((1, 1)), tb)
    coef2 = float((mean1 - mean0)[0, 0])
    assert abs(slope / coef2 - 1) < 0.02
    assert abs(residual / float(var[0, 0]) - 1) < 4 * np.sqrt(2 / n)

    x_t = S.q_sample(sched, x0a, tb, jax.random.normal(k3, (1, n)))
    mean, var, log_var = S.q_posterior_mean_variance(sched, x0a, x_t, tb)
    x_prev = mean + jnp.sqrt(var) * jax.random.normal(k1, (1, n))
    assert abs(np.mean(x_prev) - np.sqrt(ab_prev) * x0) < 4 * np.sqrt((1 - ab_prev) / n)
    assert abs(np.var(x_prev) / (1 - ab_prev) - 1) < 4 * np.sqrt(2 / n)
    np.testing.assert_allclose(np.exp(log_var), var, rtol=1e-5)


def test_posterior_formula_matches_bayes_rule():
    """Eqs. 6-7 against the product of Gaussians q(x_t|x_{t-1}) q(x_{t-1}|x_0), in float64."""
    sched = S.make_schedule("cosine", 50)
    ref = reference_table(cosine_betas(50))
    rng = np.random.default_rng(0)
    t = np.arange(1, 50)
    x0, x_t = rng.normal(size=(49, 3)), rng.normal(size=(49, 3))
    b, ab_prev = ref["betas"][t, None], ref["alphas_cumprod_prev"][t, None]
    # precision-weighted combination of N(x_t / sqrt(1-b), b/(1-b)) and N(sqrt(ab_prev) x_0, 1-ab_prev)
    p1, p2 = (1 - b) / b, 1 / (1 - ab_prev)
    var = 1 / (p1 + p2)
    mean = var * (p1 * x_t / np.sqrt(1 - b) + p2 * np.sqrt(ab_prev) * x0)
    got_mean, got_var, _ = S.q_posterior_mean_variance(sched, jnp.asarray(x0), jnp.asarray(x_t),
                                                       jnp.asarray(t))
    np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_var, np.broadcast_to(var, (49, 1)), rtol=1e-5)


@pytest.mark.parametrize("mean_type", S.MEAN_TYPES)
def test_conversions_recover_x0_and_targets(mean_type):
    """Feeding the true target of each parameterization gives back x_0 and the posterior mean."""
    sched = S.make_schedule()
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    x0 = jax.random.uniform(k1, (8, 4, 4, 3), minval=-1, maxval=1)
    noise = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 1, 2, 10, 100, 500, 900, 999])
    x_t = S.q_sample(sched, x0, t, noise)
    target = S.training_target(sched, x0, x_t, t, noise, mean_type)
    out = S.p_mean_variance(sched, target, x_t, t, mean_type=mean_type, var_type="fixed_small", clip_x0=False)
    # x_0 from eps (or from the mean) amplifies float32 rounding by 1/sqrt(a-bar) at t = 999
    np.testing.assert_allclose(out.pred_x0, x0, atol=2e-3 if mean_type in ("eps", "mean") else 2e-5)
    post_mean = S.q_posterior_mean_variance(sched, x0, x_t, t)[0]
    np.testing.assert_allclose(out.mean, post_mean, atol=2e-5)
    np.testing.assert_allclose(
        S.predict_eps_from_x0(sched, x_t, t, x0)[1:], noise[1:], atol=2e-4
    )  # t = 0 divides by sqrt(1/a-bar - 1) = 0.01


def test_v_round_trips():
    sched = S.make_schedule("cosine", 1000)
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    x0 = jax.random.uniform(k1, (5, 2, 2, 1), minval=-1, maxval=1)
    eps = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 3, 300, 700, 999])
    x_t = S.q_sample(sched, x0, t, eps)
    v = S.get_v(sched, x0, t, eps)
    np.testing.assert_allclose(S.predict_x0_from_v(sched, x_t, t, v), x0, atol=1e-5)
    np.testing.assert_allclose(S.predict_eps_from_v(sched, x_t, t, v), eps, atol=1e-5)
    # and back: the v of (x_0, eps) recovered from (x_t, v) is v, at every t (no division)
    back = S.get_v(sched, S.predict_x0_from_v(sched, x_t, t, v), t, S.predict_eps_from_v(sched, x_t, t, v))
    np.testing.assert_allclose(back, v, atol=1e-6)
    # sqrt(a-bar)^2 + sqrt(1-a-bar)^2 = 1: (x_t, v) is a rotation of (x_0, eps)
    np.testing.assert_allclose(jnp.square(x_t) + jnp.square(v), jnp.square(x0) + jnp.square(eps), rtol=1e-5)


def test_variance_types():
    sched = S.make_schedule()
    ref = reference_table(EXPECTED_BETAS["linear"](1000))
    x = jnp.zeros((4, 2, 2, 1))
    t = jnp.array([0, 1, 500, 999])

    def log_var(var_type, var_out=None):
        out = x if var_out is None else jnp.concatenate([x, var_out], -1)
        return S.p_mean_variance(sched, out, x, t, mean_type="eps", var_type=var_type,
                                 clip_x0=True).log_variance[:, 0, 0, 0]

    tt = np.asarray(t)
    np.testing.assert_allclose(log_var("fixed_small"), ref["posterior_log_variance_clipped"][tt], rtol=1e-6)
    large = np.log(ref["betas"][tt])
    large[0] = np.log(ref["posterior_variance"][1])
    np.testing.assert_allclose(log_var("fixed_large"), large, rtol=1e-6)
    learned = jax.random.normal(jax.random.PRNGKey(0), x.shape)
    np.testing.assert_array_equal(log_var("learned", learned), learned[:, 0, 0, 0])
    np.testing.assert_allclose(
        log_var("learned_range", -jnp.ones_like(x)), ref["posterior_log_variance_clipped"][tt], rtol=1e-6
    )
    np.testing.assert_allclose(log_var("learned_range", jnp.ones_like(x)), np.log(ref["betas"][tt]),
                               rtol=1e-6)
    half = 0.5 * (ref["posterior_log_variance_clipped"][tt] + np.log(ref["betas"][tt]))
    np.testing.assert_allclose(log_var("learned_range", jnp.zeros_like(x)), half, rtol=1e-6)


def test_clipping_of_predicted_x0():
    sched = S.make_schedule()
    t = jnp.array([999, 999])
    x_t = jnp.full((2, 1, 1, 1), 3.0)
    eps = jnp.zeros_like(x_t)  # predicts x_0 = x_t / sqrt(a-bar) >> 1
    clipped = S.p_mean_variance(sched, eps, x_t, t, mean_type="eps", var_type="fixed_large", clip_x0=True)
    free = S.p_mean_variance(sched, eps, x_t, t, mean_type="eps", var_type="fixed_large", clip_x0=False)
    np.testing.assert_array_equal(clipped.pred_x0, 1.0)
    assert float(free.pred_x0[0, 0, 0, 0]) > 100


def test_everything_compiles_under_jit():
    sched = S.make_schedule("cosine", 100)
    x0 = jnp.linspace(-1, 1, 2 * 16).reshape(2, 4, 4, 1)
    t = jnp.array([0, 99])
    eager = S.p_mean_variance(sched, x0, x0, t, mean_type="v", var_type="fixed_large", clip_x0=True)
    jitted = jax.jit(S.p_mean_variance, static_argnames=("mean_type", "var_type", "clip_x0"))(
        sched, x0, x0, t, mean_type="v", var_type="fixed_large", clip_x0=True
    )
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
