"""Samplers and the bound on data whose optimal denoiser is known exactly.

    python examples/exact_denoiser.py [--out DIR] [--samples 4000]

Data: 8 Gaussians (std 0.05) on a circle of radius 0.8. With their exact eps (no network,
no training) the only error left is the sampler's: the script prints the sliced
Wasserstein distance to fresh data for DDPM-1000 and DDIM with 10 to 1000 quad steps,
next to the data-vs-data floor, writes a scatter plot of each, and computes the
variational bound in bits/dim of 8-bit Gaussian data next to its true entropy.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from diffusion_jax import analytic, losses, samplers, schedule
from diffusion_jax.evaluation.sliced_wasserstein import sliced_wasserstein

TYPES = dict(mean_type="eps", var_type="fixed_large")


def circle_mixture(num_components=8, radius=0.8, std=0.05):
    angles = 2 * np.pi * np.arange(num_components) / num_components
    means = radius * np.stack([np.cos(angles), np.sin(angles)], 1)
    return np.full(num_components, 1 / num_components), means, np.full(num_components, std**2)


def draw(weights, means, variances, n, seed):
    rng = np.random.default_rng(seed)
    k = rng.choice(len(weights), size=n, p=weights)
    return means[k] + np.sqrt(variances[k])[:, None] * rng.normal(size=(n, 2))


def scatter_png(panels, path, size=220):
    """One square panel per (title, points in [-1.2, 1.2]^2), side by side."""
    image = Image.new("RGB", (size * len(panels), size + 16), "white")
    pen = ImageDraw.Draw(image)
    for i, (title, points) in enumerate(panels):
        pen.text((i * size + 4, 2), title, fill="black")
        pixels = (np.asarray(points) / 2.4 + 0.5) * (size - 1)
        for x, y in pixels[:2000]:
            pen.point((i * size + x, 16 + size - 1 - y), fill=(30, 60, 200))
    image.save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/quickstart")
    parser.add_argument("--samples", type=int, default=4000)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()

    sched = schedule.make_schedule("linear", 1000)
    weights, means, variances = circle_mixture()
    eps_fn = analytic.gaussian_mixture_eps(sched, weights, means, variances)
    data = draw(weights, means, variances, args.samples, seed=0)
    floor = sliced_wasserstein(draw(weights, means, variances, args.samples, seed=1), data)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (args.samples, 2))

    runs = {"DDPM-1000": jax.jit(
        lambda x, r: samplers.ddpm_sample(eps_fn, sched, x, r, **TYPES).images)(x_T, jax.random.PRNGKey(1))}
    for steps in (10, 20, 50, 100, 1000):
        timesteps = samplers.ddim_timesteps(1000, steps, "quad" if steps < 1000 else "uniform")
        runs[f"DDIM-{steps}"] = jax.jit(
            lambda x, ts=timesteps: samplers.ddim_sample(eps_fn, sched, x, timesteps=ts, **TYPES).images)(x_T)

    print(f"8-Gaussian circle, {args.samples} samples, exact eps: sliced Wasserstein-1 to data")
    print(f"  {'data vs data (floor)':<22}{floor:.4f}")
    for name, samples in runs.items():
        print(f"  {name:<22}{sliced_wasserstein(np.asarray(samples, np.float64), data):.4f}")
    plot = os.path.join(args.out, "samples.png")
    scatter_png([("data", data)]
                + [(k, v) for k, v in runs.items() if k in ("DDPM-1000", "DDIM-10", "DDIM-50")], plot)

    grid = -1 + 2 * np.arange(256) / 255
    p = np.exp(-0.5 * (grid / 0.3) ** 2)
    p /= p.sum()
    entropy = -np.sum(p * np.log2(p))
    pixels = jnp.asarray(np.random.default_rng(2).choice(grid, size=(512, 4, 4, 1), p=p), jnp.float32)
    gauss_eps = analytic.gaussian_mixture_eps(sched, [1.0], [0.0], [0.09])
    bound = jax.jit(lambda x: losses.bits_per_dim(gauss_eps, sched, x, jax.random.PRNGKey(3),
                                                  **TYPES))(pixels)
    print(f"8-bit pixels ~ N(0, 0.3^2): bound {float(bound.total.mean()):.3f} bits/dim "
          f"(prior {float(bound.prior.mean()):.5f}), true entropy {entropy:.3f}")
    print(f"wrote {plot} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
