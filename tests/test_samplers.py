"""Samplers against the exact denoiser of a Gaussian mixture, and their identities."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analytic
from diffusion_jax import samplers as SM
from diffusion_jax import schedule as S
from diffusion_jax.evaluation.sliced_wasserstein import sliced_wasserstein

WEIGHTS = np.array([0.5, 0.3, 0.2])
MEANS = np.array([[0.5, 0.5], [-0.5, 0.3], [0.0, -0.6]])
STDS = np.array([0.1, 0.15, 0.05])
N = 4000
TYPES = dict(mean_type="eps", var_type="fixed_large")


@functools.cache
def setup():
    sched = S.make_schedule()
    eps_fn = analytic.gaussian_mixture_eps(sched, WEIGHTS, MEANS, STDS**2)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (N, 2))
    return sched, eps_fn, x_T


def mixture_samples(n, seed):
    rng = np.random.default_rng(seed)
    k = rng.choice(3, size=n, p=WEIGHTS)
    return MEANS[k] + STDS[k, None] * rng.normal(size=(n, 2))


def component_stats(x):
    x = np.asarray(x, np.float64)
    k = np.argmin(((x[:, None] - MEANS[None]) ** 2).sum(-1), axis=1)
    weights = np.bincount(k, minlength=3) / len(x)
    means = np.array([x[k == j].mean(0) for j in range(3)])
    stds = np.array([x[k == j].std(0).mean() for j in range(3)])
    return weights, means, stds


def assert_matches_mixture(x):
    weights, means, stds = component_stats(x)
    se = np.sqrt(WEIGHTS * (1 - WEIGHTS) / len(x))
    assert np.all(np.abs(weights - WEIGHTS) < 3 * se), weights
    np.testing.assert_allclose(means, MEANS, atol=0.015)
    np.testing.assert_allclose(stds, STDS, rtol=0.1)


@jax.jit
def _ddpm(x_T, rng):
    sched, eps_fn, _ = setup()
    return SM.ddpm_sample(eps_fn, sched, x_T, rng, **TYPES).images


@functools.partial(jax.jit, static_argnames=("num_steps", "spacing"))
def _ddim(x_T, num_steps, spacing="uniform"):
    sched, eps_fn, _ = setup()
    steps = SM.ddim_timesteps(1000, num_steps, spacing)
    return SM.ddim_sample(eps_fn, sched, x_T, timesteps=steps, **TYPES).images


def test_ddpm_1000_steps_samples_the_mixture():
    _, _, x_T = setup()
    assert_matches_mixture(_ddpm(x_T, jax.random.PRNGKey(1)))


def test_ddim_1000_steps_samples_the_mixture_and_error_falls_with_steps():
    _, _, x_T = setup()
    assert_matches_mixture(_ddim(x_T, 1000))
    truth = mixture_samples(N, seed=0)
    floor = sliced_wasserstein(mixture_samples(N, seed=1), truth)
    error = {s: sliced_wasserstein(_ddim(x_T, s), truth) for s in (10, 20, 50, 1000)}
    assert error[10] > error[20] > error[50] > error[1000], error
    assert error[1000] < 2 * floor, (error, floor)
    # distance to the converged ODE solution from the same x_T shrinks too
    ode = np.asarray(_ddim(x_T, 1000))
    gap = [float(np.sqrt(np.mean((np.asarray(_ddim(x_T, s)) - ode) ** 2))) for s in (10, 20, 50, 100)]
    assert gap == sorted(gap, reverse=True), gap


def test_ddim_eta_0_is_deterministic_and_same_x_T_gives_same_image():
    _, _, x_T = setup()
    a, b = _ddim(x_T, 50), _ddim(x_T, 50)
    np.testing.assert_array_equal(a, b)
    # the same x_T gives the same image at any S: nearly every sample keeps its component
    nearest = lambda x: np.argmin(((np.asarray(x)[:, None] - MEANS[None]) ** 2).sum(-1), 1)  # noqa: E731
    assert np.mean(nearest(_ddim(x_T, 10)) == nearest(a)) > 0.97


def test_ddim_reconstruction_error_shrinks_with_steps():
    sched, eps_fn, _ = setup()
    x0 = jnp.asarray(mixture_samples(512, seed=2), jnp.float32)
    errors = []
    for s in (10, 50, 200, 1000):
        steps = SM.ddim_timesteps(1000, s)
        x_T = SM.ddim_invert(eps_fn, sched, x0, timesteps=steps, **TYPES)
        back = SM.ddim_sample(eps_fn, sched, x_T, timesteps=steps, **TYPES).images
        errors.append(float(jnp.sqrt(jnp.mean(jnp.square(back - x0)))))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.01, errors


def test_ddim_eta_1_on_the_full_chain_equals_ddpm_fixed_small():
    sched, eps_fn, x_T = setup()
    x_T, rng = x_T[:256], jax.random.PRNGKey(3)
    for clip in (False, True):
        ddpm = SM.ddpm_sample(eps_fn, sched, x_T, rng, mean_type="eps", var_type="fixed_small", clip_x0=clip)
        ddim = SM.ddim_sample(eps_fn, sched, x_T, timesteps=np.arange(1000), eta=1.0, rng=rng, clip_x0=clip,
                              **TYPES)
        np.testing.assert_allclose(ddim.images, ddpm.images, atol=1e-4)


def test_quad_and_uniform_subsequences_equal_the_ddim_code():
    for s in (10, 20, 50, 100):
        # ddim runners/diffusion.py
        quad = [int(v) for v in list(np.linspace(0, np.sqrt(1000 * 0.8), s) ** 2)]
        assert SM.ddim_timesteps(1000, s, "quad").tolist() == quad
        assert SM.ddim_timesteps(1000, s, "uniform").tolist() == list(range(0, 1000, 1000 // s))
    assert SM.ddim_timesteps(1000, 10, "quad").tolist() == [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]
    assert SM.ddim_timesteps(1000, 10, "trailing").tolist() == [99, 199, 299, 399, 499, 599, 699, 799, 899,
                                                                999]
    assert SM.ddim_timesteps(1000, 5, "linspace").tolist() == [0, 250, 500, 749, 999]


def test_repeated_quad_steps_are_no_ops():
    """S = 100 quad repeats timesteps 0 and 1 (the DDIM code's list); skipping them changes nothing."""
    sched, eps_fn, x_T = setup()
    steps = SM.ddim_timesteps(1000, 100, "quad")
    assert len(np.unique(steps)) < len(steps)
    a = SM.ddim_sample(eps_fn, sched, x_T[:64], timesteps=steps, **TYPES).images
    b = SM.ddim_sample(eps_fn, sched, x_T[:64], timesteps=np.unique(steps), **TYPES).images
    np.testing.assert_array_equal(a, b)


def test_sigma_hat_is_the_ddim_code_ddpm_steps():
    """ddpm_sample on a subsequence with fixed_large is the DDIM code's `ddpm_steps` (sigma-hat)."""
    sched, eps_fn, x_T = setup()
    steps = SM.ddim_timesteps(1000, 20, "quad")
    rng = jax.random.PRNGKey(4)
    ours = SM.ddpm_sample(eps_fn, sched, x_T[:128], rng, timesteps=steps, **TYPES).images
    betas = np.linspace(1e-4, 0.02, 1000)
    alpha = lambda t: np.prod(1 - betas[: t + 1]) if t >= 0 else 1.0  # noqa: E731
    x = np.asarray(x_T[:128], np.float64)
    previous = [-1] + list(steps[:-1])
    for t, t_next in zip(steps[::-1], previous[::-1], strict=True):
        at, at_next = alpha(t), alpha(t_next)
        beta_t = 1 - at / at_next
        e = np.asarray(eps_fn(jnp.asarray(x, jnp.float32), jnp.full((128,), t)), np.float64)
        x0 = np.clip(np.sqrt(1 / at) * x - np.sqrt(1 / at - 1) * e, -1, 1)
        mean = (np.sqrt(at_next) * beta_t * x0 + np.sqrt(1 - beta_t) * (1 - at_next) * x) / (1 - at)
        noise = np.asarray(jax.random.normal(jax.random.fold_in(rng, t), x.shape), np.float64)
        x = mean + (t_next >= 0) * np.sqrt(beta_t) * noise
    np.testing.assert_allclose(ours, x, atol=1e-4)


def test_dpm_solver_first_order_is_ddim_and_higher_orders_converge_faster():
    """DPM-Solver++ of order 1 is DDIM (eta 0); at equal model evaluations 3M is closer than 2M,
    and 2M than DDIM, to the ODE's solution from the same x_T (DDIM on all 1000 steps)."""
    sched, eps_fn, x_T = setup()
    x_T = x_T[:1000]
    steps = SM.dpm_solver_timesteps(sched, 20, "logSNR")
    first = SM.dpm_solver_sample(eps_fn, sched, x_T, timesteps=steps, order=1, **TYPES).images
    # the same update in other float32 operations: 1999 of 2000 coordinates agree within 2e-5,
    # one (a sample between two components, where the flow amplifies rounding) by 2.6e-5
    np.testing.assert_allclose(first, SM.ddim_sample(eps_fn, sched, x_T, timesteps=steps, **TYPES).images,
                               atol=1e-4)
    ode = np.asarray(SM.ddim_sample(eps_fn, sched, x_T, timesteps=np.arange(1000), **TYPES).images)

    def gap(x):
        return float(np.sqrt(np.mean(np.square(np.asarray(x) - ode))))

    for nfe in (20, 40):
        steps = SM.dpm_solver_timesteps(sched, nfe, "logSNR")
        dpm = [gap(SM.dpm_solver_sample(eps_fn, sched, x_T, timesteps=steps, order=k, **TYPES).images)
               for k in (1, 2, 3)]
        ddim = gap(SM.ddim_sample(eps_fn, sched, x_T, timesteps=SM.ddim_timesteps(1000, nfe), **TYPES).images)
        assert dpm[2] < dpm[1] < dpm[0] and dpm[1] < 0.6 * ddim, (nfe, dpm, ddim)


def test_a_v_prediction_model_samples_like_its_eps_model():
    """v = sqrt(a-bar) eps - sqrt(1 - a-bar) x_0 of the exact eps-model: every sampler gives the same
    images."""
    sched, eps_fn, x_T = setup()
    x_T = x_T[:256]

    def v_fn(x, t):
        eps = eps_fn(x, t)
        return S.get_v(sched, S.predict_x0_from_eps(sched, x, t, eps), t, eps)

    steps = SM.ddim_timesteps(1000, 20)
    runs = {
        "ddim": lambda f, m: SM.ddim_sample(f, sched, x_T, timesteps=steps, mean_type=m,
                                            var_type="fixed_large"),
        "dpm_solver++ 3M": lambda f, m: SM.dpm_solver_sample(f, sched, x_T, timesteps=steps, order=3,
                                                             mean_type=m, var_type="fixed_large"),
        "ddpm": lambda f, m: SM.ddpm_sample(f, sched, x_T, jax.random.PRNGKey(0), timesteps=steps,
                                            mean_type=m, var_type="fixed_small"),
    }
    for name, run in runs.items():
        np.testing.assert_allclose(run(v_fn, "v").images, run(eps_fn, "eps").images, atol=1e-4, err_msg=name)


def test_dpm_solver_timesteps():
    sched = S.make_schedule()
    lam = np.asarray(SM.log_snr(sched))
    steps = SM.dpm_solver_timesteps(sched, 10, "logSNR")
    assert steps[0] == 0 and steps[-1] == 999 and len(steps) == 10
    # equal steps in lambda, up to rounding to integer timesteps
    gaps = -np.diff(lam[steps])
    np.testing.assert_allclose(gaps, (lam[0] - lam[999]) / 9, rtol=0.05)
    assert SM.dpm_solver_timesteps(sched, 5, "time_uniform").tolist() == [0, 250, 500, 749, 999]
    quad = SM.dpm_solver_timesteps(sched, 5, "time_quadratic")
    np.testing.assert_allclose(np.sqrt((quad + 1) / 1000), np.linspace(np.sqrt(1e-3), 1, 5), atol=1e-3)


def test_progressive_records_x_t_and_pred_x0():
    sched, eps_fn, x_T = setup()
    steps = SM.ddim_timesteps(1000, 10)
    out = SM.ddim_sample(eps_fn, sched, x_T[:8], timesteps=steps, record=(900, 500, 0), **TYPES)
    assert out.x_t.shape == out.pred_x0.shape == (3, 8, 2)
    np.testing.assert_array_equal(out.x_t[0], x_T[:8])  # 900 is the first step: the state is x_T
    for k, t in enumerate((900, 500, 0)):  # each x_0 prediction is the one of the recorded state
        tb = jnp.full((8,), t)
        expected = S.predict_x0_from_eps(sched, out.x_t[k], tb, eps_fn(out.x_t[k], tb))
        np.testing.assert_allclose(out.pred_x0[k], expected, atol=1e-5)
    assert float(jnp.abs(out.x_t[1] - x_T[:8]).max()) > 0.1  # 500 was recorded later in the chain
    np.testing.assert_allclose(out.pred_x0[2], out.images, atol=1e-6)  # the last step returns x_0
    ddpm = SM.ddpm_sample(eps_fn, sched, x_T[:8], jax.random.PRNGKey(0), record=(999, 0), **TYPES)
    np.testing.assert_array_equal(ddpm.x_t[0], x_T[:8])
    with pytest.raises(ValueError, match=r"record timesteps \[901\] are not among"):
        SM.ddim_sample(eps_fn, sched, x_T[:8], timesteps=steps, record=(901,), **TYPES)


def test_interpolation():
    sched, eps_fn, x_T = setup()
    z = SM.slerp(x_T[0], x_T[1], jnp.array([0.0, 0.25, 1.0]))
    np.testing.assert_allclose(z[0], x_T[0], atol=1e-6)
    np.testing.assert_allclose(z[2], x_T[1], atol=1e-6)
    # orthogonal unit vectors: the path is the unit circle, at angle alpha * pi / 2
    e0, e1 = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]])
    np.testing.assert_allclose(SM.slerp(e0, e1, jnp.array([1 / 3]))[0, 0],
                               [np.cos(np.pi / 6), np.sin(np.pi / 6)], atol=1e-6)
    data = jnp.asarray(MEANS[:2], jnp.float32)
    mixed = SM.interpolate_diffused(eps_fn, sched, data[0], data[1], jnp.array([0.0, 0.5, 1.0]), 100,
                                    jax.random.PRNGKey(5), **TYPES)
    assert mixed.shape == (3, 2)
    # at t = 100 the encoding keeps the image: the ends decode near their own component
    assert float(jnp.linalg.norm(mixed[0] - data[0])) < 0.3
    assert float(jnp.linalg.norm(mixed[2] - data[1])) < 0.3


