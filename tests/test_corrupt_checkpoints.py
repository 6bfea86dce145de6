"""A checkpoint that cannot be read is set aside (never deleted) and the one before it resumed."""

import importlib.util
import os
import shutil

import pytest
import scripts

from diffusion_jax import checkpoints, errors, storage, train_lib

pytestmark = pytest.mark.integration

TINY = os.path.join(scripts.ROOT, "tests", "tiny_config.py")


def tiny_config():
    spec = importlib.util.spec_from_file_location("tiny_config", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with the checkpoints of steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    scripts.run("train.py", f"--config={TINY}", f"--workdir={workdir}", "--config.train.num_steps=4",
                "--config.train.checkpoint_every=2")
    return workdir


def data_files(step_dir):
    return sorted((step_dir / "state" / "ocdbt.process_0" / "d").iterdir())


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def largest(step_dir):
    return max(data_files(step_dir), key=lambda path: path.stat().st_size)


def flip_bytes(path, count=8):
    """``count`` bytes in the middle of ``path`` inverted: damage that the file's format does not see."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "array file truncated": lambda s: truncate(largest(s)),
    "every array file truncated": lambda s: [truncate(p) for p in data_files(s)],
    "array file deleted": lambda s: largest(s).unlink(),
    "array manifest deleted": lambda s: (s / "state" / "manifest.ocdbt").unlink(),
    "state metadata garbage": lambda s: (s / "state" / "_METADATA").write_bytes(b"\xff\x00garbage"),
    "config garbage": lambda s: (s / "config" / "metadata").write_bytes(b"\xff\x00garbage"),
    "state directory deleted": lambda s: shutil.rmtree(s / "state"),
    "8 bytes flipped in the largest array file": lambda s: flip_bytes(largest(s)),
}


def resume_point(workdir):
    """What train_and_evaluate reads, in its order: the latest readable config, then state."""
    config = tiny_config()
    path = storage.checkpoint_path(str(workdir))
    with checkpoints.checkpoint_manager(path, config, create=False) as manager:
        checkpoints.latest_readable(manager, path, lambda step: checkpoints.restore_config(manager, step))
        abstract = train_lib.Trainer(config).abstract_state()
        return checkpoints.latest_readable(manager, path,
                                           lambda step: checkpoints.restore_state(manager, step, abstract))


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_each_corruption_of_the_latest_checkpoint_falls_back_to_the_previous(trained, tmp_path, capsys,
                                                                             corrupt):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    corrupt(workdir / "checkpoints" / "4")
    step, state = resume_point(workdir)
    assert step == 2 and int(state.step) == 2
    aside = os.listdir(workdir / "unreadable_checkpoints")
    assert len(aside) == 1 and aside[0].startswith("4-")  # moved, not deleted
    warning = capsys.readouterr().err
    assert "warning: the checkpoint of step 4 cannot be read (" in warning
    # the library's own words, without Orbax's quoted method repr or TensorStore's JSON spec
    assert "<bound method" not in warning and "pybind11" not in warning and "tensorstore_spec" not in warning
    assert len(warning) < 800, warning
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]


def test_with_no_readable_checkpoint_the_run_stops_naming_them(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    for step in ("2", "4"):
        CORRUPTIONS["array file deleted"](workdir / "checkpoints" / step)
    result = scripts.run("train.py", f"--config={TINY}", f"--workdir={workdir}", "--config.train.num_steps=6",
                         expect=5)
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: none of the checkpoints of steps [2, 4] in {workdir / 'checkpoints'} can be read")
    assert len(os.listdir(workdir / "unreadable_checkpoints")) == 2


@pytest.mark.parametrize("corruption", ["array file deleted", "8 bytes flipped in the largest array file"])
def test_sampling_reads_the_latest_readable_checkpoint(trained, tmp_path, corruption):
    """sample.py and evaluate.py (checkpoints.load): a step asked for that cannot be read is an error;
    otherwise the latest readable one is loaded, an unreadable one set aside as train.py does."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    CORRUPTIONS[corruption](workdir / "checkpoints" / "4")
    with pytest.raises(errors.CheckpointError,
                       match=f"the checkpoint of step 4 in {workdir / 'checkpoints'} cannot"):
        checkpoints.load(workdir=str(workdir), step=4)
    assert checkpoints.load(workdir=str(workdir)).source == f"{workdir / 'checkpoints' / '2'} (ema)"
    assert os.listdir(workdir / "unreadable_checkpoints")[0].startswith("4-")


def test_a_run_restarted_on_silently_damaged_arrays_resumes_from_the_step_before(trained, tmp_path):
    """Bytes flipped inside an array file decode without an error: the digests saved with the
    checkpoint catch them, and the same command moves the step aside, resumes and finishes."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    flip_bytes(largest(workdir / "checkpoints" / "4"))
    result = scripts.run("train.py", f"--config={TINY}", f"--workdir={workdir}", "--config.train.num_steps=6",
                         "--config.train.checkpoint_every=2")
    assert "warning: the checkpoint of step 4 cannot be read (DigestMismatch: 1 array(s) differ from " \
           "their checksums saved with the checkpoint: " in result.stderr, result.stderr
    assert "resumed from the checkpoint of step 2" in result.stdout
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]
