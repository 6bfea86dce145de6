"""oneDNN's 2-D convolutions as XLA custom calls on the CPU, and whether they are used.

XLA:CPU computes a convolution as an im2col copy and a GEMM; oneDNN's direct convolutions,
called through XLA's FFI (csrc/onednn_conv.cc), are faster on the U-Net's shapes
(benchmarks/README.md), forward and backward, and on the Inception's (FID features); on CPUs
without AVX-512 XLA's weight gradient is the faster (``onednn_weight_gradient``). conv.py's
convolutions use them when all of these hold, and XLA's convolution otherwise, with the same
results to float32 rounding:

- the library was built (``make install`` builds it on x86-64 with a C++ compiler, see setup.py)
  and loads (one that does not is named in a warning, with the fix);
- the program is lowered for the CPU: the call sits in the CPU branch of
  ``lax.platform_dependent`` (``on_cpu``), whose other branch is XLA's convolution, so one traced
  program lowers to oneDNN on a CPU and to XLA's convolutions for GPU and TPU (``jax.export``
  included);
- the run has one device (``jax.device_count() == 1``): a custom call carries no partitioning
  rule, so in a program sharded over several devices XLA would gather its operands whole;
- float32 NHWC activations and HWIO weights, no dilation, one feature group, no negative
  padding (both networks'; conv.py checks these).

``convolution`` is the forward call under a ``jax.custom_vjp`` whose backward is oneDNN's
backward-data call and its backward-weights call or XLA's weight gradient. Under ``jax.vmap``
the calls run once per mapped element (``vmap_method="sequential"``). ``DIFFUSION_JAX_ONEDNN=0``
turns the oneDNN path off (for comparisons).
"""

import ctypes
import functools
import os
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")  # the layouts of the calls' activations, weights and outputs
_TARGETS = {"onednn_conv_forward": "OnednnConvForward",
            "onednn_conv_backward_data": "OnednnConvBackwardData",
            "onednn_conv_backward_weights": "OnednnConvBackwardWeights"}


@functools.cache
def _library():
    """The built library (csrc/onednn_conv.cc) as a ``ctypes.CDLL``, or None where it was not built or
    does not load (with a warning naming the file, the error and the fix)."""
    built = sorted(pathlib.Path(__file__).parent.parent.glob("_onednn_conv*.so"))
    if not built:
        return None
    try:
        return ctypes.CDLL(str(built[0]))
    except OSError as e:  # built against a oneDNN that has since moved or gone
        warnings.warn(f"cannot load {built[0]} ({e}): the convolutions will be XLA's; rebuild it with "
                      "`make install` (or `pip install --no-build-isolation -e .`)", RuntimeWarning,
                      stacklevel=2)
        return None


@functools.cache
def onednn_available() -> bool:
    """Whether the oneDNN library was built; registers its FFI targets with XLA the first time."""
    lib = _library()
    if lib is None:
        return False
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return True


def uses_onednn() -> bool:
    """Whether convolutions traced now go to oneDNN when lowered for the CPU (module docstring)."""
    return (os.environ.get("DIFFUSION_JAX_ONEDNN", "1") != "0" and jax.device_count() == 1
            and onednn_available())


def on_cpu(onednn, xla, *operands):
    """``onednn(*operands)`` in a program lowered for the CPU, ``xla(*operands)`` for any other platform."""
    return lax.platform_dependent(*operands, cpu=onednn, default=xla)


# The largest input, in elements, whose weight gradient XLA computes on CPUs without AVX-512.
XLA_WEIGHT_GRADIENT_MAX_SIZE = 2 ** 21  # 8 MiB of float32: batch 16 of 32x32x128 activations


@functools.cache
def _avx512() -> bool:
    """Whether oneDNN runs its AVX-512 kernels here (``dnnl_get_effective_cpu_isa``)."""
    avx512_core = 0x27  # dnnl_cpu_isa_avx512_core, a bit mask in dnnl_cpu_isa_t
    return _library().dnnl_get_effective_cpu_isa() & avx512_core == avx512_core


def onednn_weight_gradient(x_size: int) -> bool:
    """Whether oneDNN computes the weight gradient of a convolution of an ``x_size``-element input
    (asked only where its convolutions run, ``uses_onednn``).

    On CPUs with AVX-512 (oneDNN's ``avx512_core`` ISA), always. With AVX2 only, oneDNN's
    backward-weights convolution (``jit:avx2``, on NHWC) ran 1.1-1.5x slower than XLA's on the
    U-Net's 3x3 shapes (benchmarks/README.md), while its forward and backward-data ones stayed
    faster; but XLA's holds larger temporaries: with it throughout, the CIFAR-10 train step's
    peak memory at batch 32 grew from 3.6 to 4.3 GB, above diffusers' 4.0 GB. So there oneDNN
    computes it only for inputs above ``XLA_WEIGHT_GRADIENT_MAX_SIZE``: 3.9 GB at batch 32, and
    batch 16 (2.6 GB against diffusers' 2.8) has all of XLA's speed.
    """
    return _avx512() or x_size > XLA_WEIGHT_GRADIENT_MAX_SIZE


def _attributes(strides, padding):
    """The FFI call's attributes (csrc/onednn_conv.cc's Geometry)."""
    (lo_h, hi_h), (lo_w, hi_w) = padding
    return {"stride_h": np.int64(strides[0]), "stride_w": np.int64(strides[1]), "pad_lo_h": np.int64(lo_h),
            "pad_lo_w": np.int64(lo_w), "pad_hi_h": np.int64(hi_h), "pad_hi_w": np.int64(hi_w)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def convolution(x, w, strides, padding):
    """y = x * w (NHWC, HWIO), oneDNN's forward convolution; ``padding``: (low, high) per side."""
    shape = lax.conv_general_shape_tuple(x.shape, w.shape, strides, padding, NHWC)
    return jax.ffi.ffi_call("onednn_conv_forward", jax.ShapeDtypeStruct(shape, jnp.float32),
                            vmap_method="sequential")(x, w, **_attributes(strides, padding))


def _convolution_fwd(x, w, strides, padding):
    return convolution(x, w, strides, padding), (x, w)


def _convolution_bwd(strides, padding, residuals, dy):
    """dL/dx and dL/dw from dL/dy: oneDNN's backward-data convolution, and its backward-weights
    one or XLA's weight gradient (``onednn_weight_gradient``)."""
    x, w = residuals
    attributes = _attributes(strides, padding)
    dx = jax.ffi.ffi_call("onednn_conv_backward_data", jax.ShapeDtypeStruct(x.shape, x.dtype),
                          vmap_method="sequential")(x, w, dy, **attributes)
    if onednn_weight_gradient(x.size):
        dw = jax.ffi.ffi_call("onednn_conv_backward_weights", jax.ShapeDtypeStruct(w.shape, w.dtype),
                              vmap_method="sequential")(x, w, dy, **attributes)
    else:
        (dw,) = jax.vjp(lambda w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC),
                        w)[1](dy)
    return dx, dw


convolution.defvjp(_convolution_fwd, _convolution_bwd)
