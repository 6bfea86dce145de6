"""sample.py end to end on a quickstart workdir: outputs of each mode, resuming, bad input."""

import json
import os
import socket
import subprocess
import time

import numpy as np
import pytest
import scripts

pytestmark = pytest.mark.integration


def sample(workdir, out, *args, expect=0):
    return scripts.run("sample.py", f"--workdir={workdir}", f"--out={out}", *args, expect=expect)


def test_samples_mode_writes_the_npz_and_a_grid(quickstart_workdir, tmp_path):
    result = sample(quickstart_workdir, tmp_path, "--num_samples=40", "--batch_size=16", "--steps=10")
    images = np.load(tmp_path / "samples.npz")["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (40, 16, 16, 1)
    assert len(np.unique(images.reshape(40, -1), axis=0)) == 40
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert sorted(os.listdir(tmp_path / "shards")) == [f"00000{i}-000-of-001.npz" for i in range(3)]
    assert "wrote 40 samples" in result.stdout and not (tmp_path / "run.lock").exists()  # released
    settings = json.loads((tmp_path / "sampling.json").read_text())
    assert settings["sample"]["steps"] == 10 and settings["model"].endswith("checkpoints/300 (ema)")


@pytest.mark.parametrize("mode, args, files", [
    ("progressive", ["--num_samples=2"], ["progressive_xt.png", "progressive_x0.png"]),
    ("progressive", ["--num_samples=2", "--sampler=dpm_solver++", "--steps=10", "--order=3"],
     ["progressive_xt.png", "progressive_x0.png"]),
    ("samples", ["--num_samples=16", "--sampler=dpm_solver++", "--steps=10"], ["samples.npz", "samples.png"]),
    ("interpolate", ["--num_samples=2", "--num_interp=4", "--steps=10"], ["interpolate.png"]),
    ("interpolate_diffused", ["--num_samples=1", "--num_interp=3", "--t=20"], ["interpolate_diffused.png"]),
    ("reconstruct", ["--num_samples=4", "--steps=20", "--noclip_x0"],
     ["reconstruct.png", "reconstruct.json"]),
])
def test_figure_modes_write_their_grids(quickstart_workdir, tmp_path, mode, args, files):
    sample(quickstart_workdir, tmp_path, f"--mode={mode}", *args)
    for name in files:
        assert (tmp_path / name).stat().st_size > 0


def test_an_interrupted_run_resumes_without_duplicating_or_skipping(quickstart_workdir, tmp_path):
    args = ["--num_samples=1000", "--batch_size=100", "--steps=5", "--seed=3"]
    sample(quickstart_workdir, tmp_path / "whole", *args)
    expected = np.load(tmp_path / "whole" / "samples.npz")["arr_0"]

    out = tmp_path / "interrupted"
    process = subprocess.Popen(scripts.command("sample.py", f"--workdir={quickstart_workdir}", f"--out={out}",
                                               *args),
                               env=scripts.environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)

    def complete_shards():
        return ([f for f in os.listdir(out / "shards") if f.endswith(".npz")] if (out / "shards").is_dir()
                else [])

    while len(complete_shards()) < 3 and process.poll() is None:  # kill -9 once three shards are written
        time.sleep(0.02)
    process.kill()
    process.wait()
    written = sorted(os.listdir(out / "shards"))
    assert 3 <= len([f for f in written if f.endswith(".npz") and ".tmp" not in f]) < 10, written
    assert not (out / "samples.npz").exists()
    # as a kill mid-write leaves
    (out / "shards" / "000009-000-of-001.npz.tmp-99999").write_bytes(b"half a share")
    result = sample(quickstart_workdir, out, *args)
    assert "taking over the lock of run " in result.stdout and "which is gone" in result.stdout  # kill -9's
    assert "samples, 5 network evaluations each: 1000/1000" in result.stdout  # DDIM on 5 timesteps
    assert json.loads((out / "sampling.json").read_text())["network_evaluations"] == 5
    assert not [f for f in os.listdir(out / "shards") if ".tmp-" in f]
    resumed = np.load(out / "samples.npz")["arr_0"]
    np.testing.assert_array_equal(resumed, expected)
    assert len(np.unique(resumed.reshape(1000, -1), axis=0)) == 1000


@pytest.mark.parametrize("args, message, status", [
    ([f"--config={scripts.ROOT}/configs/quickstart.py", "--config.model.ch=64"], "different network", 5),
    (["--sampler=ddpm", "--eta=0.5"], "sample.eta", 2),
    (["--sampler=dpm_solver++", "--spacing=quad"], "one of logSNR, time_uniform, time_quadratic with sampler",
     2),
    (["--sampler=dpm_solver++", "--order=4"], "sample.order", 2),
    (["--t=10"], "--t applies to --mode=interpolate_diffused", 2),
    (["--mode=interpolate", "--eta=1.0"], "deterministic DDIM", 2),
    (["--fid", "--inception_weights=/nonexistent/pt_inception.pth"], "pt_inception-2015-12-05", 6),
    (["--step=7"], "no checkpoint of step 7", 5),
    (["--guidance=1"], "--guidance needs a class-conditional model; this one is unconditional", 2),
    (["--class_label=3"], "--class_label needs a class-conditional model", 2),
    (["--sampler=ddim", "--threshold=0.995"], "sample.threshold", 2),
])
def test_bad_input_is_a_clear_error(quickstart_workdir, tmp_path, args, message, status):
    result = sample(quickstart_workdir, tmp_path, *args, expect=status)
    assert message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "sampling.json").exists()  # nothing is written before the input is checked


