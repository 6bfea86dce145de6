"""Builds the optional oneDNN convolution library (csrc/onednn_conv.cc) beside the package.

Needs jaxlib (for XLA's FFI headers) and oneDNN (the ``onednn-devel-cpu-gomp`` wheel, which
installs its headers and ``libdnnl`` under the environment's prefix) in the building
environment, hence ``pip install --no-build-isolation -e .`` (the Makefile's install). Where
either is missing (a machine that is not x86-64, say) the package installs without it and
runs every convolution through XLA (diffusion_jax/models/conv.py).
"""

import os
import sys

from setuptools import Extension, setup


def onednn_extension():
    prefix = sys.prefix
    if not os.path.exists(os.path.join(prefix, "include", "oneapi", "dnnl", "dnnl.hpp")):
        print("setup.py: oneDNN headers not found; building without the oneDNN convolutions", file=sys.stderr)
        return []
    try:
        import jax.ffi
    except ImportError:
        print("setup.py: jax not installed; building without the oneDNN convolutions", file=sys.stderr)
        return []
    lib = os.path.join(prefix, "lib")
    return [Extension("diffusion_jax._onednn_conv", ["csrc/onednn_conv.cc"],
                      include_dirs=[os.path.join(prefix, "include")],
                      libraries=["dnnl"], library_dirs=[lib], runtime_library_dirs=[lib],
                      extra_compile_args=["-std=c++17", "-O2", "-isystem", jax.ffi.include_dir()],
                      language="c++")]


setup(ext_modules=onednn_extension())
