"""Objectives and the bound in bits/dim against closed forms and the exact denoiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from diffusion_jax import analytic
from diffusion_jax import losses as L
from diffusion_jax import schedule as S

GRID = -1 + 2 * np.arange(256) / 255  # the 8-bit data values on [-1, 1]


def test_normal_kl_closed_form():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=100), rng.normal(size=100)
    s1, s2 = rng.uniform(0.1, 3, size=100), rng.uniform(0.1, 3, size=100)
    expected = np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    got = L.normal_kl(m1, 2 * np.log(s1), m2, 2 * np.log(s2))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(L.normal_kl(m1, 2 * np.log(s1), m1, 2 * np.log(s1)), 0.0, atol=1e-6)
    assert np.all(np.asarray(got) > 0)


@pytest.mark.parametrize("scale", [1e-3, 0.01, 0.3, 5.0])
def test_decoder_bins_match_the_gaussian_and_sum_to_one(scale):
    rng = np.random.default_rng(1)
    means = rng.uniform(-1.2, 1.2, size=7)
    x = np.broadcast_to(GRID[None, :], (7, 256))
    m = np.broadcast_to(means[:, None], x.shape)
    log_p = L.discretized_gaussian_log_likelihood(
        jnp.asarray(x, jnp.float32), jnp.asarray(m, jnp.float32),
        jnp.full(x.shape, np.log(scale), jnp.float32)
    )
    edges = np.concatenate([[-np.inf], GRID[:-1] + 1 / 255, [np.inf]])
    expected = np.diff(norm.cdf((edges[None, :] - means[:, None]) / scale), axis=1)
    np.testing.assert_allclose(np.exp(log_p).sum(axis=1), 1.0, atol=1e-5)
    big = expected > 1e-6  # bins with non-negligible mass agree in relative terms
    np.testing.assert_allclose(np.exp(log_p)[big], expected[big], rtol=2e-3 if scale < 0.01 else 2e-4)
    assert np.all(np.isfinite(log_p))


def test_vb_terms_kl_decoder_and_prior():
    sched = S.make_schedule("linear", 100)
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x0 = jnp.asarray(np.random.default_rng(2).choice(GRID, size=(3, 2, 2, 1)), jnp.float32)
    x_t = jax.random.normal(k[0], x0.shape)
    out = x0 + 0.02 * jax.random.normal(k[1], x0.shape)  # an x_0 prediction near the data
    t = jnp.array([0, 1, 60])
    bpd, _ = L.vb_terms_bpd(sched, out, x0, x_t, t, mean_type="x0", var_type="fixed_small", clip_x0=False)
    ref_sched = {f: np.asarray(getattr(sched, f), np.float64) for f in S.Schedule._fields}
    for i, ti in enumerate(np.asarray(t)):
        c1, c2 = ref_sched["posterior_mean_coef1"][ti], ref_sched["posterior_mean_coef2"][ti]
        mu_q = c1 * np.asarray(x0[i]) + c2 * np.asarray(x_t[i])
        mu_p = c1 * np.asarray(out[i]) + c2 * np.asarray(x_t[i])
        s = np.sqrt(np.exp(ref_sched["posterior_log_variance_clipped"][ti]))
        if ti == 0:
            lo = np.where(np.asarray(x0[i]) < -0.999, -np.inf, np.asarray(x0[i]) - 1 / 255)
            hi = np.where(np.asarray(x0[i]) > 0.999, np.inf, np.asarray(x0[i]) + 1 / 255)
            expected = -np.mean(np.log(norm.cdf((hi - mu_p) / s) - norm.cdf((lo - mu_p) / s))) / np.log(2)
        else:  # equal variances: KL = (mu_q - mu_p)^2 / (2 s^2)
            expected = np.mean((mu_q - mu_p) ** 2 / (2 * s**2)) / np.log(2)
        np.testing.assert_allclose(bpd[i], expected, rtol=1e-4)

    ab_T = ref_sched["alphas_cumprod"][-1]
    m = np.sqrt(ab_T) * np.asarray(x0)
    prior = np.mean(0.5 * (m**2 + (1 - ab_T) - 1 - np.log(1 - ab_T)), axis=(1, 2, 3)) / np.log(2)
    np.testing.assert_allclose(L.prior_bpd(sched, x0), prior, rtol=1e-4, atol=1e-7)


def _original_decoder_nll_bpd(x, means, log_scales, cdf):
    """-log p(x) in bits/dim of the DDPM code's ``discretized_gaussian_log_likelihood`` (float64, [B]),
    each probability floored at 1e-12, with the normal CDF ``cdf``."""
    inv_stdv = np.exp(-log_scales)
    cdf_plus, cdf_min = cdf(inv_stdv * (x - means + 1 / 255)), cdf(inv_stdv * (x - means - 1 / 255))
    log_p = np.where(x < -0.999, np.log(np.maximum(cdf_plus, 1e-12)),
                     np.where(x > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)),
                              np.log(np.maximum(cdf_plus - cdf_min, 1e-12))))
    return -log_p.reshape(len(x), -1).mean(axis=1) / np.log(2)


def _tanh_cdf(z):
    """The DDPM code's ``approx_standard_normal_cdf``."""
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


