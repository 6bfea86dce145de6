"""Bad input is one line, ``error: <what is wrong and the fix>``, with its kind's exit status
(``diffusion_jax.errors``); a bug keeps its traceback."""

import contextlib
import importlib.util
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import scripts
import torch

from diffusion_jax import checkpoints, convert, errors, host_tensorflow, launch, storage, train_lib
from diffusion_jax.evaluation import inception

TINY = os.path.join(scripts.ROOT, "tests", "tiny_config.py")


def one_line_error(result, status: int) -> str:
    """The single line of stderr of a run that stopped with ``status``."""
    assert result.returncode == status, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def train(workdir, *args):
    return subprocess.run(scripts.command("train.py", f"--workdir={workdir}", *args),
                          env=scripts.environment(1), capture_output=True, text=True, timeout=300,
                          cwd=scripts.ROOT)


@pytest.mark.parametrize("args, message", [
    ([f"--config={TINY}", "--config.unknown_key=1"],
     "error: --config.unknown_key: the config has no key unknown_key; its top-level keys are data, "
     "diffusion, eval, model, optim, sample, seed, train"),
    ([f"--config={TINY}", "--config.trian.num_steps=3"],
     "error: --config.trian.num_steps: the config has no key trian.num_steps; did you mean train.num_steps"),
    ([f"--config={TINY}", "--config.model.ch_mult=abc"],
     "error: config.model.ch_mult = ('abc',) is not allowed: a tuple of integers, such as "
     "--config.model.ch_mult='(1, 2, 2, 2)'"),
    ([f"--config={TINY}", "--config.train.num_steps=ten"],
     "error: flag --config.train.num_steps=ten: invalid literal for int() with base 10: 'ten'"),
    (["--config=configs/cifar100.py"],
     "error: --config=configs/cifar100.py: cannot load it: [Errno 2] No such file"),
])
@pytest.mark.integration
def test_bad_config_flags_are_one_line_with_status_2(tmp_path, args, message):
    line = one_line_error(train(tmp_path / "run", *args), 2)
    assert line.startswith(message), line
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_a_config_file_that_is_not_python_is_one_line_naming_its_line(tmp_path):
    (tmp_path / "config.py").write_text("def get_config(:\n    pass\n")
    line = one_line_error(train(tmp_path / "run", f"--config={tmp_path / 'config.py'}"), 2)
    assert line == (f"error: {tmp_path / 'config.py'}, line 1: invalid syntax (the config file is not valid "
                    "Python)")


@contextlib.contextmanager
def mounted_tmpfs(directory, options):
    """A tmpfs at ``directory`` (root only; where mounting is not allowed the test is skipped, saying so)."""
    directory.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}), which this test needs")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@pytest.mark.integration
