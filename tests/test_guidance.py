"""Classifier-free guidance against the exact denoisers of a 2-D mixture whose components are the classes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analytic, guidance
from diffusion_jax import samplers as SM
from diffusion_jax import schedule as S

WEIGHTS = np.array([0.5, 0.3, 0.2])
MEANS = np.array([[0.5, 0.5], [-0.5, 0.3], [0.0, -0.6]])
STDS = np.array([0.1, 0.15, 0.05])
NULL = 3  # the "no class" label
TYPES = dict(mean_type="eps", var_type="fixed_large")
N = 1500  # samples of each class


def setup():
    sched = S.make_schedule()
    return sched, analytic.class_conditional_eps(sched, WEIGHTS, MEANS, STDS**2)


def sample(name, sched, conditional, y, w, x_T):
    model_fn = guidance.guided(conditional, y, w, NULL)
    if name == "ddpm":
        return SM.ddpm_sample(model_fn, sched, x_T, jax.random.PRNGKey(1), **TYPES).images
    steps = SM.ddim_timesteps(1000, 100, "quad") if name == "ddim" else SM.dpm_solver_timesteps(
        sched, 20, "logSNR")
    run = SM.ddim_sample if name == "ddim" else SM.dpm_solver_sample
    return run(model_fn, sched, x_T, timesteps=steps, **TYPES).images


def test_the_exact_conditional_eps_is_each_component_and_the_null_label_the_mixture():
    sched, conditional = setup()
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 2))
    t = jnp.full((8,), 300)
    for k in range(3):
        component = analytic.gaussian_mixture_eps(sched, [1.0], MEANS[k:k + 1], STDS[k:k + 1] ** 2)
        np.testing.assert_allclose(conditional(x, t, jnp.full((8,), k)), component(x, t), rtol=1e-6)
    mixture = analytic.gaussian_mixture_eps(sched, WEIGHTS, MEANS, STDS**2)
    np.testing.assert_allclose(conditional(x, t, jnp.full((8,), NULL)), mixture(x, t), rtol=1e-6)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm_solver++"])
def test_unguided_samples_of_a_class_are_its_component(name):
    x_T = jax.random.normal(jax.random.PRNGKey(2), (3 * N, 2))
    y = jnp.repeat(jnp.arange(3), N)
    sched, conditional = setup()  # outside jit: its arrays are constants of the traced sampler
    x = np.asarray(jax.jit(functools.partial(sample, name, sched, conditional, w=0.0))(y, x_T=x_T),
                   np.float64)
    for k in range(3):
        part = x[k * N:(k + 1) * N]
        se = STDS[k] / np.sqrt(N)
        assert np.all(np.abs(part.mean(0) - MEANS[k]) < 3 * se + 1e-3), (k, part.mean(0))
        np.testing.assert_allclose(part.std(0).mean(), STDS[k], rtol=0.1)


def test_a_guided_ddim_step_is_eq_6_in_float64():
    sched, conditional = setup()
    steps = SM.ddim_timesteps(1000, 10, "uniform")
    x_T = jax.random.normal(jax.random.PRNGKey(3), (64, 2))
    y = jnp.arange(64) % 3
    w = 2.0
    ours = np.asarray(SM.ddim_sample(guidance.guided(conditional, y, w, NULL), sched, x_T, timesteps=steps,
                                     **TYPES).images)
    with jax.enable_x64(True):
        sched64 = S.Schedule(*[jnp.asarray(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), jnp.float64)
                               if f == "alphas_cumprod" else jnp.asarray(getattr(sched, f), jnp.float64)
                               for f in S.Schedule._fields])
        exact = analytic.class_conditional_eps(sched64, WEIGHTS, MEANS, STDS**2)
        x = jnp.asarray(x_T, jnp.float64)
        a_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
        previous = [None] + list(steps[:-1])
        for t, t_prev in zip(steps[::-1], previous[::-1], strict=True):
            tt = jnp.full((64,), t)
            eps = (1 + w) * exact(x, tt, y) - w * exact(x, tt, jnp.full((64,), NULL))  # eq. 6
            x0 = (x - np.sqrt(1 - a_bar[t]) * eps) / np.sqrt(a_bar[t])
            a_prev = a_bar[t_prev] if t_prev is not None else 1.0
            x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps  # DDIM eq. 12, eta 0
        np.testing.assert_allclose(ours, np.asarray(x), atol=1e-5)


def test_stronger_guidance_puts_fewer_samples_nearer_another_class():
    """Components wide enough to overlap (std 0.35): at w = 0 some samples of a class lie nearer
    another class's mean, fewer as w grows."""
    sched = S.make_schedule()
    overlapping = analytic.class_conditional_eps(sched, WEIGHTS, MEANS, np.full(3, 0.35**2))
    x_T = jax.random.normal(jax.random.PRNGKey(4), (3 * 500, 2))
    y = np.repeat(np.arange(3), 500)
    wrong = []
    for w in (0.0, 1.0, 4.0):
        x = np.asarray(sample("ddim", sched, overlapping, jnp.asarray(y), w, x_T), np.float64)
        nearest = np.argmin(((x[:, None] - MEANS[None]) ** 2).sum(-1), axis=1)
        wrong.append(float(np.mean(nearest != y)))
    assert wrong[0] > wrong[1] > wrong[2] or wrong[1] == wrong[2] == 0, wrong
    assert wrong[0] > 0, wrong  # the components overlap enough at w = 0 for the test to mean something


def test_guided_uses_one_forward_at_w_0_and_two_batched_otherwise():
    calls = []

    def model_fn(x_t, t, y):
        calls.append(x_t.shape[0])
        return jnp.concatenate([x_t * (1 + y[:, None]), x_t], axis=-1)  # 2C channels: a learned variance

    x, t, y = jnp.ones((4, 2)), jnp.zeros(4, jnp.int32), jnp.array([0, 1, 2, 0])
    np.testing.assert_allclose(guidance.guided(model_fn, y, 0.0, NULL)(x, t)[:, 0], 1 + y)
    out = guidance.guided(model_fn, y, 0.5, NULL)(x, t)
    assert calls == [4, 8]
    np.testing.assert_allclose(out[:, 0], 1.5 * (1 + y) - 0.5 * (1 + NULL))  # the mean channels, eq. 6
    np.testing.assert_allclose(out[:, 2:], x)  # the variance channels: the conditional pass's
    with pytest.raises(ValueError, match="guidance scale w must be >= 0"):
        guidance.guided(model_fn, y, -1.0, NULL)
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 3\) \(3: no class\), got \[0, 4\]"):
        guidance.guided(model_fn, jnp.array([0, 4]), 1.0, NULL)
