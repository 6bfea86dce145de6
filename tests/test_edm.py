"""Karras et al. 2022's samplers (euler, heun, heun_churn) against a float64 NumPy transcription of their
Algorithms 1 and 2 on the exact denoiser of a Gaussian mixture; their registration, NFE and config checks."""

import functools
import json

import jax
import numpy as np
import pytest
import scripts
import tiny_config

from benchmarks import sampler_quality
from diffusion_jax import analytic, sampler_registry
from diffusion_jax import config as config_lib
from diffusion_jax import samplers as SM
from diffusion_jax import schedule as S
from diffusion_jax.errors import ConfigError
from diffusion_jax.evaluation.sliced_wasserstein import sliced_wasserstein

WEIGHTS = np.array([0.5, 0.3, 0.2])
MEANS = np.array([[0.5, 0.5], [-0.5, 0.3], [0.0, -0.6]])
STDS = np.array([0.1, 0.15, 0.05])
TYPES = dict(var_type="fixed_large")
# float32 error of a trajectory: on the cosine schedule sigma_max = sigma_999 = 2e4, where
# x_0 = (x_t - sqrt(1 - a-bar) eps) / sqrt(a-bar) loses ~2e4 * 2^-24 * |x| ~ 6e-3 to rounding (in the
# harness's float32 model already), and Heun's correction from there to sigma_998 = 642 scales an error
# of the Euler predictor by (2e4 - 642) / (2 * 642) ~ 15: ~1.4e-4 in x_t after the first step. On the
# linear schedule (sigma_max = 157) it is ~3e-6.
ATOL = {"linear": 2e-5, "cosine": 6e-4}
CHURN = dict(S_churn=40.0, S_tmin=0.05, S_tmax=50.0, S_noise=1.003)


# ---- the float64 reference: Karras et al. 2022 as printed, with sigma(t) = t and s(t) = 1 ----

def sigmas64(name):
    """sigma_t = sqrt((1 - a-bar_t) / a-bar_t) of the T = 1000 schedule, from its float64 betas."""
    alphas_cumprod = np.cumprod(1 - S.get_beta_schedule(name, 1000))
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def nearest_level(levels, sigma):
    """The timestep whose sigma is nearest to ``sigma`` in log sigma."""
    return int(np.argmin(np.abs(np.log(levels) - np.log(sigma))))


def karras_levels(levels, n, rho=7.0):
    """Eq. 5 between the schedule's sigma_min and sigma_max, each at its nearest level, from T - 1 down."""
    lo, hi = levels[0] ** (1 / rho), levels[-1] ** (1 / rho)
    return np.array([nearest_level(levels, (hi + i / (n - 1) * (lo - hi)) ** rho) for i in range(n)])