def test_a_read_only_workdir_is_a_storage_error_before_anything_runs(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as read_only:
        line = one_line_error(train(read_only / "run", f"--config={TINY}"), 4)
    assert line.startswith(f"error: cannot write to workdir {read_only / 'run'}: OSError: [Errno 30] "
                           "Read-only file system"), line


def test_files_that_are_not_what_was_expected_name_themselves(tmp_path):
    empty, text = tmp_path / "empty.npz", tmp_path / "text.npz"
    empty.write_bytes(b"")
    text.write_text("not arrays\n")
    for path in (empty, text):
        with pytest.raises(errors.DataError, match=f"{path} is not an .npz file of arrays"):
            storage.load_npz(storage.path(str(path)))
    with pytest.raises(errors.DataError, match="no such file"):
        storage.load_npz(storage.path(str(tmp_path / "none.npz")))
    (tmp_path / "sampling.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(errors.DataError, match=f"{tmp_path / 'sampling.json'} is not a JSON file"):
        storage.read_json(storage.path(str(tmp_path / "sampling.json")))
    with pytest.raises(errors.DataError, match="no such file"):
        inception.load_params(str(tmp_path / "none.pth"))
    weights = tmp_path / "weights.pth"
    for seed in range(200):  # on garbage, torch's unpickler raises errors of many kinds (IndexError too)
        weights.write_bytes(np.random.default_rng(seed).bytes(1000))
        with pytest.raises(errors.DataError,
                           match=r"weights.pth could not be read as a PyTorch state dict \(pt_inception"):
            inception.load_params(str(weights))
    torch.save([torch.zeros(3)], weights)
    with pytest.raises(errors.DataError, match="weights.pth holds a list, not a PyTorch state dict"):
        inception.load_params(str(weights))
    with pytest.raises(errors.CheckpointError, match="model.ckpt-790000 is not a TF checkpoint prefix"):
        convert.load_tf_checkpoint(str(tmp_path / "model.ckpt-790000"))
    with pytest.raises(errors.CheckpointError,
                       match="none is not a diffusers UNet2DModel directory: it has no config.json"):
        convert.load_diffusers(str(tmp_path / "none"))


# One bad input per entry point, each a one-line error whatever the CPU. TensorFlow prints log lines
# while it loads (host_tensorflow) on CPUs where its oneDNN operations are on by default (AVX-512
# VNNI/BF16, AMX) and not on others; TF_ENABLE_ONEDNN_OPTS=1 makes it print them on any CPU.
ENTRY_POINT_ERRORS = {
    "train": (["train.py", f"--config={TINY}", "--workdir={tmp}/run",
               "--config.data.name=tfds:no_such_dataset"], 6, "error: tfds has no dataset 'no_such_dataset'"),
    "sample": (["sample.py", "--workdir={tmp}/none", "--out={tmp}/out"],
               5, "error: {tmp}/none holds no checkpoints"),
    "evaluate": (["evaluate.py", "--mode=fid", "--samples={tmp}/samples.npz"],
                 6, "error: {tmp}/samples.npz is not an .npz file of arrays"),
    "convert": (["-m", "diffusion_jax.convert", "--tf-checkpoint={tmp}/none", "--out={tmp}/out"],
                5, "error: {tmp}/none is not a TF checkpoint prefix"),
    "prepare_data": (["-m", "diffusion_jax.prepare_data", "--source=tfds:no_such_dataset", "--out={tmp}/out",
                      "--image_size=8"], 6, "error: tfds has no dataset 'no_such_dataset'"),
    "inception": (["-m", "diffusion_jax.evaluation.inception", "--convert={tmp}/none.pth", "--out={tmp}/out"],
                  6, "error: {tmp}/none.pth: no such file"),
}


@pytest.mark.parametrize("onednn", ["as TensorFlow chooses", "1"])
@pytest.mark.parametrize("entry_point", ENTRY_POINT_ERRORS)
@pytest.mark.integration
def test_an_entry_points_error_is_one_line_on_any_cpu(tmp_path, entry_point, onednn):
    args, status, start = ENTRY_POINT_ERRORS[entry_point]
    (tmp_path / "samples.npz").write_text("not arrays\n")
    env = scripts.environment(1)
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    if onednn == "1":
        env["TF_ENABLE_ONEDNN_OPTS"] = "1"
    args = [a.format(tmp=tmp_path) for a in args]
    command = [sys.executable, *args] if args[0] == "-m" else scripts.command(*args)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=scripts.ROOT)
    assert one_line_error(result, status).startswith(start.format(tmp=tmp_path))
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_tensorflows_start_up_lines_go_to_the_debug_log_and_back_to_stderr_on_failure(capfd, caplog):
    caplog.set_level(logging.DEBUG)
    with host_tensorflow.stderr_to_log("loading"):
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to "
                    b"STDERR\nI0000 port.cc:153] oneDNN custom operations are on\n")
    assert capfd.readouterr().err == ""
    assert [r.getMessage() for r in caplog.records] == [
        "loading: WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "loading: I0000 port.cc:153] oneDNN custom operations are on"]
    with pytest.raises(ImportError), host_tensorflow.stderr_to_log("loading"):
        os.write(2, b"why the import failed\n")
        raise ImportError("no module")
    assert capfd.readouterr().err == "why the import failed\n"


def test_only_the_projects_errors_are_shortened():
    with pytest.raises(SystemExit) as stopped, contextlib.redirect_stderr(open(os.devnull, "w")):
        with launch.one_line_errors():
            raise errors.StorageError("disk full")
    assert stopped.value.code == 4
    with pytest.raises(KeyError), launch.one_line_errors():  # a bug: its traceback is kept
        json.loads("{}")["step"]
    kinds = (errors.ConfigError, errors.NonFiniteError, errors.StorageError, errors.CheckpointError,
             errors.DataError)
    assert [kind.exit_status for kind in kinds] == [2, 3, 4, 5, 6]


