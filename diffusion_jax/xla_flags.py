"""XLA's flags for this project's runs, set by each entry point before JAX starts its backends.

On CPU, jaxlib 0.10 sends convolutions to YNNPACK, whose weight-gradient convolutions are
slow; ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` routes single
convolutions to Eigen instead: training twice as fast on this project's CPU (see
benchmarks/), same results. A CPU-only option that other backends ignore. XLA reads
``XLA_FLAGS`` once, when JAX starts its first backend, so ``set_defaults`` runs first in
train.py, sample.py, evaluate.py, the converters' and the benchmarks' ``main`` and
tests/conftest.py; importing the package changes no environment variable.

XLA aborts the process on a flag it does not know, and on a value of this flag it does not
know ("Illegal value for --xla_cpu_experimental_ynn_fusion_type"), so the flag is set only
for the jaxlib releases where it was seen to be accepted (``JAXLIB_VERSIONS``), known by the
installed jaxlib's version in its package metadata: no JAX import, a few milliseconds. Looking
for the flag's name in jaxlib's library (libjax_common.so, 350 MB) instead would read the file
at each start (all of it where the name is missing), would find the name also in the
description of XLA's options, apart from the flag parser, and would not tell whether
``individual_convolution`` is still one of the flag's values. Another jaxlib runs with XLA's
own defaults.
"""

import importlib.metadata
import os

FLAG = "xla_cpu_experimental_ynn_fusion_type"
VALUE = "-individual_convolution"
# jaxlib releases whose XLA accepts --FLAG=VALUE (tests/test_xla_flags.py starts JAX with it)
JAXLIB_VERSIONS = ("0.10.2",)


def jaxlib_version() -> str | None:
    """The installed jaxlib's version, or None if there is none."""
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def set_defaults(environ=os.environ) -> None:
    """Add ``--FLAG=VALUE`` to ``environ["XLA_FLAGS"]`` unless it names FLAG already (the user's value
    is kept) or the installed jaxlib is not one of ``JAXLIB_VERSIONS``."""
    flags = environ.get("XLA_FLAGS", "")
    if FLAG in flags or jaxlib_version() not in JAXLIB_VERSIONS:
        return
    environ["XLA_FLAGS"] = f"{flags} --{FLAG}={VALUE}".strip()
