"""The sampler and beta schedule registries: a sampler registered from outside the package is taken by
config validation and by sample.py by name, and unknown names are refused naming the registered ones."""

import json
import os
import re
import runpy

import numpy as np
import pytest
import scripts
from test_train import tiny_config, train

from diffusion_jax import config as config_lib
from diffusion_jax import sampler_registry, schedule
from diffusion_jax.errors import ConfigError

TOY = os.path.join(scripts.ROOT, "tests", "toy_sampler.py")
# sample.py with the toy sampler registered first, as a user's script would run it
WRAPPER = """import runpy
import sys

sys.path[:0] = [{root!r}, {tests!r}]
import toy_sampler  # noqa: E402, F401  (registers one_step_x0)

sys.argv[0] = {sample!r}
runpy.run_path({sample!r}, run_name="__main__")
"""
BUILT_IN = "ddpm, ddim, dpm_solver++, euler, heun, heun_churn"


@pytest.fixture
def registries(monkeypatch):
    """Both registries as they are, restored after the test with what it registered."""
    monkeypatch.setattr(sampler_registry, "SAMPLERS", dict(sampler_registry.SAMPLERS))
    monkeypatch.setattr(schedule, "SCHEDULES", dict(schedule.SCHEDULES))


def refusal(config) -> str:
    with pytest.raises(ConfigError) as error:
        config_lib.validate(config, num_devices=1, num_processes=1)
    return str(error.value)


def sample_with_toy(tmp_path, *args, expect=0):
    wrapper = tmp_path / "sample_with_toy.py"
    sample = os.path.join(scripts.ROOT, "sample.py")
    wrapper.write_text(WRAPPER.format(root=scripts.ROOT, tests=os.path.dirname(TOY), sample=sample))
    return scripts.run(str(wrapper), *args, expect=expect)


@pytest.mark.integration
def test_sample_py_takes_a_registered_sampler_by_name(tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "samples"
    result = sample_with_toy(tmp_path, f"--workdir={workdir}", f"--out={out}", "--sampler=one_step", expect=2)
    assert f"<{BUILT_IN.replace(', ', '|')}|one_step_x0>" in result.stderr, result.stderr[-2000:]

    train(workdir, "train.num_steps=2")
    sample_with_toy(tmp_path, f"--workdir={workdir}", f"--out={out}", "--sampler=one_step_x0",
                    "--num_samples=6", "--batch_size=3")
    images = np.load(out / "samples.npz")["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (6, 16, 16, 1)
    settings = json.loads((out / "sampling.json").read_text())["sample"]
    assert (settings["sampler"], settings["spacing"]) == ("one_step_x0", "last")  # its default spacing


def test_config_validation_names_the_registered_samplers(registries):
    runpy.run_path(TOY)
    config = tiny_config("sample.sampler=ddim2")
    assert refusal(config) == f"config.sample.sampler = 'ddim2' is not allowed: {BUILT_IN}, one_step_x0"
    config.sample.update(sampler="one_step_x0", spacing="last")
    config_lib.validate(config, num_devices=1, num_processes=1)
    config.sample.spacing = "quad"
    assert refusal(config) == ("config.sample.spacing = 'quad' is not allowed: one of last with sampler "
                               "'one_step_x0'")
    config.sample.update(spacing="last", eta=0.5)
    assert refusal(config).startswith("config.sample.eta = 0.5 is not allowed: 0.0 with sampler "
                                      "'one_step_x0' (eta applies to ddim: >= 0")


@pytest.mark.parametrize("sampler, setting, message", [
    ("ddim", {"eta": -0.5}, "config.sample.eta = -0.5 is not allowed: >= 0"),
    ("ddpm", {"eta": 1.0}, "config.sample.eta = 1.0 is not allowed: 0.0 with sampler 'ddpm'"),
    ("dpm_solver++", {"spacing": "logSNR", "order": 4}, "config.sample.order = 4 is not allowed: 1, 2 or 3"),
    ("dpm_solver++", {"spacing": "quad"},
     "config.sample.spacing = 'quad' is not allowed: one of logSNR, time_uniform, time_quadratic"),
])
def test_each_sampler_takes_its_own_spacings_and_options(sampler, setting, message):
    config = tiny_config()
    config.sample.update(sampler=sampler, **setting)
    assert refusal(config).startswith(message)


@pytest.mark.parametrize("name", list(sampler_registry.SAMPLERS))
def test_every_spacing_a_sampler_accepts_chooses_timesteps(name):
    sampler, sched = sampler_registry.get(name), schedule.make_schedule("linear", 100)
    for spacing in sampler.spacings:
        steps = sampler.timesteps(sched, 10, spacing)
        assert steps is None or (np.all(np.diff(steps) >= 0) and 0 <= steps[0] and steps[-1] < 100), spacing


def test_registering_a_taken_name_or_an_unknown_option_is_refused(registries):
    with pytest.raises(ValueError, match="a sampler named 'ddim' is registered already"):
        sampler_registry.register("ddim", None, timesteps=None, spacings=("uniform",))
    with pytest.raises(ValueError, match="config.sample has no option 'gamma'; options: eta, order"):
        sampler_registry.register("ddim_gamma", None, timesteps=None, spacings=("uniform",),
                                  options={"gamma": sampler_registry.Option(bool, "any")})
    with pytest.raises(ValueError, match="a beta schedule named 'cosine' is registered already"):
        schedule.register_beta_schedule("cosine", None)
    assert list(sampler_registry.SAMPLERS) == BUILT_IN.split(", ")


def test_an_unknown_schedule_names_the_registered_ones(registries):
    schedule.register_beta_schedule("toy_const", lambda T, *, beta_end, **_: np.full(T, beta_end))
    names = "linear, linear_scaled, quad, cosine, const, jsd, warmup10, warmup50, toy_const"
    with pytest.raises(ValueError, match=re.escape(f"unknown beta schedule 'cosinus'; allowed: {names}")):
        schedule.get_beta_schedule("cosinus", 10)
    config = tiny_config("diffusion.schedule=cosinus")
    assert refusal(config) == f"config.diffusion.schedule = 'cosinus' is not allowed: {names}"
    config.diffusion.update(schedule="toy_const", beta_end=0.1)
    config_lib.validate(config, num_devices=1, num_processes=1)
    betas = schedule.make_schedule("toy_const", 10, beta_end=0.1).betas
    np.testing.assert_array_equal(betas, np.full(10, 0.1, np.float32))


@pytest.mark.parametrize("sampler, own", [
    ("ddpm", []), ("ddim", []), ("dpm_solver++", ["order", "threshold"]),
    ("heun_churn", ["rho", "S_churn", "S_tmin", "S_tmax", "S_noise"])])
def test_the_settings_that_decide_the_samples_are_listed_once(sampler, own):
    """What sample.py records in sampling.json (and compares on resume) and the guidance sweep in its
    table: the common keys, eta for every sampler, and the sampler's own options."""
    sample = config_lib.base().sample
    sample.sampler = sampler
    settings = sampler_registry.settings(sample)
    assert list(settings) == ["sampler", "steps", "spacing", "eta", "clip_x0", *own]
    assert all(settings[k] == sample[k] for k in settings)