@pytest.mark.integration
def test_a_full_disk_is_reported_at_the_failing_save_and_earlier_checkpoints_stay(tmp_path):
    """30 MB hold two checkpoints of the tiny run (~11 MB each), not three. Orbax's and asyncio's
    tracebacks of the failed save (~1,500 lines) are in the debug log: stderr is the error line."""
    with mounted_tmpfs(tmp_path / "small", "size=30m") as small:
        workdir = small / "run"
        command = (f"--config={TINY}", "--config.train.num_steps=20", "--config.train.checkpoint_every=2",
                   "--config.train.keep_checkpoints=100")
        result = train(workdir, *command)
        assert result.returncode == 4, result.stderr[-3000:]
        assert len(result.stderr.strip().splitlines()) <= 5, result.stderr[-3000:]
        errors_ = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors_) == 1 and errors_[0].startswith(
            f"error: saving the checkpoint of step 6 in {workdir / 'checkpoints'} failed: "
        ), result.stderr[-3000:]
        assert ("No space left on device" in errors_[0]
                and errors_[0].endswith("the checkpoints before it are intact"))
        assert "step 6/20" in result.stdout and "step 9/20" not in result.stdout  # seen within the next steps
        complete = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
        assert complete == ["2", "4"]
        again = train(workdir, *command)  # on the disk still full: the same, as briefly
        assert again.returncode == 4 and len(again.stderr.strip().splitlines()) <= 5, again.stderr[-3000:]
        assert "resumed from the checkpoint of step 4" in again.stdout
        config = train_lib_config()
        with checkpoints.checkpoint_manager(storage.checkpoint_path(str(workdir)), config,
                                            create=False) as manager:
            state = checkpoints.restore_state(manager, 4, train_lib.Trainer(config).abstract_state())
        assert int(state.step) == 4


def train_lib_config():
    spec = importlib.util.spec_from_file_location("tiny_config", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


LIBRARY_ERRORS = """
import asyncio, logging, sys
from diffusion_jax import progress

logging.getLogger().addHandler(logging.StreamHandler(sys.stderr))
if "demoted" in sys.argv:
    progress.library_errors_to_debug_log()
logging.getLogger("asyncio").error("Future exception was never retrieved")
logging.getLogger("absl").handle(logging.LogRecord(
    "absl", logging.ERROR, "/site-packages/orbax/checkpoint/future.py", 1, "save failed", None, None))
logging.getLogger("diffusion_jax").error("ours")

async def write():
    raise OSError("No space left on device")

async def save():
    return asyncio.ensure_future(write()), await asyncio.sleep(0.01)

kept = asyncio.run(save())  # a failed task nobody awaited, as the error of a failed save keeps them
if "at-exit" not in sys.argv:
    del kept  # the error dropped after it was reported: the task logs 'Task exception was never retrieved'
"""


@pytest.mark.integration
def test_orbax_and_asyncio_errors_go_to_the_debug_log_to_the_exit_and_others_stay():
    """Also the 'Task exception was never retrieved' of the failed save's tasks, which the error
    reporting the save keeps alive after the error line (CI saw it there) or to the exit."""
    def run(*args):
        return subprocess.run([sys.executable, "-c", LIBRARY_ERRORS, *args], capture_output=True, text=True,
                              timeout=120, cwd=scripts.ROOT, env=scripts.environment(1))

    for when in ("after the error", "at-exit"):
        result = run("demoted", when)
        assert result.returncode == 0, result.stderr
        assert result.stderr.splitlines() == ["ours"], when
    bare = run()
    assert "Task exception was never retrieved" in bare.stderr  # what the test guards against is there


def test_a_library_error_is_described_by_its_cause_without_tensorstore_annotations():
    """Orbax's wrapper of a failed array read (a truncated file) and TensorStore's error under it."""
    said = ('OUT_OF_RANGE: Error reading "params.conv.kernel/0" in OCDBT database at local file "/w/4/": '
            "Requested byte range [0, 9) is not valid")
    cause = ValueError(said + " [tensorstore_spec='{\"driver\": \"zarr\"}'] "
                       "[source locations='tensorstore/kvstore/ocdbt.cc:12']")
    try:
        try:
            raise cause
        except ValueError as e:
            raise Exception("Encountered error while reading array index: (slice(0, 3, 1),). See full "
                            "TensorStore details: <bound method pybind11.spec of TensorStore({\n") from e
    except Exception as wrapped:  # noqa: BLE001
        assert errors.described(wrapped) == f"ValueError: {said}"
    assert errors.described(OSError("disk\nfull")) == "OSError: disk"
