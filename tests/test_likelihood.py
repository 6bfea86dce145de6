"""NLL in bits/dim: the bound against its closed form for Gaussian data, and on the quickstart model."""

import jax
import numpy as np
import pytest
from numpy.polynomial.hermite_e import hermegauss
from scipy.special import log_ndtr

from diffusion_jax import analytic, builders, checkpoints, input_pipeline, losses, train_lib
from diffusion_jax import schedule as S
from diffusion_jax.evaluation import likelihood

MU, VAR = 0.1, 0.25  # the data distribution N(MU, VAR) per pixel, known to the exact denoiser


def log_mass(lower, upper):
    """log(Phi(upper) - Phi(lower)) without underflow in either tail."""
    flip = lower > 0  # in the upper tail, use the mirror image: Phi(-lower) - Phi(-upper)
    lo, hi = np.where(flip, -upper, lower), np.where(flip, -lower, upper)
    return log_ndtr(hi) + np.log1p(-np.exp(log_ndtr(lo) - log_ndtr(hi)))


def expected_bound(sched, x0, var_type):
    """E over the noise of the bound (DDPM eq. 5) in bits/dim for the exact denoiser of N(MU, VAR) data.

    For Gaussian data E[x_0 | x_t] = MU + k_t (x_t - sqrt(a_t) MU), k_t = VAR sqrt(a_t) / (a_t VAR + 1 - a_t),
    so the model mean is linear in x_t and each KL term's expectation is closed-form:
    x_0 - x0_hat = (x_0 - MU)(1 - k_t sqrt(a_t)) - k_t sqrt(1 - a_t) eps. The decoder term is a 1-D
    integral over eps per pixel, done by Gauss-Hermite quadrature.
    """
    tab = {k: np.asarray(v, np.float64) for k, v in sched._asdict().items()}
    a, c1 = tab["alphas_cumprod"], tab["posterior_mean_coef1"]
    k = VAR * np.sqrt(a) / (a * VAR + 1 - a)
    t_all = np.arange(len(a))
    log_sigma2 = np.asarray(S.model_log_variance(sched, None, np.zeros((len(a), 1)), t_all, var_type))[:, 0]
    sigma2 = np.exp(log_sigma2.astype(np.float64))
    mean_sq = c1[:, None] ** 2 * ((x0 - MU) ** 2 * (1 - k[:, None] * np.sqrt(a[:, None])) ** 2
                                  + (k ** 2 * (1 - a))[:, None])  # [T, D], E[(mu~ - mu_theta)^2]
    post_var = tab["posterior_variance"][:, None]
    kl = 0.5 * (log_sigma2[:, None] - tab["posterior_log_variance_clipped"][:, None]
                + post_var / sigma2[:, None] - 1 + mean_sq / sigma2[:, None])
    terms = kl.mean(axis=1) / np.log(2)  # [T] bits/dim
    # t = 0: -log of the discretized Gaussian (DDPM eq. 13) at the model mean x0_hat(x_1)
    z, w = hermegauss(120)  # nodes for E over eps ~ N(0, 1)
    w = w / w.sum()
    x1 = np.sqrt(a[0]) * x0[:, None] + np.sqrt(1 - a[0]) * z[None]
    mean0 = MU + k[0] * (x1 - np.sqrt(a[0]) * MU)
    sigma0 = np.sqrt(sigma2[0])
    upper = np.where(x0[:, None] > 0.999, np.inf, (x0[:, None] + 1 / 255 - mean0) / sigma0)
    lower = np.where(x0[:, None] < -0.999, -np.inf, (x0[:, None] - 1 / 255 - mean0) / sigma0)
    terms[0] = -(log_mass(lower, upper) @ w).mean() / np.log(2)
    prior = np.mean(0.5 * (-np.log(1 - a[-1]) + (1 - a[-1]) + a[-1] * x0 ** 2 - 1)) / np.log(2)
    return terms.sum() + prior


@pytest.mark.parametrize("var_type", ["fixed_large", "fixed_small"])
def test_bound_of_the_exact_gaussian_denoiser_matches_its_closed_form(var_type):
    sched = S.make_schedule("linear", 1000)
    x0 = np.random.default_rng(0).integers(0, 256, 48) / 127.5 - 1.0  # one image on the pixel grid
    copies = 2048  # the same image under independent noise: a Monte Carlo mean of the bound
    eps_fn = analytic.gaussian_mixture_eps(sched, [1.0], [MU], [VAR])
    bound = jax.jit(lambda x, key: losses.bits_per_dim(eps_fn, sched, x, key, mean_type="eps",
                                                       var_type=var_type, clip_x0=False).total)
    totals = np.asarray(bound(np.tile(x0, (copies, 1)).astype(np.float32), jax.random.PRNGKey(1)), np.float64)
    mean, stderr = totals.mean(), totals.std(ddof=1) / np.sqrt(copies)
    expected = expected_bound(sched, x0, var_type)
    assert stderr < 2e-3 * expected  # precise enough that a wrong term would show
    assert abs(mean - expected) < 4 * stderr, (mean, expected, stderr)


def test_quickstart_model_has_finite_nll_below_the_untrained_network(quickstart_workdir):
    config, params, _ = checkpoints.load(workdir=quickstart_workdir)
    d = config.data
    images = input_pipeline.load(d.name, d.eval_split, image_size=d.image_size)[:16]
    rng, bound = jax.random.PRNGKey(0), likelihood.Bound(  # compiled once for both
        builders.apply_fn(builders.make_model(config)), builders.make_schedule(config), batch_size=16,
        **builders.output_types(config))
    trained = bound(params, images, rng)
    untrained = bound(train_lib.Trainer(config).init(jax.random.PRNGKey(0)).params, images, rng)
    print(f"quickstart NLL on 16 test digits: trained {trained.mean:.3f} +- {trained.stderr:.3f} bits/dim, "
          f"untrained {untrained.mean:.3f} +- {untrained.stderr:.3f}")
    assert np.all(np.isfinite(trained.bpd)) and np.all(np.isfinite(untrained.bpd))
    assert trained.mean + 5 * trained.stderr < untrained.mean, (trained.mean, untrained.mean)
    assert trained.terms.shape == trained.rmse.shape == (config.diffusion.num_timesteps,)
    np.testing.assert_allclose(trained.rate()[0], trained.mean, rtol=1e-5)  # all bits received at t = 0
    assert np.all(np.diff(trained.rate()) <= 0)


def test_nll_refuses_a_batch_size_the_devices_do_not_divide():
    with pytest.raises(ValueError, match="multiple of the"):
        likelihood.Bound(None, None, mean_type="eps", var_type="fixed_large", batch_size=0)
