"""One run per workdir (``diffusion_jax.run_lock``) and the settings a resumed run may change."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import time

import pytest
import scripts

from diffusion_jax import run_lock, storage
from diffusion_jax.errors import StorageError

TINY = os.path.join(scripts.ROOT, "tests", "tiny_config.py")


def lock_file(directory, **owner):
    (directory / run_lock.LOCK_FILE).write_text(json.dumps(dict(
        dict(host=socket.gethostname(), pid=os.getpid(), run_id="other", started=time.time(),
             refreshed=time.time()),
        **owner)))


def test_a_second_lock_is_refused_naming_the_owner(tmp_path):
    first = run_lock.RunLock(storage.path(str(tmp_path)))
    with pytest.raises(StorageError, match=f"is in use by run {first.owner['run_id']} of host "
                                           f"{socket.gethostname()}, pid {os.getpid()}.*wait for it to end"):
        run_lock.RunLock(storage.path(str(tmp_path)), take_over=True)  # a live owner's lock is never taken
    first.refresh()
    first.release()
    assert not (tmp_path / run_lock.LOCK_FILE).exists()
    run_lock.RunLock(storage.path(str(tmp_path))).release()


def dead_pid():
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.integration
def test_the_lock_of_a_process_gone_from_this_host_is_taken_over(tmp_path, capsys):
    lock_file(tmp_path, pid=dead_pid())  # a crash, kill -9: a restart resumes the run
    run_lock.RunLock(storage.path(str(tmp_path))).release()
    assert "taking over the lock of run other of host" in capsys.readouterr().out


def test_a_stale_lock_of_another_host_is_taken_over_only_when_asked(tmp_path, capsys):
    lock_file(tmp_path, host="elsewhere", pid=1, refreshed=time.time() - 3600)
    with pytest.raises(StorageError,
                       match="not refreshed for 30 minutes: if that run is gone, add --take_over_lock"):
        run_lock.RunLock(storage.path(str(tmp_path)))
    taken = run_lock.RunLock(storage.path(str(tmp_path)), take_over=True)
    assert "taking over the lock of run other of host elsewhere" in capsys.readouterr().out
    # and taken from it in turn: it must stop, and leave the new owner's lock
    lock_file(tmp_path, run_id="third")
    with pytest.raises(StorageError, match="was taken over by run third"):
        taken.refresh()
    taken.release()
    assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text())["run_id"] == "third"


@pytest.mark.parametrize("text", ["", "{\"host\": ", "not json"])
def test_a_lock_file_that_names_no_run_says_so_and_is_taken_over_when_asked(tmp_path, capsys, text):
    (tmp_path / run_lock.LOCK_FILE).write_text(text)
    with pytest.raises(StorageError) as refused:
        run_lock.RunLock(storage.path(str(tmp_path)))
    assert str(refused.value) == (f"{tmp_path / run_lock.LOCK_FILE} names no run: it is empty or damaged "
                                  "(a run killed while writing it?); if no run uses this --workdir "
                                  "directory, add --take_over_lock")
    run_lock.RunLock(storage.path(str(tmp_path)), take_over=True).release()
    assert "which names no run" in capsys.readouterr().out


def snapshot(directory):
    """The finished checkpoints' files under ``directory``, by relative path; the files of a save in
    progress (Orbax's ``*.orbax-checkpoint-tmp*`` directories) come and go, so are left out."""
    files = {os.path.relpath(path, directory): path for path in scripts.local_files(directory)}
    return {name: pathlib.Path(path).read_bytes() for name, path in files.items()
            if ".orbax-checkpoint-tmp" not in name}


@pytest.mark.integration
def test_a_second_run_on_a_workdir_is_refused_and_changed_settings_need_a_flag(tmp_path):
    """While a run trains, another on its workdir stops before writing (the first run's checkpoints
    stay byte for byte); resumed later with another learning rate, the run lists the difference and
    refuses, and goes on with --allow_config_change, keeping the config of each start."""
    workdir = tmp_path / "run"
    args = [f"--config={TINY}", f"--workdir={workdir}", "--config.train.num_steps=100000",
            "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=1000"]
    first = subprocess.Popen(scripts.command("train.py", *args), env=scripts.environment(1),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:
            if line.startswith("step 4/"):
                break
        saved = {}
        for _ in range(120):  # until a save has finished
            time.sleep(1)
            saved = snapshot(workdir / "checkpoints")
            if saved:
                break
        assert saved, "the first run finished no checkpoint in 2 minutes"
        second = scripts.run("train.py", *args, "--config.optim.lr=5e-4", expect=4)
        lines = second.stderr.strip().splitlines()
        assert (len(lines) == 1
                and lines[0].startswith(f"error: {workdir} is in use by run ")), second.stderr[-2000:]
        assert "wait for it to end, or use another --workdir" in lines[0]
        now = snapshot(workdir / "checkpoints")
        assert all(now.get(p) == b for p, b in saved.items())
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    assert first.returncode == -signal.SIGTERM, err[-2000:]
    assert not (workdir / run_lock.LOCK_FILE).exists()  # released at the end

    resume = [f"--config={TINY}", f"--workdir={workdir}", "--config.train.num_steps=100000",
              "--config.optim.lr=5e-4"]
    refused = scripts.run("train.py", *resume, expect=2)
    assert ("error: the workdir's checkpoint was trained with other settings: optim.lr (0.001 in the "
            "checkpoint, 0.0005 now)") in refused.stderr
    stopped = int(err.split("interrupted by SIGTERM: saved step ")[1].split(";")[0])
    went_on = scripts.run("train.py", *resume[:2], f"--config.train.num_steps={stopped + 2}",
                          "--config.optim.lr=5e-4", "--allow_config_change")
    assert "going on with changed settings: optim.lr (0.001 in the checkpoint, 0.0005 now)" in went_on.stdout
    starts = sorted(os.listdir(workdir / "configs"))
    assert len(starts) == 2  # the first run's start and this one's; the refused ones wrote nothing
    assert json.loads((workdir / "configs" / starts[1]).read_text())["optim"]["lr"] == 5e-4
