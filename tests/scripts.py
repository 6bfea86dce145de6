"""Running the project's scripts (train.py, sample.py, evaluate.py) in subprocesses, as users do.

The runs of a test session (of each pytest-xdist worker) share JAX's persistent compilation
cache (a train.py run of the tiny config: 48 s -> 17 s); it is removed at exit.
"""

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILATION_CACHE = tempfile.mkdtemp(prefix="diffusion-jax-test-cache-")
atexit.register(shutil.rmtree, COMPILATION_CACHE, True)


def environment(devices=1, **variables):
    return dict(os.environ, **variables, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                TF_CPP_MIN_LOG_LEVEL="3", JAX_COMPILATION_CACHE_DIR=COMPILATION_CACHE,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def command(script, *args, python=sys.executable, root=ROOT):
    return [str(python), os.path.join(root, script), *args]


def copy_repository(destination):
    """The files git tracks or would track (not the ignored build/, .venv or built libraries of the
    work tree), as they are in the work tree, copied to ``destination``; returns it."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in listed.split("\0"):
        if os.path.isfile(os.path.join(ROOT, name)):  # not a tracked file deleted in the work tree
            os.makedirs(os.path.dirname(os.path.join(destination, name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(destination, name))
    return destination


def run(script, *args, devices=1, expect=0, timeout=900, cwd=None, **variables):
    """Run ``script`` with ``args`` (in ``cwd``, with environment ``variables`` added); assert its exit
    status is ``expect`` and return the result."""
    result = subprocess.run(command(script, *args), env=environment(devices, **variables),
                            capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def local_files(*directories):
    """Every file under ``directories``, as sorted paths."""
    return sorted(os.path.join(root, name) for directory in directories
                  for root, _, names in os.walk(directory) for name in names)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(script, *args, processes=2, devices=2, timeout=900, python=sys.executable, root=ROOT,
                    cwd=None, **variables):
    """Run ``script`` (of ``root``, with ``python``) as ``processes`` processes of ``devices`` CPU devices
    each over 127.0.0.1; assert each exits 0 and return their (stdout, stderr)."""
    port = free_port()
    running = [subprocess.Popen(command(script, *args, "--distributed",
                                        f"--coordinator_address=127.0.0.1:{port}",
                                        f"--num_processes={processes}", f"--process_id={i}",
                                        python=python, root=root),
                                env=environment(devices, **variables), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=cwd)
               for i in range(processes)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in running]
    finally:
        for p in running:
            p.kill()
    for i, (p, (out, err)) in enumerate(zip(running, outputs, strict=True)):
        assert p.returncode == 0, f"process {i}: {out[-2000:]}{err[-3000:]}"
    return outputs
