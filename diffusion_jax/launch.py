"""What each entry point does first: join the other processes of a run, and say where JAX runs.

``start`` prints one line per process before anything compiles: the JAX version, backend,
device kind and count, and processes, so that a TPU VM or GPU box that installed CPU-only
JAX is seen at once rather than as a slow first step; and a warning on stderr when the
backend is the CPU while the host shows signs of an accelerator (``/dev/accel*`` of TPU VMs,
``/dev/nvidia*`` of NVIDIA GPUs, the variables of Cloud TPU VMs).
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import importlib.util
import os
import signal
import sys

import ml_collections
from absl import flags

from diffusion_jax import errors, interrupts
from diffusion_jax.errors import ConfigError

DEVICE_FILES = ("/dev/accel*", "/dev/nvidia*")
# what Cloud TPU VMs and their runtimes set (not TPU_SKIP_MDS_QUERY, which JAX itself sets on any host)
TPU_VARIABLES = ("TPU_NAME", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES",
                 "CLOUD_TPU_TASK_ID")


def define_distributed_flags() -> None:
    """The flags of multi-process runs, as the entry points take them."""
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-process runs)")
    flags.DEFINE_string("coordinator_address", None,
                        "HOST:PORT of process 0, where JAX cannot find the cluster")
    flags.DEFINE_integer("num_processes", None, "number of processes, with --coordinator_address")
    flags.DEFINE_integer("process_id", None, "this process's index, with --coordinator_address")


def accelerator_signs(device_files=None, environ=None) -> list[str]:
    """What on this host suggests a TPU or GPU: device files and TPU runtime variables."""
    device_files = sorted(f for pattern in DEVICE_FILES for f in glob.glob(pattern)) if device_files is None \
        else device_files
    environ = os.environ if environ is None else environ
    return list(device_files) + [k for k in TPU_VARIABLES if k in environ]


def cpu_warning(backend: str, signs: list[str]) -> str | None:
    """The warning for a CPU backend on a host with ``signs`` of an accelerator, or None."""
    if backend != "cpu" or not signs:
        return None
    shown = ", ".join(signs[:4]) + (" ..." if len(signs) > 4 else "")
    return (f"warning: JAX runs on the CPU, but this host has {shown}: JAX for the accelerator is not "
            "installed or cannot reach it. Install it with pip install 'jax[tpu]' or 'jax[cuda12]' at the "
            "pinned version (README.md, 'Install on a TPU VM, a GPU box, a pod') and check "
            "python -c 'import jax; print(jax.devices())'")


def startup_line() -> str:
    """Backend, device kind and count, and processes of the running JAX."""
    import jax

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    line = (f"JAX {jax.__version__}: backend {jax.default_backend()}, {len(devices)} device(s) "
            f"({', '.join(kinds)}), {jax.local_device_count()} on this host; process {jax.process_index()} "
            f"of {jax.process_count()}")
    if jax.default_backend() == "cpu":
        from diffusion_jax.models import onednn

        line += f"; CPU convolutions: {'oneDNN' if onednn.uses_onednn() else 'XLA'}"
    return line


def start(flag_values) -> None:
    """``jax.distributed.initialize()`` if ``--distributed``, then the startup line (and warning);
    from then on the libraries' error logs go to the debug log (``progress.library_errors_to_debug_log``)."""
    import jax  # here, not at import: the entry points parse their flags without loading JAX

    from diffusion_jax import progress

    if flag_values.distributed:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes; no effect elsewhere
        jax.distributed.initialize(flag_values.coordinator_address, flag_values.num_processes,
                                   flag_values.process_id)
    progress.library_errors_to_debug_log()
    print(startup_line(), flush=True)
    warning = cpu_warning(jax.default_backend(), accelerator_signs())
    if warning:
        print(warning, file=sys.stderr, flush=True)


@contextlib.contextmanager
def one_line_errors():
    """The project's errors (``errors.Error``) as ``error: <message>`` on stderr and their kind's exit
    status; a run stopped by a signal as ``interrupted by SIGNAL: <what was saved>``, ending by that
    signal (``interrupts.exit_by``); any other exception, a bug, keeps its traceback. SIGINT raises
    ``interrupts.Interrupted`` inside (never swallowed: ``interrupts.Signals``)."""
    try:
        with interrupts.Signals((signal.SIGINT,), at_once="stopped at once"):
            yield
    except errors.Error as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_status)
    except (interrupts.Interrupted, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"interrupted by {signal.Signals(signum).name}: {str(e) or 'stopped at once'}", file=sys.stderr)
        interrupts.exit_by(signum)


def _config_file(spec: str):
    """The config of ``--config=PATH[:ARG]``, loaded as ml_collections' config flags load it."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--config={spec}: no such file {path} (a config file such as configs/cifar10.py)")
    module_spec = importlib.util.spec_from_file_location("config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(*([arg] if arg else []))


def _bad_override(argv) -> ConfigError | None:
    """For ``--config.KEY=VALUE`` of a KEY the config lacks: the error naming it and the nearest keys."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if spec is None or not overrides:
        return None
    from diffusion_jax import config as config_lib  # here: flags are parsed without loading JAX

    known = list(config_lib.flatten(_config_file(spec)))
    for key in overrides:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(near)}?" if near else \
                f"its top-level keys are {', '.join(sorted({k.split('.')[0] for k in known}))}"
            return ConfigError(f"--config.{key}: the config has no key {key}; {hint}")
    return None


def parse_flags(argv):
    """absl's flag parsing for ``app.run(main, flags_parser=parse_flags)``, with a bad flag, config file
    or config override as one line and status 2: an unknown key names the nearest valid ones."""
    with one_line_errors():
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            raise ConfigError(str(e)) from e
        except (AttributeError, KeyError, OSError) as e:  # ml_collections, on a key or file it cannot find
            raise _bad_override(argv) or ConfigError(str(e)) from e
        except SyntaxError as e:  # a config file that is not Python: its place is all a traceback would add
            raise ConfigError(f"{e.filename}, line {e.lineno}: {e.msg} (the config file is not valid "
                              "Python)") from e


def config(flag_values, name: str = "config"):
    """The config of ``--config`` (None if not given); a file that cannot be loaded is a ConfigError."""
    value = flag_values[name].value
    try:
        if value is not None and not isinstance(value, ml_collections.ConfigDict):
            value.keys()  # ml_collections stands in an object that raises its load error when first used
    except OSError as e:
        reason = str(e).strip().splitlines()[-1].strip()
        raise ConfigError(f"--{name}={flag_values[name].config_filename}: cannot load it: {reason}") from e
    return value
