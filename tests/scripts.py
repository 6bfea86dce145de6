"""Running the project's scripts (train.py, sample.py, evaluate.py) in subprocesses, as users do.

The runs of a test session (of each pytest-xdist worker) share JAX's persistent compilation
cache (a train.py run of the tiny config: 48 s -> 17 s); it is removed at exit.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILATION_CACHE = tempfile.mkdtemp(prefix="diffusion-jax-test-cache-")
atexit.register(shutil.rmtree, COMPILATION_CACHE, True)


def environment(devices=1):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", TF_CPP_MIN_LOG_LEVEL="3",
                JAX_COMPILATION_CACHE_DIR=COMPILATION_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def command(script, *args):
    return [sys.executable, os.path.join(ROOT, script), *args]


def run(script, *args, devices=1, expect=0, timeout=900):
    """Run ``script`` with ``args``; assert its exit status is ``expect`` and return the result."""
    result = subprocess.run(command(script, *args), env=environment(devices), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result
