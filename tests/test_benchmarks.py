"""The benchmark commands that no test of the library would run: they must not rot between the
occasions (a GPU or TPU for an hour) they are meant for."""

import json
import subprocess
import sys

import pytest
import scripts

from benchmarks import accelerator


@pytest.mark.integration
def test_accelerator_benchmark_runs_its_tiny_configuration_on_the_cpu(tmp_path):
    out = tmp_path / "accelerator.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.accelerator", "--reps", "2", "--json",
                             str(out)],
                            cwd=scripts.ROOT, env=scripts.environment(1), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["backend"] == "cpu" and report["tiny"]
    assert [w["workload"] for w in report["workloads"]] == list(accelerator.WORKLOADS)
    for w in report["workloads"]:
        assert "error" not in w, w
        assert len(w["times"]) == 2 and w["images_per_s"] == w["images"] / w["median_s"] > 0, w
        assert w["compile_s"] > 0 and w["peak_memory_bytes"] is None  # the CPU keeps no device memory count
    for w in report["workloads"][:3]:  # the train steps
        assert w["flops_per_device"] > 0 and w["mfu"] is None  # no peak is known for a CPU
        assert w["projected_run_s"] == w["median_s"] * w["num_steps"]
    assert "train_cifar10_float32" in result.stdout and "800,000 steps" in result.stdout


def test_the_256_network_is_measured_at_the_largest_batch_that_fits(monkeypatch):
    tried = []

    def in_process(name, args, batch=None):
        tried.append(batch)
        if batch > 16:
            return dict(workload=name, error="jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: ...",
                        out_of_memory=True)
        return dict(workload=name, batch=batch)

    monkeypatch.setattr(accelerator, "_in_process", in_process)
    args = type("Args", (), dict(tiny=False))
    assert accelerator.measure_256(args) == dict(workload="train_256", batch=16)
    assert tried == [64, 32, 16]
    failure = dict(error="ValueError: bad", out_of_memory=False)
    monkeypatch.setattr(accelerator, "_in_process", lambda name, args, batch=None: failure)
    assert accelerator.measure_256(args) == failure  # other errors are not retried


@pytest.mark.integration
def test_the_train_step_runs_one_all_reduce_of_the_gradients():
    """Data parallelism over 8 devices: one collective a step, carrying the gradients (and the loss)."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.collectives", "--config=tests/tiny_config.py",
                             "--json"],
                            cwd=scripts.ROOT, env=scripts.environment(8), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    analysis = json.loads(result.stdout.strip().splitlines()[-1])
    assert [c["kind"] for c in analysis["collectives"]] == ["all-reduce"], analysis["collectives"]
    gradients = 4 * analysis["parameters"]
    # the CPU's compiler all-reduces a strided convolution's weight gradient in 4 phases: 4% more here
    assert gradients <= analysis["collectives"][0]["bytes"] <= 1.1 * gradients
