"""DDIM and DDPM sampling against diffusers' schedulers driven by the same eps function."""

import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler

from diffusion_jax import analytic
from diffusion_jax import samplers as SM
from diffusion_jax import schedule as S

pytestmark = pytest.mark.parity

SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def setup():
    sched = S.make_schedule()
    # per-pixel data: a mixture of three 1-D Gaussians, exact eps
    eps_fn = analytic.gaussian_mixture_eps(sched, [0.3, 0.5, 0.2], [-0.6, 0.1, 0.7], [0.01, 0.04, 0.0025])
    x_T = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
    return sched, eps_fn, x_T


def float64_tables(ref) -> None:
    """diffusers' schedule tables of ``ref`` in float64 (they are float32), for a reference chain whose
    own rounding stays far below the tolerance: in float32, DPM-Solver++'s (20 time-uniform steps) is
    9e-6 from the float64 chain, 0.9 of the 1e-5 tolerance, and torch's float32 exp and log kernels
    differ between CPUs (AVX2, AVX-512); in float64 every chain here is within 2e-6 of ours."""
    ref.betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ref.alphas = 1.0 - ref.betas
    ref.alphas_cumprod = torch.cumprod(ref.alphas, dim=0)
    ref.alpha_t = torch.sqrt(ref.alphas_cumprod)  # DPM-Solver++'s tables
    ref.sigma_t = torch.sqrt(1 - ref.alphas_cumprod)
    ref.lambda_t = torch.log(ref.alpha_t) - torch.log(ref.sigma_t)
    ref.sigmas = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5


def torch_eps(eps_fn, x, t):
    t = jnp.full((x.shape[0],), int(t), jnp.int32)
    eps = np.asarray(eps_fn(jnp.asarray(x.numpy(), jnp.float32), t))
    return torch.from_numpy(eps.astype(x.numpy().dtype))


@pytest.mark.parametrize("num_steps, clip", [(10, False), (50, False), (50, True)])
def test_ddim_matches_diffusers(num_steps, clip):
    sched, eps_fn, x_T = setup()
    ref = DDIMScheduler(**SCHEDULE, clip_sample=clip, set_alpha_to_one=True, steps_offset=0,
                        timestep_spacing="leading")
    ref.set_timesteps(num_steps)
    x = torch.from_numpy(np.array(x_T))
    for t in ref.timesteps:
        x = ref.step(torch_eps(eps_fn, x, t), t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    steps = SM.ddim_timesteps(1000, num_steps, "uniform")
    assert steps[::-1].tolist() == ref.timesteps.tolist()
    ours = jax.jit(lambda x: SM.ddim_sample(eps_fn, sched, x, timesteps=steps, mean_type="eps",
                                            var_type="fixed_large", clip_x0=clip).images)(x_T)
    np.testing.assert_allclose(ours, x.numpy(), rtol=0, atol=1e-5)


def test_ddpm_matches_diffusers_with_the_same_noise(monkeypatch):
    """Run in float64 on diffusers' side: its float32 step is itself 8e-5 away from the exact
    (float64) chain after 1000 steps, while ours is 2e-6 away (measured with this setup)."""
    sched, eps_fn, x_T = setup()
    rng = jax.random.PRNGKey(1)
    current = {}

    def our_noise(shape, **_):  # the noise ddpm_sample adds at timestep t
        noise = jax.random.normal(jax.random.fold_in(rng, current["t"]), tuple(shape))
        return torch.from_numpy(np.asarray(noise, np.float64))

    monkeypatch.setattr(diffusers_ddpm, "randn_tensor", our_noise)
    ref = DDPMScheduler(**SCHEDULE, variance_type="fixed_small", clip_sample=True)
    ref.set_timesteps(1000)
    float64_tables(ref)
    x = torch.from_numpy(np.asarray(x_T, np.float64))
    for t in ref.timesteps:
        current["t"] = int(t)
        x = ref.step(torch_eps(eps_fn, x, t), t, x).prev_sample
    ours = jax.jit(lambda x: SM.ddpm_sample(eps_fn, sched, x, rng, mean_type="eps",
                                            var_type="fixed_small").images)(x_T)
    np.testing.assert_allclose(ours, x.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("order, num_steps, skip_type, singlestep", [
    (2, 10, "logSNR", False), (2, 20, "time_uniform", False), (2, 50, "time_quadratic", False),
    (3, 20, "logSNR", False),
    (2, 10, "logSNR", True), (2, 15, "logSNR", True),  # 2S on pairs: even and odd counts
])
def test_dpm_solver_matches_diffusers(order, num_steps, skip_type, singlestep):
    """The whole trajectory, step by step, on the same timesteps (diffusers' custom `timesteps`), against
    DPMSolverMultistepScheduler, or DPMSolverSinglestepScheduler for 2S, in float64."""
    sched, eps_fn, x_T = setup()
    steps = SM.dpm_solver_timesteps(sched, num_steps, skip_type)
    scheduler = DPMSolverSinglestepScheduler if singlestep else DPMSolverMultistepScheduler
    ref = scheduler(**SCHEDULE, solver_order=order, algorithm_type="dpmsolver++", final_sigmas_type="zero",
                    lower_order_final=True)
    float64_tables(ref)
    ref.set_timesteps(timesteps=steps[::-1].tolist())
    x, trajectory = torch.from_numpy(np.asarray(x_T, np.float64)), []
    for t in ref.timesteps:
        trajectory.append(x.numpy())
        x = ref.step(torch_eps(eps_fn, x, t), t, x).prev_sample
    ours = jax.jit(lambda x: SM.dpm_solver_sample(eps_fn, sched, x, timesteps=steps, order=order,
                                                  singlestep=singlestep, record=steps, mean_type="eps",
                                                  var_type="fixed_large"))(x_T)
    np.testing.assert_allclose(ours.x_t[::-1], np.stack(trajectory), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.images, x.numpy(), rtol=0, atol=1e-5)