def denoiser64(x, sigma):
    """D(x; sigma) = E[x_0 | x_0 + sigma n = x] of the mixture: per component m_k + s_k^2 / (s_k^2 +
    sigma^2) (x - m_k), weighted by its posterior probability."""
    var = STDS**2 + sigma**2  # [K]
    sq = np.sum((x[:, None, :] - MEANS[None]) ** 2, -1)  # [B, K]
    log_r = np.log(WEIGHTS) - np.log(var) - sq / (2 * var)  # 2-D: the normalizer is 1 / var
    r = np.exp(log_r - log_r.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    x0_k = MEANS[None] + (STDS**2 / var)[None, :, None] * (x[:, None, :] - MEANS[None])
    return np.sum(r[..., None] * x0_k, axis=1)


def algorithm_1(x, t, heun=True):
    """Algorithm 1 from x ~ N(0, t_0^2 I) on t_0 > ... > t_{N-1}, t_N = 0: the states x_0 .. x_N."""
    t = np.append(t, 0.0)
    states = [x]
    for i in range(len(t) - 1):
        d = (x - denoiser64(x, t[i])) / t[i]
        x_next = x + (t[i + 1] - t[i]) * d
        if heun and t[i + 1] != 0:
            d_prime = (x_next - denoiser64(x_next, t[i + 1])) / t[i + 1]
            x_next = x + (t[i + 1] - t[i]) * (0.5 * d + 0.5 * d_prime)
        x = x_next
        states.append(x)
    return states


def algorithm_2(x, t, noise, levels, num_steps, S_churn, S_tmin, S_tmax, S_noise):
    """Algorithm 2 with fixed noise [N, B, 2] (standard normal, scaled by S_noise here); t-hat is moved to its
    nearest level, where the network is trained."""
    t = np.append(t, 0.0)
    states = [x]
    for i in range(len(t) - 1):
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_tmin <= t[i] <= S_tmax else 0.0
        t_hat = levels[max(nearest_level(levels, t[i] + gamma * t[i]), nearest_level(levels, t[i]))]
        x_hat = x + np.sqrt(t_hat**2 - t[i] ** 2) * S_noise * noise[i]
        d = (x_hat - denoiser64(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t[i + 1] - t_hat) * d
        if t[i + 1] != 0:
            d_prime = (x_next - denoiser64(x_next, t[i + 1])) / t[i + 1]
            x_next = x_hat + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d_prime)
        x = x_next
        states.append(x)
    return states


# ---- the JAX samplers on the project's harness (analytic.gaussian_mixture_eps) ----

@functools.cache
def harness(name):
    sched = S.make_schedule(name, 1000)
    eps_fn = analytic.gaussian_mixture_eps(sched, WEIGHTS, MEANS, STDS**2)

    def x0_fn(x, t):
        return S.predict_x0_from_eps(sched, x, t, eps_fn(x, t))

    def v_fn(x, t):
        return S.get_v(sched, x0_fn(x, t), t, eps_fn(x, t))

    return sched, {"eps": eps_fn, "x0": x0_fn, "v": v_fn}


def x_T(batch=256, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, 2))


def run_sampler(name, mean_type, steps, **kwargs):
    """(distinct timesteps, recorded x_t [n, B, 2] from T - 1 down, x_0) of ``edm_sample``."""
    sched, models = harness(name)
    distinct = np.unique(steps)
    result = jax.jit(lambda x: SM.edm_sample(models[mean_type], sched, x, timesteps=steps,
                                            mean_type=mean_type, record=distinct, **TYPES, **kwargs))(x_T())
    return distinct, np.asarray(result.x_t, np.float64)[::-1], np.asarray(result.images, np.float64)


def to_x_t(states, levels, steps):
    """EDM's x at the levels of ``steps`` (from T - 1 down) as x_t = x / sqrt(1 + sigma^2)."""
    return [x / np.sqrt(1 + levels[t] ** 2) for x, t in zip(states, steps, strict=False)]


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("num_steps", [2, 10, 18, 50])
@pytest.mark.parametrize("rho", [7.0, 3.0])
def test_karras_timesteps_are_eq_5_at_the_nearest_level(name, num_steps, rho):
    sched, _ = harness(name)
    steps = SM.edm_timesteps(sched, num_steps, rho)
    expected = karras_levels(sigmas64(name), num_steps, rho)[::-1]
    np.testing.assert_array_equal(steps, expected)
    assert steps[0] == 0 and steps[-1] == 999 and len(steps) == num_steps and np.all(np.diff(steps) >= 0)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_heun_follows_algorithm_1_in_float64(name, mean_type):
    """Every state of the trajectory, from the harness's float32 model of each parameterization, equals a
    float64 transcription of Algorithm 1 within float32 error. On the cosine schedule 18 levels of eq.
    5 fall on 11 timesteps (sigma_max = 2e4 is far from sigma_{T-2}); the reference takes all 18 steps,
    the repeated ones of length 0, which the sampler skips."""
    levels = sigmas64(name)
    steps = SM.edm_timesteps(harness(name)[0], 18)
    distinct, xs, images = run_sampler(name, mean_type, steps)
    assert (name == "cosine") == (len(distinct) < 18)
    descending = steps[::-1]
    reference = algorithm_1(np.asarray(x_T(), np.float64) * np.sqrt(1 + levels[-1] ** 2), levels[descending])
    states = [reference[int(np.flatnonzero(descending == t)[0])] for t in distinct[::-1]]  # x_i at each level
    np.testing.assert_allclose(xs, to_x_t(states, levels, distinct[::-1]), atol=ATOL[name])
    np.testing.assert_allclose(images, reference[-1], atol=ATOL[name])


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_euler_follows_algorithm_1_without_its_correction(name):
    levels = sigmas64(name)
    steps = SM.edm_timesteps(harness(name)[0], 25)
    distinct, xs, images = run_sampler(name, "eps", steps, second_order=False)
    reference = algorithm_1(np.asarray(x_T(), np.float64) * np.sqrt(1 + levels[-1] ** 2),
                            levels[distinct[::-1]], heun=False)
    np.testing.assert_allclose(xs, to_x_t(reference, levels, distinct[::-1]), atol=ATOL[name])
    np.testing.assert_allclose(images, reference[-1], atol=ATOL[name])


