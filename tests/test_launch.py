"""The entry points' startup line and the warning for a CPU backend on a host with an accelerator."""

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


def test_each_entry_point_prints_the_startup_line_before_its_work(tmp_path):
    missing = tmp_path / "none.npz"
    result = scripts.run("evaluate.py", "--mode=fid", f"--samples={missing}", devices=2, expect=6)
    first = result.stdout.splitlines()[0]
    assert first.startswith("JAX ") and "backend cpu, 2 device(s) (cpu)" in first
    assert "process 0 of 1" in first
    assert "CPU convolutions: XLA" in first  # two devices: XLA's, as onednn.uses_onednn says
