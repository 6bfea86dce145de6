"""The entry points' startup line, the warning for a CPU backend on a host with an accelerator, and --help."""

import pathlib

import pytest
import scripts

from diffusion_jax import launch


def test_a_cpu_backend_on_a_host_with_an_accelerator_is_warned_of():
    signs = launch.accelerator_signs(device_files=["/dev/accel0"], environ={"TPU_ACCELERATOR_TYPE": "v4-8"})
    assert signs == ["/dev/accel0", "TPU_ACCELERATOR_TYPE"]
    warning = launch.cpu_warning("cpu", signs)
    assert "JAX runs on the CPU" in warning and "/dev/accel0" in warning and "jax[tpu]" in warning
    assert launch.cpu_warning("tpu", signs) is None
    jax_sets_this_anywhere = {"TPU_SKIP_MDS_QUERY": "1"}
    signs = launch.accelerator_signs(device_files=[], environ=jax_sets_this_anywhere)
    assert launch.cpu_warning("cpu", signs) is None


@pytest.mark.integration
def test_each_entry_point_prints_the_startup_line_before_its_work(tmp_path):
    missing = tmp_path / "none.npz"
    result = scripts.run("evaluate.py", "--mode=fid", f"--samples={missing}", devices=2, expect=6)
    first = result.stdout.splitlines()[0]
    assert first.startswith("JAX ") and "backend cpu, 2 device(s) (cpu)" in first
    assert "process 0 of 1" in first
    assert "CPU convolutions: XLA" in first  # two devices: XLA's, as onednn.uses_onednn says


@pytest.mark.parametrize("script", ["train.py", "sample.py", "evaluate.py"])
@pytest.mark.integration
def test_help_shows_the_multi_process_flags_and_the_examples_as_written(script):
    shown = scripts.run(script, "--help", expect=1).stdout  # absl's --help exits with status 1
    for flag in ("--[no]distributed", "--coordinator_address", "--num_processes", "--process_id"):
        assert flag in shown, shown
    source = pathlib.Path(scripts.ROOT, script).read_text()
    docstring = source[:source.index('"""', 3)].splitlines()[1:]
    continued = [line.replace("\\\\", "\\") for line in docstring if line.endswith("\\\\")]
    assert all(line in shown.splitlines() for line in continued), shown
    assert script == "train.py" or continued  # sample.py and evaluate.py have such examples