@pytest.mark.parametrize("name, mean_type", [("linear", "eps"), ("cosine", "v")])
def test_heun_churn_follows_algorithm_2_with_fixed_noise(name, mean_type):
    """Noise is drawn as normal(fold_in(rng, t_i)) at each distinct timestep t_i, as the other samplers do."""
    levels = sigmas64(name)
    steps = SM.edm_timesteps(harness(name)[0], 18)
    rng = jax.random.PRNGKey(7)
    distinct, xs, images = run_sampler(name, mean_type, steps, rng=rng, **CHURN)
    noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(rng, t), (256, 2)), np.float64)
                      for t in distinct[::-1]])
    reference = algorithm_2(np.asarray(x_T(), np.float64) * np.sqrt(1 + levels[-1] ** 2),
                            levels[distinct[::-1]], noise, levels, len(steps), **CHURN)
    np.testing.assert_allclose(xs, to_x_t(reference, levels, distinct[::-1]), atol=ATOL[name])
    np.testing.assert_allclose(images, reference[-1], atol=ATOL[name])
    churned = reference[-1] - algorithm_1(reference[0], levels[distinct[::-1]])[-1]
    assert np.abs(churned).max() > 0.01  # the noise did change the samples


def registry_run(sampler, name="linear", steps=18, record=(), **overrides):
    """x_t and x_0 of ``sampler`` as sample_lib runs it: timesteps and options from config.sample."""
    sched, models = harness(name)
    sample = dict(tiny_config.get_config().sample.to_dict(), sampler=sampler, steps=steps, spacing="karras",
                  **overrides)
    entry = sampler_registry.get(sampler)
    timesteps = sampler_registry.visited_timesteps(sample, sched)
    options = {key: sample[key] for key in entry.options}

    @jax.jit
    def run(x, rng):
        return entry.run(models["eps"], sched, x, rng, timesteps=timesteps, mean_type="eps", clip_x0=False,
                         record=record, **TYPES, **options)

    return run(x_T(), jax.random.PRNGKey(3))


def test_heun_churn_without_churn_is_heun_bit_for_bit():
    record = [int(t) for t in SM.edm_timesteps(harness("linear")[0], 18)[::3]]
    heun = registry_run("heun", record=record)
    for a, b in zip(heun, registry_run("heun_churn", record=record, S_tmin=0.5, S_noise=1.007), strict=True):
        np.testing.assert_array_equal(a, b)
    churned = registry_run("heun_churn", S_churn=10.0).images
    assert np.abs(np.asarray(churned) - np.asarray(heun.images)).max() > 0.01
    again = registry_run("heun_churn", S_churn=10.0).images
    np.testing.assert_array_equal(churned, again)  # its noise comes from the run's rng alone


def test_euler_is_ddim_on_the_same_timesteps():
    sched, models = harness("linear")
    steps = np.unique(SM.edm_timesteps(sched, 12))
    euler = jax.jit(lambda x: SM.edm_sample(models["eps"], sched, x, timesteps=steps, second_order=False,
                                            mean_type="eps", **TYPES).images)(x_T())
    ddim = jax.jit(lambda x: SM.ddim_sample(models["eps"], sched, x, timesteps=steps, mean_type="eps",
                                            **TYPES).images)(x_T())
    np.testing.assert_allclose(euler, ddim, atol=2e-5)


