"""The U-Net's 2-D convolution: oneDNN's on a one-device CPU run, XLA's everywhere else.

``conv_general_dilated`` is a drop-in for ``jax.lax.conv_general_dilated`` (and flax's
``nn.Conv(conv_general_dilated=...)``). XLA:CPU computes a convolution as an im2col copy and a
GEMM; oneDNN's direct convolutions, called through XLA's FFI (csrc/onednn_conv.cc), are
faster on the U-Net's shapes (benchmarks/README.md), forward and backward. They are used when
all of these hold, and XLA's convolution otherwise, with the same results to float32 rounding:

- the library was built (``make install`` builds it on x86-64, see setup.py);
- the default backend is the CPU: GPU and TPU programs never contain the call;
- the run has one device (``jax.device_count() == 1``): a custom call carries no partitioning
  rule, so in a program sharded over several devices XLA would gather its operands whole;
- float32 NHWC activations and HWIO weights, no dilation, one feature group, no negative
  padding (the U-Net's).

Under ``jax.vmap`` the calls run once per mapped element (``vmap_method="sequential"``).
``DIFFUSION_JAX_ONEDNN=0`` turns the oneDNN path off (for comparisons).
"""

import ctypes
import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
_TARGETS = {"onednn_conv_forward": "OnednnConvForward",
            "onednn_conv_backward_data": "OnednnConvBackwardData",
            "onednn_conv_backward_weights": "OnednnConvBackwardWeights"}


@functools.cache
def onednn_available() -> bool:
    """Whether the oneDNN library was built; registers its FFI targets with XLA the first time."""
    built = sorted(pathlib.Path(__file__).parent.parent.glob("_onednn_conv*.so"))
    if not built:
        return False
    try:
        lib = ctypes.CDLL(str(built[0]))
    except OSError as e:  # built against a oneDNN that has since moved or gone
        raise RuntimeError(f"cannot load {built[0]} ({e}); rebuild it with `make install` (or "
                           "`pip install --no-build-isolation -e .`), or set DIFFUSION_JAX_ONEDNN=0 to use "
                           "XLA's convolutions") from None
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return True


def uses_onednn() -> bool:
    """Whether convolutions traced now go to oneDNN (see the module docstring)."""
    return (os.environ.get("DIFFUSION_JAX_ONEDNN", "1") != "0" and jax.default_backend() == "cpu"
            and jax.device_count() == 1 and onednn_available())


def _geometry(x_shape, w_shape, strides, padding):
    """The FFI attributes: strides and the low/high padding of each spatial dimension."""
    (lo_h, hi_h), (lo_w, hi_w) = (lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding)
                                  if isinstance(padding, str) else padding)
    return {name: np.int64(v) for name, v in zip(
        ("stride_h", "stride_w", "pad_lo_h", "pad_lo_w", "pad_hi_h", "pad_hi_w"),
        (*strides, lo_h, lo_w, hi_h, hi_w))}


def _out_shape(x_shape, w_shape, g):
    oh = (x_shape[1] + g["pad_lo_h"] + g["pad_hi_h"] - w_shape[0]) // g["stride_h"] + 1
    ow = (x_shape[2] + g["pad_lo_w"] + g["pad_hi_w"] - w_shape[1]) // g["stride_w"] + 1
    return (x_shape[0], int(oh), int(ow), w_shape[3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _onednn_conv(x, w, geometry):
    """y = x * w (NHWC, HWIO), oneDNN's forward convolution; ``geometry``: the FFI attributes'
    (name, value) pairs, a tuple so that it can be a static argument."""
    g = dict(geometry)
    out = jax.ShapeDtypeStruct(_out_shape(x.shape, w.shape, g), jnp.float32)
    return jax.ffi.ffi_call("onednn_conv_forward", out, vmap_method="sequential")(x, w, **g)


def _onednn_conv_fwd(x, w, geometry):
    return _onednn_conv(x, w, geometry), (x, w)


def _onednn_conv_bwd(geometry, residuals, dy):
    """dL/dx and dL/dw from dL/dy: oneDNN's backward-data and backward-weights convolutions."""
    x, w = residuals
    g = dict(geometry)
    dx = jax.ffi.ffi_call("onednn_conv_backward_data", jax.ShapeDtypeStruct(x.shape, x.dtype),
                          vmap_method="sequential")(x, w, dy, **g)
    dw = jax.ffi.ffi_call("onednn_conv_backward_weights", jax.ShapeDtypeStruct(w.shape, w.dtype),
                          vmap_method="sequential")(x, w, dy, **g)
    return dx, dw


_onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None):
    """``lax.conv_general_dilated`` with oneDNN's convolution where it applies (module docstring)."""
    plain = (lhs.ndim == 4 and lhs.dtype == rhs.dtype == jnp.float32 and feature_group_count == 1
             and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
             and (isinstance(padding, str) or (len(padding) == 2 and min(min(p) for p in padding) >= 0))
             and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    if plain and uses_onednn():
        geometry = _geometry(lhs.shape, rhs.shape, tuple(window_strides), padding)
        return _onednn_conv(lhs, rhs, tuple(geometry.items()))
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision)