def test_decoder_term_of_a_badly_wrong_mean_is_the_original_codes():
    """An x_0 prediction of -x_0 at t = 0 (fixed variance): most pixels are tens of sigma from their
    bin, where the original codes floor the probability at 1e-12, bounding the term by 39.9 bits/dim."""
    sched = S.make_schedule("linear", 1000)
    x0 = np.random.default_rng(3).choice(GRID, size=(4, 8, 8, 3))
    t = jnp.zeros((4,), jnp.int32)
    x_t = S.q_sample(sched, jnp.asarray(x0, jnp.float32), t, jnp.zeros(x0.shape, jnp.float32))
    bpd, _ = L.vb_terms_bpd(sched, jnp.asarray(-x0, jnp.float32), jnp.asarray(x0, jnp.float32), x_t, t,
                            mean_type="x0", var_type="fixed_large", clip_x0=False)
    p = S.p_mean_variance(sched, jnp.asarray(-x0, jnp.float32), x_t, t, mean_type="x0",
                          var_type="fixed_large", clip_x0=False)
    means, log_scales = np.asarray(p.mean, np.float64), 0.5 * np.asarray(p.log_variance, np.float64)
    exact = _original_decoder_nll_bpd(x0, means, log_scales, norm.cdf)
    np.testing.assert_allclose(bpd, exact, rtol=1e-5)
    # the original's own figure, whose tanh CDF floors a few more tail bins (0.12% here)
    np.testing.assert_allclose(bpd, _original_decoder_nll_bpd(x0, means, log_scales, _tanh_cdf), rtol=2e-3)
    assert np.all(np.asarray(bpd) < -np.log2(1e-12))


def test_the_floor_leaves_a_fitting_decoder_unchanged():
    """Means within 3 sigma of the data at the t = 0 sigma of the linear schedule: the term equals the
    unfloored float64 one within 1e-6 bits/dim."""
    sched = S.make_schedule("linear", 1000)
    rng = np.random.default_rng(4)
    x0 = rng.choice(GRID, size=(4, 8, 8, 3))
    log_scale = 0.5 * float(sched.posterior_log_variance_clipped[0])
    means = x0 + np.exp(log_scale) * rng.uniform(-3, 3, size=x0.shape)
    got = -np.asarray(L.mean_flat(L.discretized_gaussian_log_likelihood(
        jnp.asarray(x0, jnp.float32), jnp.asarray(means, jnp.float32),
        jnp.full(x0.shape, log_scale, jnp.float32)))) / np.log(2)
    lo = np.where(x0 < -0.999, -np.inf, x0 - 1 / 255)
    hi = np.where(x0 > 0.999, np.inf, x0 + 1 / 255)
    z_lo, z_hi = (lo - means) / np.exp(log_scale), (hi - means) / np.exp(log_scale)
    unfloored = -np.log(norm.cdf(z_hi) - norm.cdf(z_lo)).reshape(4, -1).mean(axis=1) / np.log(2)
    np.testing.assert_allclose(got, unfloored, atol=1e-6)