@pytest.mark.parametrize("sampler, name, steps, expected", [
    ("heun", "linear", 18, 35), ("heun_churn", "linear", 18, 35), ("euler", "linear", 18, 18),
    ("heun", "cosine", 18, 21),  # 11 distinct levels
    ("ddim", "linear", 50, 50), ("dpm_solver++", "linear", 20, 20),
])
def test_the_registry_counts_network_evaluations(sampler, name, steps, expected):
    sched, models = harness(name)
    spacing = sampler_registry.get(sampler).default_spacing or "uniform"
    sample = dict(tiny_config.get_config().sample.to_dict(), sampler=sampler, steps=steps, spacing=spacing)
    assert sampler_registry.evaluations(sample, sched) == expected
    if sampler.startswith("heun") or sampler == "euler":  # as many as the model is called, run by run
        calls = []

        def counted(x, t):
            jax.debug.callback(lambda: calls.append(1))
            return models["eps"](x, t)

        timesteps = sampler_registry.visited_timesteps(sample, sched)
        options = {key: sample[key] for key in sampler_registry.get(sampler).options}
        jax.block_until_ready(jax.jit(lambda x: sampler_registry.get(sampler).run(
            counted, sched, x, jax.random.PRNGKey(0), timesteps=timesteps, mean_type="eps", clip_x0=False,
            record=(), **TYPES, **options).images)(x_T(8)))
        assert len(calls) == expected


def test_rho_chooses_the_timesteps_and_a_run_refuses_those_of_another_rho():
    sched, models = harness("linear")
    sample = dict(tiny_config.get_config().sample.to_dict(), sampler="heun", steps=10, spacing="karras",
                  rho=3.0)
    chosen = sampler_registry.visited_timesteps(sample, sched)
    np.testing.assert_array_equal(chosen, SM.edm_timesteps(sched, 10, 3.0))
    assert not np.array_equal(chosen, SM.edm_timesteps(sched, 10))
    with pytest.raises(ValueError, match=r"not Karras et al.'s 10 steps with rho = 3.0: choose them with "
                                         r"sampler_registry.visited_timesteps"):
        sampler_registry.get("heun").run(models["eps"], sched, x_T(8), None,
                                         timesteps=SM.edm_timesteps(sched, 10), mean_type="eps",
                                         clip_x0=False, record=(), rho=3.0, **TYPES)


def refusal(**setting) -> str:
    config = tiny_config.get_config()
    config.sample.update(**{"spacing": "karras", **setting})
    with pytest.raises(ConfigError) as error:
        config_lib.validate(config, num_devices=1, num_processes=1)
    return str(error.value)


@pytest.mark.parametrize("setting, message", [
    (dict(sampler="heun_churn", S_churn=-1.0),
     "config.sample.S_churn = -1.0 is not allowed: >= 0 and finite"),
    (dict(sampler="heun", rho=0.0), "config.sample.rho = 0.0 is not allowed: > 0 and finite"),
    (dict(sampler="euler", rho=-7.0), "config.sample.rho = -7.0 is not allowed: > 0 and finite"),
    (dict(sampler="heun", steps=1),
     "config.sample.steps = 1 is not allowed: in [2, 100] with sampler 'heun'"),
    (dict(sampler="heun_churn", S_churn=40.0, S_tmin=2.0, S_tmax=1.0),
     "config.sample.S_tmin = 2.0 is not allowed: at most config.sample.S_tmax"),
    (dict(sampler="heun_churn", S_noise=0.0), "config.sample.S_noise = 0.0 is not allowed: > 0 and finite"),
    (dict(sampler="heun", S_churn=40.0),
     "config.sample.S_churn = 40.0 is not allowed: 0.0 with sampler 'heun' (S_churn applies to heun_churn: "),
    (dict(sampler="heun", spacing="quad"),
     "config.sample.spacing = 'quad' is not allowed: one of karras with sampler 'heun'"),
    (dict(sampler="ddim", spacing="quad", S_churn=1.0),
     "config.sample.S_churn = 1.0 is not allowed: 0.0 with sampler 'ddim'"),
])
def test_bad_options_are_one_config_error_naming_the_key(setting, message):
    error = refusal(**setting)
    assert error.startswith(message) and "\n" not in error, error


