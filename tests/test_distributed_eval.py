"""sample.py and evaluate.py as 2 processes x 2 CPU devices over 127.0.0.1 against 1 process x 4 devices.

Both layouts run the same per-device programs, so the results must be equal: the same
samples bit for bit, the same FID. A run whose output directory the processes do not share
stops on every process with one error.
"""

import json
import os
import subprocess

import numpy as np
import pytest
import scripts
from flax import traverse_util

from diffusion_jax.evaluation import inception

pytestmark = pytest.mark.integration

TINY = os.path.join(scripts.ROOT, "tests", "tiny_config.py")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny run (tests/tiny_config.py) trained for 2 steps."""
    directory = str(tmp_path_factory.mktemp("tiny"))
    scripts.run("train.py", f"--config={TINY}", f"--workdir={directory}", "--config.train.num_steps=2")
    return directory


def test_two_processes_sample_and_score_what_one_process_does(workdir, tmp_path):
    args = [f"--workdir={workdir}", "--num_samples=64", "--batch_size=32", "--steps=4", "--seed=7"]
    scripts.run("sample.py", *args, f"--out={tmp_path / 'one'}", devices=4)
    outputs = scripts.run_distributed("sample.py", *args, f"--out={tmp_path / 'two'}")
    assert "process 1 of 2" in outputs[1][0]
    one = np.load(tmp_path / "one" / "samples.npz")["arr_0"]
    two = np.load(tmp_path / "two" / "samples.npz")["arr_0"]
    assert one.shape == (64, 16, 16, 1) and len(np.unique(one.reshape(64, -1), axis=0)) == 64
    np.testing.assert_array_equal(two, one)
    assert sorted(os.listdir(tmp_path / "two" / "shards")) == [f"00000{i}-00{p}-of-002.npz"
                                                                for i in range(2) for p in range(2)]

    weights = tmp_path / "inception.npz"
    np.savez(weights, **{"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(
        inception.random_params()).items()})
    fid = ["--mode=fid", "--dataset=digits", "--split=test", f"--inception_weights={weights}",
           f"--reference_stats={tmp_path / 'digits_test.npz'}"]
    scripts.run("evaluate.py", *fid, f"--samples={tmp_path / 'one' / 'samples.npz'}", devices=4)
    scripts.run_distributed("evaluate.py", *fid, f"--samples={tmp_path / 'two' / 'samples.npz'}")
    expected = json.loads((tmp_path / "one" / "samples_metrics.json").read_text())
    got = json.loads((tmp_path / "two" / "samples_metrics.json").read_text())
    assert np.isfinite(expected["fid"]) and got["fid"] == pytest.approx(expected["fid"], rel=1e-6)
    assert got["inception_score"] == pytest.approx(expected["inception_score"], rel=1e-6)


def test_an_output_directory_the_processes_do_not_share_is_an_error(workdir, tmp_path):
    """Each process gets its own --out (as on hosts with local disks): both stop, neither hangs."""
    port = scripts.free_port()
    args = [f"--workdir={workdir}", "--num_samples=8", "--batch_size=8", "--steps=2", "--distributed",
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    running = [subprocess.Popen(scripts.command("sample.py", *args, f"--out={tmp_path / str(i)}",
                                                f"--process_id={i}"),
                                env=scripts.environment(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
               for i in range(2)]
    results = [p.communicate(timeout=300) for p in running]
    for p, (_, err) in zip(running, results, strict=True):
        assert p.returncode == 4, err[-2000:]
        assert "is not shared between the processes" in err
    assert not (tmp_path / "0" / "samples.npz").exists()
