"""``train.py --compile_for``: the train step compiled by the real XLA:TPU compiler on this CPU host.

libtpu (JAX's ``tpu`` extra, at the version the installed JAX pins) is installed for this module
only, into a directory of its own on the PYTHONPATH of its subprocesses: with libtpu importable
every JAX start probes for TPUs, so the other tests' processes never see it.
"""

import importlib.metadata
import subprocess
import sys

import pytest
import scripts

from diffusion_jax import train_lib

TINY = f"{scripts.ROOT}/tests/tiny_config.py"


@pytest.fixture(scope="module")
def libtpu(tmp_path_factory):
    """A directory holding the libtpu that ``jax[tpu]`` of the installed JAX requires."""
    wanted = next(r.split(";")[0] for r in importlib.metadata.requires("jax") if r.startswith("libtpu"))
    directory = tmp_path_factory.mktemp("libtpu")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                    str(directory), wanted], check=True, timeout=900)
    return str(directory)


def compile_for(*args, expect=0, **variables):
    result = scripts.run("train.py", f"--config={TINY}", *args, expect=expect, **variables)
    return result.stdout, result.stderr


def test_the_tiny_train_step_compiles_for_a_v5e_slice_and_fits(libtpu):
    out, err = compile_for("--compile_for=v5e:2x2", PYTHONPATH=libtpu)
    assert err == "", err  # libtpu's warnings of a host without TPUs are in the debug log
    lines = out.splitlines()
    assert lines[1].startswith("train step on v5e:2x2 (4 x TPU v5 lite), global batch 8: compiled in "), out
    assert len(lines) == 5, out  # the train step only, without --compile_evaluation
    assert lines[2].startswith("  per device: arguments ") and "of them in donated arguments" in lines[2]
    assert lines[3].startswith("  total ") and lines[3].endswith(" of the device's 16.00 GiB HBM: fits"), out
    assert " GFLOP per device per step; projected step time (not measured): " in lines[4]
    assert "197.0 TFLOP/s bfloat16 peak" in lines[4]


def test_with_compile_evaluation_the_sampling_and_fid_programs_compile_too(libtpu):
    """A v3-8 (8 TensorCores) and eval.batch_size 8: the Inception compiles in ~40 s for v3 here,
    several minutes for v5e."""
    out, err = compile_for("--compile_for=v3:2x2", "--compile_evaluation", "--config.eval.batch_size=8",
                           PYTHONPATH=libtpu)
    assert err == "", err
    headers = [line.split(": compiled in ")[0] for line in out.splitlines() if ": compiled in " in line]
    assert headers == ["train step on v3:2x2 (8 x TPU v3), global batch 8",
                       "sampling (ddim, 5 network evaluations) on v3:2x2 (8 x TPU v3), global batch 8",
                       "FID features on v3:2x2 (8 x TPU v3), global batch 8"], out
    fits = [line for line in out.splitlines() if line.startswith("  total ")]
    assert len(fits) == 3 and all(line.endswith(" of the device's 16.00 GiB HBM: fits") for line in fits), out
    # the sampling loop's FLOPs are its 5 evaluations of the network: XLA counts a loop's body once
    assert " GFLOP per device per batch (5 network evaluations of " in out
    assert " GFLOP per device per batch; projected batch time (not measured): " in out  # the features'


@pytest.mark.integration
def test_evaluation_and_batch_flags_need_compile_for():
    _, err = compile_for("--workdir=unused", "--compile_evaluation", expect=2)
    assert err.strip().endswith("--find_batch and --compile_evaluation apply to --compile_for"), err


@pytest.mark.parametrize("topology, message", [
    ("v5e:3x3", "libtpu knows no such TPU slice (INVALID_ARGUMENT: "),
    ("tpu8", "libtpu knows no such TPU slice (INVALID_ARGUMENT: "),
])
def test_an_unknown_slice_is_a_one_line_error(libtpu, topology, message):
    out, err = compile_for(f"--compile_for={topology}", expect=2, PYTHONPATH=libtpu)
    assert err.splitlines() == [err.strip()], err
    assert err.startswith(f"error: --compile_for={topology}: {message}"), err


@pytest.mark.integration
def test_without_libtpu_the_error_names_the_extra_to_install():
    _, err = compile_for("--compile_for=v5e:2x2", expect=2)
    assert err.strip() == ("error: --compile_for=v5e:2x2 needs libtpu, JAX's TPU compiler: pip install "
                           "'jax[tpu]' (the project's tpu extra, see docs/pods.md)"), err


@pytest.mark.integration
def test_without_compile_for_the_workdir_is_still_required():
    _, err = compile_for(expect=2)
    assert err.strip() == ("error: flags workdir=None, compile_for=None: --workdir is required (except with "
                           "--compile_for)"), err


@pytest.mark.parametrize("limit, start, unit, expected", [
    (100, 8, 8, 96), (8, 8, 8, 8), (7, 8, 8, None), (1000, 128, 8, 1000), (129, 128, 4, 128), (5, 64, 1, 5)])
def test_the_largest_batch_is_found_by_doubling_then_bisecting(limit, start, unit, expected):
    tried = []

    def fits(batch):
        tried.append(batch)
        assert batch % unit == 0 and batch > 0
        return batch <= limit

    assert train_lib.largest_batch(fits, start, unit) == expected
    assert len(tried) <= 2 * (max(limit, start) // unit).bit_length() + 2, tried
