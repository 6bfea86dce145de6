"""Builds the optional oneDNN convolution library (csrc/onednn_conv.cc) beside the package.

Needs jaxlib (for XLA's FFI headers), oneDNN (the ``onednn-devel-cpu-gomp`` wheel, which
installs its headers and ``libdnnl`` under the environment's prefix; requirements.txt or the
``onednn`` extra on x86-64) and a C++17 compiler in the building environment, hence ``pip install
--no-build-isolation -e .`` (the Makefile's install). Where any of them is missing, or the
compile or link fails, the package installs without the library, saying so in one line on
stderr, and runs every convolution through XLA (diffusion_jax/models/onednn.py).
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError


def without_onednn(reason):
    print(f"setup.py: {reason}; the CPU convolutions will be XLA's", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """``build_ext`` that installs the package without the library where it cannot be built."""

    def run(self):
        try:
            super().run()
        except (CCompilerError, ExecError, PlatformError) as e:  # CompileError and LinkError included
            without_onednn(f"cannot build csrc/onednn_conv.cc ({e})")


def onednn_extension():
    prefix = sys.prefix
    if not os.path.exists(os.path.join(prefix, "include", "oneapi", "dnnl", "dnnl.hpp")):
        without_onednn("oneDNN headers not found")
        return []
    try:
        import jax.ffi
    except ImportError:
        without_onednn("jax not installed")
        return []
    lib = os.path.join(prefix, "lib")
    return [Extension("diffusion_jax._onednn_conv", ["csrc/onednn_conv.cc"],
                      include_dirs=[os.path.join(prefix, "include")],
                      libraries=["dnnl"], library_dirs=[lib], runtime_library_dirs=[lib],
                      extra_compile_args=["-std=c++17", "-O2", "-isystem", jax.ffi.include_dir()],
                      language="c++")]


setup(ext_modules=onednn_extension(), cmdclass={"build_ext": OptionalBuildExt})
