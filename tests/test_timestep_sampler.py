"""Importance sampling of t for L_vlb (improved DDPM section 3.3) on the exact denoiser."""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import analytic, losses
from diffusion_jax import schedule as S
from diffusion_jax import timestep_sampler as TS


def test_history_keeps_the_last_values_and_stays_uniform_until_full():
    hist = TS.update(TS.init_history(3, history=2), jnp.array([0, 0, 0, 1, 1, 2]),
                     jnp.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    np.testing.assert_array_equal(hist.losses, [[2, 3], [4, 5], [6, 0]])
    np.testing.assert_array_equal(hist.counts, [2, 2, 1])
    np.testing.assert_allclose(TS.probabilities(hist), [1 / 3] * 3)
    hist = TS.update(hist, jnp.array([2]), jnp.array([8.0]))
    rms = np.sqrt([(4 + 9) / 2, (16 + 25) / 2, (36 + 64) / 2])
    expected = rms / rms.sum() * (1 - 1e-3) + 1e-3 / 3
    np.testing.assert_allclose(TS.probabilities(hist), expected, rtol=1e-6)
    t, weights = TS.sample(hist, jax.random.PRNGKey(0), 4096)
    np.testing.assert_allclose(weights, 1 / (3 * expected[np.asarray(t)]), rtol=1e-6)
    np.testing.assert_allclose(np.bincount(np.asarray(t), minlength=3) / 4096, expected, atol=0.03)


def test_importance_sampled_bound_has_the_uniform_expectation_and_lower_variance():
    """Per-pixel data on the 8-bit grid (point masses), its exact eps, the true bound's terms L_t."""
    T, batch = 100, 64
    sched = S.make_schedule("cosine", T)
    grid = np.round((np.array([-0.6, 0.1, 0.7]) + 1) * 127.5) / 127.5 - 1
    weights = np.array([0.3, 0.5, 0.2])
    eps_fn = analytic.gaussian_mixture_eps(sched, weights, grid, np.zeros(3))

    def data(rng, n):
        return jnp.asarray(grid, jnp.float32)[jax.random.choice(rng, 3, (n, 4, 4, 1), p=jnp.asarray(weights))]

    @jax.jit
    def terms(rng, t):
        data_rng, noise_rng = jax.random.split(rng)
        x0 = data(data_rng, t.shape[0])
        noise = jax.random.normal(noise_rng, x0.shape)
        return losses.losses_at(eps_fn, sched, x0, t, noise, loss_type="kl", mean_type="eps",
                                var_type="fixed_small")

    @jax.jit
    def training_step(hist, rng):  # what a training step does with the history
        t_rng, rng = jax.random.split(rng)
        t, _ = TS.sample(hist, t_rng, batch)
        return TS.update(hist, t, terms(rng, t))

    hist = TS.init_history(T)
    for i in range(60):
        hist = training_step(hist, jax.random.PRNGKey(i))
    assert bool(jnp.all(hist.counts == 10)), "the history should be full after 3,840 draws"
    p = TS.probabilities(hist)
    assert float(p.max() / p.min()) > 10  # the bound's terms differ a lot: p is far from uniform

    n = 16384
    t_is, w = TS.sample(hist, jax.random.PRNGKey(100), n)
    importance = np.asarray(w * terms(jax.random.PRNGKey(101), t_is), np.float64)
    t_u = jax.random.randint(jax.random.PRNGKey(102), (n,), 0, T)
    uniform = np.asarray(terms(jax.random.PRNGKey(103), t_u), np.float64)
    se = np.sqrt(importance.var() / n + uniform.var() / n)
    print(f"\nL_vlb / T: importance {importance.mean():.5f} (var {importance.var():.3g}), "
          f"uniform {uniform.mean():.5f} (var {uniform.var():.3g}), SE of the difference {se:.2g}")
    assert abs(importance.mean() - uniform.mean()) < 4 * se
    assert importance.var() < 0.5 * uniform.var()
