"""The 2-D convolution of the U-Net and the Inception: oneDNN's on a one-device CPU run, XLA's elsewhere.

``conv_general_dilated`` is a drop-in for ``jax.lax.conv_general_dilated`` (and flax's
``nn.Conv(conv_general_dilated=...)``); ``dot_general`` one for ``jax.lax.dot_general`` in
flax's ``nn.Dense(dot_general=...)``, which computes a dense layer over the channels of NHWC
activations (the U-Net's 1x1 "NIN" layers) as a 1x1 convolution, and any other product as XLA
does; ``upsample_conv`` the U-Net's nearest x2 upsampling and 3x3 convolution, as four 2x2
convolutions of the low-resolution input (on every backend: 4/9 of the FLOPs).

The first two hand what oneDNN's convolution takes (float32 NHWC activations and HWIO
weights, no dilation, one feature group, no negative padding: both networks') to
``onednn.convolution`` where ``onednn.uses_onednn()``, placed in the CPU branch of
``onednn.on_cpu`` with XLA's convolution in the other; anything else is XLA's. When oneDNN's
convolutions are used, and why: onednn.py.
"""

import functools

import jax.numpy as jnp
from jax import lax

from diffusion_jax.models import onednn

# the jax.default_matmul_precision of every evaluation network (the FID Inception, the U-Net in the
# NLL bound): float32 products on every backend, so that FID, IS and bits/dim do not depend on it
EVALUATION_PRECISION = "highest"


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None):
    """``lax.conv_general_dilated`` with oneDNN's convolution where it applies (module docstring)."""
    plain = (lhs.ndim == 4 and lhs.dtype == rhs.dtype == jnp.float32 and feature_group_count == 1
             and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
             and (isinstance(padding, str) or (len(padding) == 2 and min(min(p) for p in padding) >= 0))
             and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             == lax.conv_dimension_numbers(lhs.shape, rhs.shape, onednn.NHWC))
    xla = functools.partial(lax.conv_general_dilated, window_strides=window_strides, padding=padding,
                            lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                            precision=precision)
    if not (plain and onednn.uses_onednn()):
        return xla(lhs, rhs)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    strides, padding = tuple(window_strides), tuple(map(tuple, padding))
    return onednn.on_cpu(lambda x, w: onednn.convolution(x, w, strides, padding), xla, lhs, rhs)


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
            and onednn.uses_onednn()):
        return xla(lhs, rhs)
    return onednn.on_cpu(lambda x, w: onednn.convolution(x, w[None, None], (1, 1), ((0, 0), (0, 0))), xla,
                         lhs, rhs)


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
                                       dimension_numbers=onednn.NHWC)
                  for col_phase, k in enumerate(_phase_taps(row_kernel, 1))]
        rows.append(jnp.stack(phases, axis=3))  # [B, H, W, 2, O]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, kernel.shape[-1])  # [B, H, 2, W, 2, O]
