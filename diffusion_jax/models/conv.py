"""The 2-D convolution of the U-Net and the Inception: oneDNN's on a one-device CPU run, XLA's elsewhere.

``conv_general_dilated`` is a drop-in for ``jax.lax.conv_general_dilated`` (and flax's
``nn.Conv(conv_general_dilated=...)``); ``dot_general`` one for ``jax.lax.dot_general`` in
flax's ``nn.Dense(dot_general=...)``, which computes a dense layer over the channels of NHWC
activations (the U-Net's 1x1 "NIN" layers) as a 1x1 convolution, and any other product as XLA
does; ``upsample_conv`` the U-Net's nearest x2 upsampling and 3x3 convolution, as four 2x2
convolutions of the low-resolution input (on every backend: 4/9 of the FLOPs).

XLA:CPU computes a convolution as an im2col copy and a GEMM; oneDNN's direct convolutions,
called through XLA's FFI (csrc/onednn_conv.cc), are faster on the U-Net's shapes
(benchmarks/README.md), forward and backward, and on the Inception's (FID features); on CPUs
without AVX-512 XLA's weight gradient is the faster (``onednn_weight_gradient``). They are used
when all of these hold, and XLA's convolution otherwise, with the same results to float32
rounding:

- the library was built (``make install`` builds it on x86-64 with a C++ compiler, see setup.py)
  and loads (one that does not is named in a warning, with the fix);
- the program is lowered for the CPU: the call sits in the CPU branch of
  ``lax.platform_dependent``, whose other branch is XLA's convolution, so one traced program
  lowers to oneDNN on a CPU and to XLA's convolutions for GPU and TPU (``jax.export`` included);
- the run has one device (``jax.device_count() == 1``): a custom call carries no partitioning
  rule, so in a program sharded over several devices XLA would gather its operands whole;
- float32 NHWC activations and HWIO weights, no dilation, one feature group, no negative
  padding (both networks').

Under ``jax.vmap`` the calls run once per mapped element (``vmap_method="sequential"``).
``DIFFUSION_JAX_ONEDNN=0`` turns the oneDNN path off (for comparisons).
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

_NHWC = ("NHWC", "HWIO", "NHWC")
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
                      "`make install` (or `pip install --no-build-isolation -e .`)", RuntimeWarning)
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
    return os.environ.get("DIFFUSION_JAX_ONEDNN", "1") != "0" and jax.device_count() == 1 and onednn_available()


def _onednn_on_cpu(onednn, xla, *operands):
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
    return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]), pad_lo_h=np.int64(lo_h),
                pad_lo_w=np.int64(lo_w), pad_hi_h=np.int64(hi_h), pad_hi_w=np.int64(hi_w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onednn_conv(x, w, strides, padding):
    """y = x * w (NHWC, HWIO), oneDNN's forward convolution; ``padding``: (low, high) per side."""
    shape = lax.conv_general_shape_tuple(x.shape, w.shape, strides, padding, _NHWC)
    return jax.ffi.ffi_call("onednn_conv_forward", jax.ShapeDtypeStruct(shape, jnp.float32),
                            vmap_method="sequential")(x, w, **_attributes(strides, padding))


def _onednn_conv_fwd(x, w, strides, padding):
    return _onednn_conv(x, w, strides, padding), (x, w)


def _onednn_conv_bwd(strides, padding, residuals, dy):
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
        (dw,) = jax.vjp(lambda w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC),
                        w)[1](dy)
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
    xla = functools.partial(lax.conv_general_dilated, window_strides=window_strides, padding=padding,
                            lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                            precision=precision)
    if not (plain and uses_onednn()):
        return xla(lhs, rhs)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    strides, padding = tuple(window_strides), tuple(map(tuple, padding))
    return _onednn_on_cpu(lambda x, w: _onednn_conv(x, w, strides, padding), xla, lhs, rhs)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general``, with x . W over the channels of NHWC ``x`` as oneDNN's 1x1 convolution.

    That is how ``nn.Dense`` contracts 4-D activations (its input's last axis with its kernel's
    first). On the U-Net's 1x1 layers oneDNN's forward and backward together are 1.25-1.6x
    faster than XLA's dot, and the CIFAR-10 train step 4-6% faster (benchmarks/README.md).
    """
    xla = functools.partial(lax.dot_general, dimension_numbers=dimension_numbers, precision=precision,
                            preferred_element_type=preferred_element_type)
    if not (lhs.ndim == 4 and rhs.ndim == 2 and lhs.dtype == rhs.dtype == jnp.float32
            and preferred_element_type is None and dimension_numbers == (((3,), (0,)), ((), ()))
            and uses_onednn()):
        return xla(lhs, rhs)
    return _onednn_on_cpu(lambda x, w: _onednn_conv(x, w[None, None], (1, 1), ((0, 0), (0, 0))), xla, lhs, rhs)


def _phase_taps(kernel, axis: int):
    """A 3-tap kernel along ``axis`` as the two output phases of a x2 nearest upsampling see it.

    Output row 2i reads upsampled rows 2i-1, 2i, 2i+1, which are input rows i-1, i, i: taps
    (k0, k1 + k2) on rows (i-1, i). Output row 2i+1 reads input rows i, i, i+1: taps (k0 + k1, k2)
    on rows (i, i+1).
    """
    k0, k1, k2 = jnp.split(kernel, 3, axis=axis)
    return jnp.concatenate([k0, k1 + k2], axis=axis), jnp.concatenate([k0 + k1, k2], axis=axis)


def upsample_conv(x, kernel):
    """Nearest-neighbour x2 upsampling of NHWC ``x``, then a 3x3 'SAME' convolution with HWIO ``kernel``.

    Computed on the low-resolution ``x`` as the four 2x2 convolutions of the output's phases (row
    and column parity; ``_phase_taps``), interleaved: the same values to float32 rounding, with
    4/9 of the multiply-adds and no 4x larger upsampled copy. The upsampled image's zero padding
    is that of ``x``: phase 0 reads one row before, phase 1 one row after. The phases' kernels
    are sums of ``kernel``'s taps in its dtype, cast to ``x``'s.
    """
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"upsample_conv takes a 3x3 kernel, got {kernel.shape[0]}x{kernel.shape[1]}")
    b, h, w, _ = x.shape
    pads = ((1, 0), (0, 1))  # by phase: (rows before, rows after)
    rows = []
    for row_phase, row_kernel in enumerate(_phase_taps(kernel, 0)):
        phases = [conv_general_dilated(x, k.astype(x.dtype), (1, 1), (pads[row_phase], pads[col_phase]),
                                       dimension_numbers=_NHWC)
                  for col_phase, k in enumerate(_phase_taps(row_kernel, 1))]
        rows.append(jnp.stack(phases, axis=3))  # [B, H, W, 2, O]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, kernel.shape[-1])  # [B, H, 2, W, 2, O]
