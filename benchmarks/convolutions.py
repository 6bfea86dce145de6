"""The U-Net's convolutions, oneDNN's (diffusion_jax/models/conv.py) against XLA's, alternately.

    python -m benchmarks.convolutions [--reps 7]

For each 3x3 convolution shape of the CIFAR-10 network, and some of its 1x1 "NIN" layers
(attention's q, k, v, proj_out and the shortcuts; XLA computes those as a dot), at the train
batches (16, 32) and the forward's (64): milliseconds of the forward and of forward + backward
(input and weight gradients), median of --reps calls after a warm-up, each call of one timed
right after the same call of the other.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffusion_jax import xla_flags
from diffusion_jax.models import conv, onednn

NHWC = ("NHWC", "HWIO", "NHWC")
# batch, side, in channels, out channels, stride, kernel side
SHAPES = [(16, 32, 128, 128, 1, 3), (16, 16, 256, 256, 1, 3), (16, 8, 256, 256, 1, 3),
          (16, 32, 128, 128, 2, 3), (16, 32, 3, 128, 1, 3), (16, 32, 128, 3, 1, 3), (32, 32, 128, 128, 1, 3),
          (32, 8, 256, 256, 1, 3), (64, 32, 128, 128, 1, 3), (64, 16, 256, 256, 1, 3),
          (16, 16, 256, 256, 1, 1), (32, 16, 256, 256, 1, 1), (64, 16, 256, 256, 1, 1),
          (16, 32, 384, 128, 1, 1), (16, 32, 256, 128, 1, 1)]
DENSE = (((3,), (0,)), ((), ()))  # nn.Dense's contraction of NHWC activations


def _programs(with_onednn, stride, kernel):
    def f(x, w):
        if kernel == 1:
            return (conv.dot_general if with_onednn else lax.dot_general)(x, w, DENSE)
        return (conv.conv_general_dilated if with_onednn else lax.conv_general_dilated)(
            x, w, (stride, stride), "SAME", dimension_numbers=NHWC)

    return jax.jit(f), jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))


def main():
    xla_flags.set_defaults()  # before JAX starts its backends
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    if not onednn.uses_onednn():
        raise SystemExit("oneDNN's convolutions are not in use here (see diffusion_jax/models/onednn.py); "
                         "run make install on an x86-64 CPU with one device")
    print(f"{'shape (NHWC -> O, kernel, stride)':34s} {'forward ms':>22s} {'forward + backward ms':>24s}")
    print(f"{'':34s} {'oneDNN':>7s} {'XLA':>7s} {'ratio':>6s} {'oneDNN':>8s} {'XLA':>8s} {'ratio':>6s}")
    for n, side, c, o, stride, kernel in SHAPES:
        x = jax.random.normal(jax.random.PRNGKey(0), (n, side, side, c))
        shape = (3, 3, c, o) if kernel == 3 else (c, o)
        w = jax.random.normal(jax.random.PRNGKey(1), shape) / np.sqrt(kernel ** 2 * c)
        programs = {"onednn": _programs(True, stride, kernel), "xla": _programs(False, stride, kernel)}
        times = {(name, kind): [] for name in programs for kind in (0, 1)}
        for rep in range(args.reps + 1):
            for kind in (0, 1):
                for name, fs in programs.items():
                    start = time.perf_counter()
                    jax.block_until_ready(fs[kind](x, w))
                    if rep:  # the first call compiles and warms up
                        times[name, kind].append(time.perf_counter() - start)
        ms = {key: 1e3 * float(np.median(v)) for key, v in times.items()}
        label = f"{n}x{side}x{side}x{c} -> {o}, {kernel}x{kernel} s{stride}"
        print(f"{label:34s} {ms['onednn', 0]:7.1f} {ms['xla', 0]:7.1f} "
              f"{ms['xla', 0] / ms['onednn', 0]:6.2f} {ms['onednn', 1]:8.1f} {ms['xla', 1]:8.1f} "
              f"{ms['xla', 1] / ms['onednn', 1]:6.2f}", flush=True)


if __name__ == "__main__":
    main()