def test_a_second_sample_py_on_the_same_out_is_refused_naming_the_first(quickstart_workdir, tmp_path):
    """As the workdir's lock (run_lock): OUT/run.lock of a live process on this host (this test's)."""
    owner = dict(host=socket.gethostname(), pid=os.getpid(), run_id="first", started=time.time(),
                 refreshed=time.time())
    (tmp_path / "run.lock").write_text(json.dumps(owner))
    result = sample(quickstart_workdir, tmp_path, "--num_samples=8", "--batch_size=8", expect=4)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {tmp_path} is in use by run first of host "), lines
    assert lines[0].endswith("wait for it to end, or use another --out"), lines
    assert sorted(os.listdir(tmp_path)) == ["run.lock"]
    assert json.loads((tmp_path / "run.lock").read_text()) == owner

    # a lock of another host, not refreshed for an hour: its run may live behind a partition, so the
    # message says so, and --take_over_lock takes it over
    lost = dict(owner, host="another-host", refreshed=time.time() - 3600)
    (tmp_path / "run.lock").write_text(json.dumps(lost))
    refused = sample(quickstart_workdir, tmp_path, "--num_samples=8", "--batch_size=8", expect=4)
    assert "if that run is gone, add --take_over_lock" in refused.stderr, refused.stderr
    taken = sample(quickstart_workdir, tmp_path, "--num_samples=8", "--batch_size=8", "--take_over_lock")
    assert "taking over the lock of run first of host another-host" in taken.stdout
    assert (tmp_path / "samples.npz").exists() and not (tmp_path / "run.lock").exists()


@pytest.mark.parametrize("value", ["0", "-3", "ten"])
def test_num_samples_must_be_a_positive_integer(quickstart_workdir, tmp_path, value):
    result = sample(quickstart_workdir, tmp_path, f"--num_samples={value}", expect=2)
    assert result.stderr.strip().startswith(f"error: flag --num_samples={value}: ")


def test_resuming_with_other_settings_is_refused(quickstart_workdir, tmp_path):
    sample(quickstart_workdir, tmp_path, "--num_samples=8", "--batch_size=8", "--steps=5")
    result = sample(quickstart_workdir, tmp_path, "--num_samples=8", "--batch_size=8", "--steps=6", expect=2)
    assert "other settings" in result.stderr and "use a new --out" in result.stderr
