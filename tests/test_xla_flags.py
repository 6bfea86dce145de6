"""XLA's flags: set by the entry points (``xla_flags.set_defaults``), never by importing the package."""

import json
import os
import subprocess
import sys

import pytest
import scripts

from diffusion_jax import xla_flags

OURS = f"--{xla_flags.FLAG}={xla_flags.VALUE}"


def python(code, *args):
    """``python -c code args`` in a new process, in this environment without XLA_FLAGS (which
    conftest.py set)."""
    environment = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-c", code, *args], env=environment, cwd=scripts.ROOT,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.integration
def test_importing_the_package_changes_no_environment_variable():
    # the package alone, then modules that import JAX, after JAX and flax (importing JAX sets
    # TF_CPP_MIN_LOG_LEVEL and TPU_SKIP_MDS_QUERY itself)
    code = ("import importlib, json, os, sys\n"
            "changed = []\n"
            "for group in sys.argv[1:]:\n"
            "    before = dict(os.environ)\n"
            "    for module in group.split(','):\n"
            "        importlib.import_module(module)\n"
            "    changed.append(sorted(set(os.environ.items()) ^ set(before.items())))\n"
            "print(json.dumps(changed))\n")
    ours = ["diffusion_jax", "diffusion_jax.xla_flags"]
    third_party = ["jax", "flax.linen", "ml_collections", "absl.flags"]
    ours_with_jax = ["diffusion_jax.schedule", "diffusion_jax.losses", "diffusion_jax.analytic",
                     "diffusion_jax.launch", "diffusion_jax.models.onednn", "diffusion_jax.models.conv"]
    result = python(code, *(",".join(group) for group in (ours, third_party, ours_with_jax)))
    assert result.returncode == 0, result.stderr[-3000:]
    changed_by_ours, _, changed_by_ours_with_jax = json.loads(result.stdout.splitlines()[-1])
    assert changed_by_ours == [] and changed_by_ours_with_jax == []


@pytest.fixture
def known(monkeypatch):
    """The installed jaxlib, as far as set_defaults can tell, is one of those that know the flag."""
    monkeypatch.setattr(xla_flags, "jaxlib_version", lambda: xla_flags.JAXLIB_VERSIONS[0])


def test_the_flag_is_added_to_the_users_flags(known):
    environ = {}
    xla_flags.set_defaults(environ)
    assert environ == {"XLA_FLAGS": OURS}
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "OTHER": "1"}
    xla_flags.set_defaults(environ)
    xla_flags.set_defaults(environ)  # once only
    assert environ == {"XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {OURS}", "OTHER": "1"}


def test_a_value_the_user_set_is_kept(known):
    environ = {"XLA_FLAGS": f"--xla_force_host_platform_device_count=2 --{xla_flags.FLAG}=-reduce"}
    xla_flags.set_defaults(environ)
    assert environ == {"XLA_FLAGS": f"--xla_force_host_platform_device_count=2 --{xla_flags.FLAG}=-reduce"}


@pytest.mark.parametrize("version", ["0.11.0", "0.9.0", None], ids=["newer", "older", "no jaxlib"])
def test_nothing_is_set_for_a_jaxlib_that_may_not_know_the_flag(monkeypatch, version):
    monkeypatch.setattr(xla_flags, "jaxlib_version", lambda: version)
    for environ in ({}, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}):
        unchanged = dict(environ)
        xla_flags.set_defaults(environ)
        assert environ == unchanged


@pytest.mark.integration
def test_jax_starts_and_convolves_with_the_flag_of_the_installed_jaxlib():
    # the installed jaxlib (requirements.txt's pin) is one set_defaults knows; XLA would abort the process on
    # a flag or value it did not know
    assert xla_flags.jaxlib_version() in xla_flags.JAXLIB_VERSIONS, xla_flags.jaxlib_version()
    code = ("import json, os\n"
            "from diffusion_jax import xla_flags\n"
            "xla_flags.set_defaults()\n"
            "import jax, jax.numpy as jnp\n"
            "x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 1))\n"
            "y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',\n"
            "                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))\n"
            "print(json.dumps([os.environ['XLA_FLAGS'], float(y.sum())]))\n")
    result = python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    flags, total = json.loads(result.stdout.splitlines()[-1])
    assert flags == OURS and total == 2 * (4 * 4 + 8 * 6 + 4 * 9)  # 2 channels; corners, edges, inside
