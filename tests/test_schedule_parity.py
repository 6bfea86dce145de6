"""Schedules against diffusers' DDPMScheduler (PyTorch, CPU; requirements-test.txt)."""

import numpy as np
import pytest
from diffusers import DDPMScheduler

from diffusion_jax import schedule as S

pytestmark = pytest.mark.parity


@pytest.mark.parametrize(
    "ours, theirs", [("linear", "linear"), ("quad", "scaled_linear"), ("cosine", "squaredcos_cap_v2")]
)
@pytest.mark.parametrize("T", [1000, 250])
def test_betas_and_alphas_cumprod_match_diffusers(ours, theirs, T):
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=theirs, beta_start=1e-4, beta_end=0.02)
    sched = S.make_schedule(ours, T)
    np.testing.assert_allclose(sched.betas, ref.betas.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(sched.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