def test_compiled_program_does_not_grow_with_steps():
    sched, eps_fn, x_T = setup()

    def size(s, sampler):
        steps = SM.ddim_timesteps(1000, s)
        fn = {
            "ddim": lambda x: SM.ddim_sample(eps_fn, sched, x, timesteps=steps, **TYPES).images,
            "ddpm": lambda x: SM.ddpm_sample(eps_fn, sched, x, jax.random.PRNGKey(0), timesteps=steps,
                                             **TYPES).images,
            "invert": lambda x: SM.ddim_invert(eps_fn, sched, x, timesteps=steps, **TYPES),
            "dpm": lambda x: SM.dpm_solver_sample(eps_fn, sched, x, timesteps=np.unique(steps), order=3,
                                                  **TYPES).images,
        }[sampler]
        jaxpr = jax.make_jaxpr(fn)(x_T[:4])
        return len(jaxpr.eqns), str(jaxpr).count("scan[")

    for sampler in ("ddim", "ddpm", "invert", "dpm"):
        assert size(1000, sampler)[0] <= size(10, sampler)[0], sampler
        assert size(10, sampler)[1] == size(1000, sampler)[1] == 1


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda f, s, x: SM.ddim_timesteps(1000, 1001), r"num_steps must be an integer in \[1, T = 1000\]"),
        (lambda f, s, x: SM.ddim_timesteps(1000, 0), "num_steps must be an integer"),
        (lambda f, s, x: SM.ddim_timesteps(1000, 10, "cubic"),
         "unknown spacing 'cubic'; allowed: uniform, quad"),
        (lambda f, s, x: SM.ddim_sample(f, s, x, timesteps=[0, 10], eta=-0.5, **TYPES), "eta must be >= 0"),
        (lambda f, s, x: SM.ddim_sample(f, s, x, timesteps=[0, 10], eta=0.5, **TYPES), "rng is required"),
        (lambda f, s, x: SM.ddim_sample(f, s, x, timesteps=[0, 1000], **TYPES), r"within \[0, 1000\)"),
        (lambda f, s, x: SM.ddim_sample(f, s, x, timesteps=[10, 5], **TYPES), "increase strictly"),
        (lambda f, s, x: SM.ddim_sample(f, s, x[0], timesteps=[0, 5], **TYPES), "x_T must be a batch"),
        (lambda f, s, x: SM.ddim_sample(f, s, x, timesteps=[0, 5], mean_type="eps", var_type="learned"),
         r"model output has shape \(4, 2\); var_type 'learned'"),
        (lambda f, s, x: SM.ddpm_sample(f, s, x, None, **TYPES), "rng is required"),
        (lambda f, s, x: SM.dpm_solver_sample(f, s, x, timesteps=[0, 5], order=4, **TYPES),
         r"order must be 1, 2 or 3 \(DPM-Solver\+\+ 2M: 2, 3M: 3\), got 4"),
        (lambda f, s, x: SM.dpm_solver_sample(f, s, x, timesteps=[5, 0], **TYPES), "increase strictly"),
        (lambda f, s, x: SM.dpm_solver_sample(f, s, x, timesteps=[0, 5], order=3, singlestep=True, **TYPES),
         r"singlestep is DPM-Solver\+\+\(2S\), of order 2; got order 3"),
        (lambda f, s, x: SM.dpm_solver_timesteps(s, 10, "karras"),
         "unknown skip_type 'karras'; allowed: logSNR"),
        (lambda f, s, x: SM.dpm_solver_timesteps(s, 0), r"num_steps must be an integer in \[1, T = 1000\]"),
        (lambda f, s, x: SM.slerp(x[0], x[:2], jnp.ones(2)), "differ in shape"),
        (lambda f, s, x: SM.interpolate_diffused(f, s, x[0], x[1], jnp.ones(2), 1000, jax.random.PRNGKey(0),
                                                 **TYPES), r"t must be an integer timestep in \[0, 1000\)"),
    ],
)
def test_bad_arguments_are_refused(call, message):
    sched, eps_fn, x_T = setup()
    with pytest.raises(ValueError, match=message):
        call(eps_fn, sched, x_T[:4])