@pytest.mark.parametrize("mean_type", S.MEAN_TYPES)
def test_l_simple_is_zero_for_an_oracle_and_positive_otherwise(mean_type):
    """The target of each parameterization is what the loss compares the output with."""
    sched = S.make_schedule("linear", 50)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    x0 = jax.random.uniform(k1, (6, 4, 4, 2), minval=-1, maxval=1)
    noise = jax.random.normal(k2, x0.shape)
    t = jax.random.randint(k3, (6,), 0, 50)
    oracle = lambda x_t, t_: S.training_target(sched, x0, x_t, t_, noise, mean_type)  # noqa: E731
    kwargs = dict(loss_type="mse", mean_type=mean_type, var_type="fixed_large")
    np.testing.assert_allclose(L.losses_at(oracle, sched, x0, t, noise, **kwargs), 0.0, atol=1e-10)
    off = lambda x_t, t_: oracle(x_t, t_) + 0.5  # noqa: E731
    np.testing.assert_allclose(L.losses_at(off, sched, x0, t, noise, **kwargs), 0.25, rtol=1e-5)


def test_l_simple_of_the_exact_denoiser_equals_its_analytic_value():
    """Data N(mu, s^2): the optimal eps-loss at t is Var(eps | x_t) = a s^2 / (a s^2 + 1 - a)."""
    sched = S.make_schedule()
    mu, s = 0.1, 0.5
    denoiser = analytic.gaussian_mixture_eps(sched, [1.0], [mu], [s**2])
    k1, k2 = jax.random.split(jax.random.PRNGKey(4))
    x0 = mu + s * jax.random.normal(k1, (8192, 4, 4, 1))
    loss = jax.jit(
        lambda x, r: L.training_losses(denoiser, sched, x, r, loss_type="mse", mean_type="eps",
                                       var_type="fixed_large")
    )(x0, k2)
    a = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    expected = np.mean(a * s**2 / (a * s**2 + 1 - a))
    assert abs(float(loss.mean()) - expected) < 3 * float(loss.std()) / np.sqrt(loss.size)
    # at a fixed t the per-pixel Monte-Carlo average is tight
    t = jnp.full((8192,), 20)
    noise = jax.random.normal(k2, x0.shape)
    at_t = L.losses_at(denoiser, sched, x0, t, noise, loss_type="mse", mean_type="eps",
                       var_type="fixed_large")
    np.testing.assert_allclose(at_t.mean(), a[20] * s**2 / (a[20] * s**2 + 1 - a[20]), rtol=0.02)


def test_bits_per_dim_of_the_exact_denoiser_is_just_above_the_entropy():
    """8-bit data from N(0, 0.3^2): the bound is >= the data's entropy (7.30 bits/dim) and,
    with the exact denoiser, within 0.15 bits of it (measured 7.43); a poor denoiser is far off."""
    sched = S.make_schedule()
    s = 0.3
    edges = np.concatenate([[-np.inf], GRID[:-1] + 1 / 255, [np.inf]])
    p = np.diff(norm.cdf(edges / s))
    entropy = -np.sum(p * np.log2(p))
    x0 = jnp.asarray(np.random.default_rng(5).choice(GRID, size=(2048, 4, 4, 1), p=p), jnp.float32)
    exact = analytic.gaussian_mixture_eps(sched, [1.0], [0.0], [s**2])
    bpd = jax.jit(lambda fn, x: L.bits_per_dim(fn, sched, x, jax.random.PRNGKey(6), mean_type="eps",
                                               var_type="fixed_large"), static_argnums=0)
    result = bpd(exact, x0)
    total = np.asarray(result.total, np.float64)
    se = total.std() / np.sqrt(total.size)
    assert entropy - 3 * se < total.mean() < entropy + 0.15
    np.testing.assert_allclose(result.total, result.terms.sum(1) + result.prior, rtol=1e-6)
    assert result.terms.shape == (2048, 1000) and result.x0_mse.shape == (2048, 1000)
    assert float(result.x0_mse[:, 0].mean()) < 1e-3 < float(result.x0_mse[:, -1].mean())
    wrong = analytic.gaussian_mixture_eps(sched, [1.0], [0.0], [0.6**2])
    assert float(bpd(wrong, x0).total.mean()) > entropy + 0.3