def test_the_papers_settings_are_accepted():
    config = tiny_config.get_config()
    for sampler in ("euler", "heun", "heun_churn"):
        config.sample.update(sampler=sampler, spacing="karras", steps=18)
        config_lib.validate(config, num_devices=1, num_processes=1)
    config.sample.update(rho=3.0, **CHURN)  # settings of the kind of Karras et al.'s table 5
    config_lib.validate(config, num_devices=1, num_processes=1)


def test_heun_reaches_the_floor_of_the_sliced_wasserstein_distance():
    """benchmarks.sampler_quality's measure (8 Gaussians on a circle, exact eps, mean over sets of 4,000 of
    the distance to fresh data, as a ratio to the data-vs-data floor), on 4 sets. Heun converges to the
    floor, within 2 of its standard errors at N = 25 (49 evaluations); at their N = 18 (35 evaluations)
    it is 1.3-1.4x the floor, as a float64 Heun on the continuous Karras sigmas is (so not from rounding
    sigma to timesteps): on this data DPM-Solver++ 2M is at the floor by 20 (benchmarks/README.md)."""
    sets, n, K = 4, 4000, sampler_quality.K
    sched = S.make_schedule("linear", 1000)
    eps_fn = analytic.gaussian_mixture_eps(sched, np.full(K, 1 / K), sampler_quality.MEANS,
                                           np.full(K, sampler_quality.STD**2))
    x = jax.random.normal(jax.random.PRNGKey(0), (sets * n, 2))
    truths = [sampler_quality.data(n, seed) for seed in range(1, sets + 1)]
    floors = [sliced_wasserstein(sampler_quality.data(n, 1000 + k), truth) for k, truth in enumerate(truths)]
    floor, se = np.mean(floors), np.std(floors, ddof=1) / np.sqrt(sets)

    def ratio(num_steps):
        steps = SM.edm_timesteps(sched, num_steps)
        images = jax.jit(lambda x: SM.edm_sample(eps_fn, sched, x, timesteps=steps, mean_type="eps",
                                                 **TYPES).images)(x)
        sets_ = np.split(np.asarray(images, np.float64), sets)
        return np.mean([sliced_wasserstein(s, t) for s, t in zip(sets_, truths, strict=True)]) / floor

    at_35, at_49 = ratio(18), ratio(25)
    assert at_49 < 1 + 2 * se / floor, (at_49, se / floor)
    assert at_35 < 1.6, at_35


def test_sample_py_samples_with_heun(quickstart_workdir, tmp_path):
    out = tmp_path / "heun"
    result = scripts.run("sample.py", f"--workdir={quickstart_workdir}", f"--out={out}", "--sampler=heun",
                         "--steps=4", "--num_samples=4", "--batch_size=4")
    assert "samples, 7 network evaluations each: 4/4" in result.stdout, result.stdout
    recorded = json.loads((out / "sampling.json").read_text())
    settings = recorded["sample"]
    chosen = (settings["sampler"], settings["spacing"], settings["steps"], settings["rho"])
    assert chosen == ("heun", "karras", 4, 7.0)
    assert recorded["network_evaluations"] == 7  # 4 levels, the last without its correction
    images = np.load(out / "samples.npz")["arr_0"]
    assert images.shape[0] == 4 and images.dtype == np.uint8


@pytest.mark.parametrize("args, message", [
    (["--sampler=heun", "--steps=1"], "config.sample.steps = 1 is not allowed: in [2, "),
    (["--sampler=heun_churn", "--S_churn=-1"], "config.sample.S_churn = -1.0 is not allowed"),
    (["--sampler=heun", "--rho=0"], "config.sample.rho = 0.0 is not allowed"),
    (["--sampler=heun_churn", "--S_churn=40", "--S_tmin=2", "--S_tmax=1"],
     "config.sample.S_tmin = 2.0 is not allowed: at most config.sample.S_tmax"),
])
def test_sample_py_refuses_a_bad_option_in_one_line(quickstart_workdir, tmp_path, args, message):
    result = scripts.run("sample.py", f"--workdir={quickstart_workdir}", f"--out={tmp_path / 'out'}",
                         f"--config={scripts.ROOT}/configs/quickstart.py", *args, expect=2)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
