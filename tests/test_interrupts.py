"""SIGINT and SIGTERM end a training run promptly in every phase (``diffusion_jax.interrupts``)."""

import os
import signal
import subprocess
import time

import pytest
import scripts

from diffusion_jax import interrupts, run_lock

TINY = os.path.join(scripts.ROOT, "tests", "tiny_config.py")
# the CIFAR-10 network's shape on the tiny run's 16x16 digits: its train step compiles for ~25 s here
SLOW_TO_COMPILE = ("--config.model.ch=128", "--config.model.ch_mult=(1,2,2,2)",
                   "--config.model.num_res_blocks=2")


def start(workdir, *overrides):
    return subprocess.Popen(scripts.command("train.py", f"--config={TINY}", f"--workdir={workdir}",
                                            *overrides),
                            env=scripts.environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def read_until(process, prefix: str) -> str:
    for line in process.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"the run ended before printing {prefix!r}: {process.stderr.read()[-3000:]}")


def saved_steps(workdir) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_train_step_compiles_stops_the_run_at_once(tmp_path, signum):
    process = start(tmp_path, "--config.train.num_steps=1000", *SLOW_TO_COMPILE)
    read_until(process, "compiling the train step")
    time.sleep(1)
    sent = time.monotonic()
    process.send_signal(signum)
    out, err = process.communicate(timeout=300)
    elapsed = time.monotonic() - sent
    assert "compiled and ran the first step" not in out, ("the compilation ended before the signal: the test "
                                                          "needs a slower one")
    assert process.returncode == -signum, err[-3000:]
    assert elapsed < 5, f"{elapsed:.1f} s from the signal to the end of the process"
    name = signal.Signals(signum).name
    assert err.strip().splitlines()[-1] == (f"interrupted by {name}: stopped at once; nothing after the last "
                                            "checkpoint was saved"), err[-3000:]
    assert "Fatal Python error" not in err and "Traceback" not in err
    assert not (tmp_path / run_lock.LOCK_FILE).exists()
    assert saved_steps(tmp_path) == []


def test_sigint_in_training_saves_the_current_step_and_the_same_command_resumes_from_it(tmp_path):
    overrides = ("--config.train.num_steps=100000",)
    process = start(tmp_path, *overrides)
    read_until(process, "step 3/")
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGINT, err[-3000:]
    assert "SIGINT: saving after this step, then stopping" in out
    saved = int(err.split("interrupted by SIGINT: saved step ")[1].split(";")[0])
    assert saved >= 3 and saved_steps(tmp_path)[-1] == saved
    assert not (tmp_path / run_lock.LOCK_FILE).exists()
    resumed = scripts.run("train.py", f"--config={TINY}", f"--workdir={tmp_path}",
                          f"--config.train.num_steps={saved + 1}")
    assert f"resumed from the checkpoint of step {saved}" in resumed.stdout


def test_in_the_loop_the_first_signal_is_a_request_and_the_second_stops_at_once():
    # Python's own SIGINT handler, or SIG_IGN where the test runs in a background job of a shell
    before = signal.getsignal(signal.SIGINT)
    with interrupts.Signals() as signals:
        with pytest.raises(interrupts.Interrupted) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in this thread as soon as the signal arrives
        assert stopped.value.signum == signal.SIGTERM and "stopped at once" in str(stopped.value)

    with interrupts.Signals() as signals:
        signals.deferring = True
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert signals.requested and signals.received == signal.SIGINT
        with pytest.raises(interrupts.Interrupted) as stopped:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        assert stopped.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before  # restored