def test_bits_per_dim_is_one_loop_whatever_T():
    """The bound compiles to one scan: the program does not grow with the number of steps."""
    x0 = jnp.zeros((2, 4, 4, 1))

    def program_size(T):
        sched = S.make_schedule("linear", T)
        fn = lambda x, t: x  # noqa: E731
        jaxpr = jax.make_jaxpr(
            lambda x: L.bits_per_dim(fn, sched, x, jax.random.PRNGKey(0), mean_type="eps",
                                     var_type="fixed_large")
        )(x0)
        return len(jaxpr.eqns), str(jaxpr).count("scan[")

    assert program_size(10) == program_size(1000)
    assert program_size(1000)[1] == 1


def test_hybrid_stops_the_mean_gradient_of_the_bound_term():
    sched = S.make_schedule("cosine", 100)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(7), 3)
    x0 = jax.random.uniform(k1, (4, 4, 4, 1), minval=-1, maxval=1)
    noise = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 5, 50, 99])
    base = jax.random.normal(k3, (4, 4, 4, 2))

    def loss(out, loss_type):
        kw = dict(loss_type=loss_type, mean_type="eps", var_type="learned_range")
        return L.losses_at(lambda x_t, t_: out, sched, x0, t, noise, **kw).sum()

    g_hybrid = jax.grad(loss)(base, "hybrid")
    g_mse = jax.grad(lambda o: jnp.sum(L.mean_flat(jnp.square(o[..., :1] - noise))))(base)
    np.testing.assert_allclose(g_hybrid[..., :1], g_mse[..., :1], rtol=1e-5)  # mean: MSE only
    assert float(jnp.abs(g_hybrid[..., 1:]).sum()) > 0  # variance: the bound
    g_kl = jax.grad(loss)(base, "kl")
    assert float(jnp.abs(g_kl[..., :1]).sum()) > 0  # the bound alone does train the mean
    lam = 1e-3 * 100  # lambda * T
    vb = L.losses_at(lambda x_t, t_: base, sched, x0, t, noise, loss_type="kl", mean_type="eps",
                     var_type="learned_range")
    mse = L.mean_flat(jnp.square(base[..., :1] - noise))
    hybrid = L.losses_at(lambda x_t, t_: base, sched, x0, t, noise, loss_type="hybrid", mean_type="eps",
                         var_type="learned_range")
    np.testing.assert_allclose(hybrid, mse + lam * vb, rtol=1e-5)
    rescaled = L.losses_at(lambda x_t, t_: base, sched, x0, t, noise, loss_type="rescaled_kl",
                           mean_type="eps", var_type="learned_range")
    np.testing.assert_allclose(rescaled, 100 * vb, rtol=1e-6)  # improved DDPM's L_vlb = T * L_{t-1}
    g_rescaled, g_expected = jax.grad(loss)(base, "rescaled_kl"), 100 * g_kl
    np.testing.assert_allclose(g_rescaled, g_expected, rtol=1e-5,  # to float32 rounding of the largest
                               atol=1e-6 * float(jnp.abs(g_expected).max()))


@pytest.mark.parametrize(
    "loss_type, var_type, message",
    [
        ("l2", "fixed_large", "unknown loss_type 'l2'; allowed: mse, kl, rescaled_kl, hybrid"),
        ("hybrid", "fixed_small", "loss_type 'hybrid' trains a learned variance"),
        ("mse", "learned", "gives no gradient to the variance"),
    ],
)
def test_bad_loss_settings_are_refused(loss_type, var_type, message):
    sched = S.make_schedule("linear", 10)
    x0 = jnp.zeros((2, 2, 2, 1))
    with pytest.raises(ValueError, match=message):
        L.training_losses(lambda x, t: x, sched, x0, jax.random.PRNGKey(0), loss_type=loss_type,
                          mean_type="eps", var_type=var_type)
