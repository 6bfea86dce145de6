"""SIGINT and SIGTERM end a training run promptly in every phase (``diffusion_jax.interrupts``)."""

import gc
import os
import signal
import subprocess
import sys
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


def wait_for_handler(process, signum, timeout=60):
    """Wait until ``process`` catches ``signum`` (Linux's /proc/PID/status SigCgt mask): for SIGTERM,
    until the entry point's first lines have run ``interrupts.stop_at_once``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{process.pid}/status") as status:
            caught = int(next(line for line in status if line.startswith("SigCgt:")).split()[1], 16)
        if caught >> (signum - 1) & 1:
            return
        time.sleep(0.005)
    raise AssertionError(f"the process did not catch {signal.Signals(signum).name} within {timeout} s")


def stopped_at_once(process, signum, sent: float) -> tuple[str, str]:
    """The checks of a run stopped by ``signum`` before its loop; returns its stdout and stderr."""
    out, err = process.communicate(timeout=300)
    elapsed = time.monotonic() - sent
    assert process.returncode == -signum, err[-3000:]
    assert elapsed < 5, f"{elapsed:.1f} s from the signal to the end of the process"
    name = signal.Signals(signum).name
    assert err.strip().splitlines()[-1].startswith(f"interrupted by {name}: stopped at once"), err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err and "Fatal Python error" not in err, \
        err[-3000:]
    return out, err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.integration
def test_a_signal_while_the_train_step_compiles_stops_the_run_at_once(tmp_path, signum):
    process = start(tmp_path, "--config.train.num_steps=1000", *SLOW_TO_COMPILE)
    read_until(process, "compiling the train step")
    time.sleep(1)
    sent = time.monotonic()
    process.send_signal(signum)
    out, err = stopped_at_once(process, signum, sent)
    assert "compiled and ran the first step" not in out, "the signal was lost: the run trained"
    assert err.strip().splitlines()[-1] == (f"interrupted by {signal.Signals(signum).name}: stopped at once; "
                                            "nothing after the last checkpoint was saved")
    assert not (tmp_path / run_lock.LOCK_FILE).exists()
    assert saved_steps(tmp_path) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("moment", ["loading modules", "started JAX", "tracing the step"])
@pytest.mark.integration
def test_a_signal_at_any_moment_of_the_start_stops_the_run_at_once(tmp_path, moment, signum):
    process = start(tmp_path, "--config.train.num_steps=1000")
    if moment == "loading modules":
        wait_for_handler(process, signal.SIGTERM)  # SIGINT is caught from the interpreter's start
    else:
        read_until(process, "JAX " if moment == "started JAX" else "compiling the train step")
    sent = time.monotonic()
    process.send_signal(signum)
    out, _ = stopped_at_once(process, signum, sent)
    if moment == "loading modules":
        assert out == "", "the signal came after the modules loaded: the test needs an earlier one"
    assert "compiled and ran the first step" not in out
    assert not (tmp_path / run_lock.LOCK_FILE).exists()
    assert saved_steps(tmp_path) == []


@pytest.mark.integration
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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_raised_inside_a_garbage_collector_callback_is_raised_again_outside(capfd, signum):
    """JAX's ``_xla_gc_callback`` runs at every collection; a signal handled inside it raised there,
    Python printed "Exception ignored" and the run went on compiling and training."""
    def callback(phase, info):
        if phase == "start":
            os.kill(os.getpid(), signum)  # the handler runs here, where an exception cannot propagate

    hook = sys.unraisablehook
    with interrupts.Signals() as signals:
        gc.callbacks.append(callback)
        try:
            with pytest.raises(interrupts.Interrupted) as stopped:
                gc.collect()
                gc.callbacks.remove(callback)
                time.sleep(5)
        finally:
            if callback in gc.callbacks:
                gc.callbacks.remove(callback)
        assert stopped.value.signum == signum and signals.received == signum
    assert "Exception ignored" not in capfd.readouterr().err
    assert sys.unraisablehook is hook  # restored
