"""Sampler loop overhead: the compiled loop's time per step against one compiled step.

    python -m benchmarks.samplers [--batch 16] [--size 32] [--repeats 5]

A tiny denoiser (the exact eps of per-pixel Gaussian-mixture data) keeps each step cheap,
so any per-step host work would show. Prints wall times of DDIM-50 and DDPM-1000, the
compiled loop's time per step next to a single compiled step called from Python, and the
compile times at 10 and 1000 steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from diffusion_jax import analytic
from diffusion_jax import samplers as SM
from diffusion_jax import schedule as S

TYPES = dict(mean_type="eps", var_type="fixed_large")


def timed(fn, *args, repeats):
    """Compile time of ``jax.jit(fn)``, then the median wall time of ``repeats`` calls after one warm-up."""
    start = time.perf_counter()
    fn = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(fn(*args))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - start)
    return compile_s, statistics.median(runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    sched = S.make_schedule()
    eps_fn = analytic.gaussian_mixture_eps(sched, [0.3, 0.5, 0.2], [-0.6, 0.1, 0.7], [0.01, 0.04, 0.0025])
    x_T = jax.random.normal(jax.random.PRNGKey(0), (args.batch, args.size, args.size, 3))
    rng = jax.random.PRNGKey(1)

    def ddim(steps):
        return lambda x: SM.ddim_sample(eps_fn, sched, x, timesteps=steps, **TYPES).images

    def ddpm(steps):
        return lambda x, r: SM.ddpm_sample(eps_fn, sched, x, r, timesteps=steps, **TYPES).images

    rows = []
    _, one_ddim = timed(ddim([500]), x_T, repeats=args.repeats * 20)
    _, one_ddpm = timed(ddpm([500]), x_T, rng, repeats=args.repeats * 20)
    c50, t50 = timed(ddim(SM.ddim_timesteps(1000, 50, "quad")), x_T, repeats=args.repeats)
    c1000p, t1000p = timed(ddpm(None), x_T, rng, repeats=args.repeats)
    c10, _ = timed(ddim(SM.ddim_timesteps(1000, 10)), x_T, repeats=1)
    c1000, t1000 = timed(ddim(SM.ddim_timesteps(1000, 1000)), x_T, repeats=1)
    c10p, _ = timed(ddpm(SM.ddim_timesteps(1000, 10)), x_T, rng, repeats=1)
    rows.append(("DDIM-50 (quad)", t50, t50 / 50, one_ddim))
    rows.append(("DDIM-1000", t1000, t1000 / 1000, one_ddim))
    rows.append(("DDPM-1000", t1000p, t1000p / 1000, one_ddpm))

    print(f"batch {args.batch} x {args.size}x{args.size}x3, {jax.devices()[0].platform}, "
          f"median of {args.repeats}")
    print(f"{'sampler':<16}{'wall s':>10}{'loop ms/step':>14}{'1 step ms':>12}{'ratio':>8}")
    for name, wall, per_step, single in rows:
        print(f"{name:<16}{wall:>10.3f}{per_step * 1e3:>14.3f}{single * 1e3:>12.3f}{per_step / single:>8.2f}")
    print(f"compile s: DDIM-10 {c10:.2f}, DDIM-50 {c50:.2f}, DDIM-1000 {c1000:.2f}; "
          f"DDPM-10 {c10p:.2f}, DDPM-1000 {c1000p:.2f}")


if __name__ == "__main__":
    main()
