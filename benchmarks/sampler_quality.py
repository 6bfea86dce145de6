"""Sample quality against the number of model evaluations, with an exact denoiser.

    python -m benchmarks.sampler_quality [--samples 4000] [--sets 8] [--nfe 5 10 20 50 100] [--rows KIND ...]

The data are 8 Gaussian components of std 0.05 on a circle of radius 0.8 in 2-D, diffused by
DDPM's linear schedule (T = 1000); the eps-network is the mixture's exact E[eps | x_t]
(``diffusion_jax.analytic``), so every difference is the sampler's. For each number of model
evaluations (NFE) it prints the sliced Wasserstein distance between ``--samples`` samples and
as many independent draws of the data, next to the data-vs-data floor (the same distance
between two independent data sets). One such distance is noisy (its standard deviation is
~30% of the floor at 4,000 samples), so every figure is the mean over ``--sets`` independent
pairs (fixed x_T and data seeds, the same for every sampler), and the floor is printed with
the standard error of that mean. diffusers' ``DPMSolverMultistepScheduler`` with log-SNR-uniform
steps (``use_lu_lambdas``) is driven by the same eps function from the same x_T in the same run.
Karras et al. 2022's samplers run on N levels of their eq. 5 (rho = 7): Euler at N = NFE, Heun
(2N - 1 evaluations) at the largest N within the NFE, so 35 evaluations are their N = 18.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import analytic, sampler_registry
from diffusion_jax import samplers as SM
from diffusion_jax import schedule as S
from diffusion_jax.evaluation.sliced_wasserstein import sliced_wasserstein

K, RADIUS, STD = 8, 0.8, 0.05
ANGLES = 2 * np.pi * np.arange(K) / K
MEANS = RADIUS * np.stack([np.cos(ANGLES), np.sin(ANGLES)], axis=1)
TYPES = dict(mean_type="eps", var_type="fixed_large")


def data(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return MEANS[rng.integers(K, size=n)] + STD * rng.normal(size=(n, 2))


def ours(kind: str, spacing: str, order, nfe: int, sched, eps_fn, x_T):
    """(images, model evaluations) of one of our samplers at ``nfe`` timesteps of ``spacing``."""
    T = sched.num_timesteps
    if kind == "ddpm":
        steps = SM.ddim_timesteps(T, nfe, spacing)
        run = functools.partial(SM.ddpm_sample, eps_fn, sched, rng=jax.random.PRNGKey(1), timesteps=steps,
                                mean_type="eps", var_type="fixed_small", clip_x0=False)
    elif kind == "ddim":
        steps = np.unique(SM.ddim_timesteps(T, nfe, spacing))
        run = functools.partial(SM.ddim_sample, eps_fn, sched, timesteps=steps, **TYPES)
    elif kind in ("euler", "heun", "heun_churn"):  # N levels of eq. 5; Heun's 2N - 1 evaluations within nfe
        steps = SM.edm_timesteps(sched, nfe if kind == "euler" else max((nfe + 1) // 2, 2), rho=7.0)
        churn = dict(S_churn=80.0, S_tmin=0.05, S_tmax=50.0, S_noise=1.003, rng=jax.random.PRNGKey(1))
        run = functools.partial(SM.edm_sample, eps_fn, sched, timesteps=steps, second_order=kind != "euler",
                                **(churn if kind == "heun_churn" else {}), **TYPES)
        return (np.asarray(jax.jit(lambda x: run(x_T=x).images)(x_T)),
                sampler_registry.get(kind).nfe(len(np.unique(steps))))
    else:
        steps = SM.dpm_solver_timesteps(sched, nfe, spacing)
        run = functools.partial(SM.dpm_solver_sample, eps_fn, sched, timesteps=steps, order=order,
                                singlestep=kind == "dpm_solver++ 2S", **TYPES)
    return np.asarray(jax.jit(lambda x: run(x_T=x).images)(x_T)), len(steps)


def diffusers_dpm_solver(order: int, nfe: int, eps_fn, x_T):
    """diffusers' DPM-Solver++ multistep with log-SNR-uniform steps, driven by ``eps_fn``."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    ref = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                      beta_end=0.02, solver_order=order, algorithm_type="dpmsolver++",
                                      use_lu_lambdas=True, final_sigmas_type="zero")
    ref.set_timesteps(nfe)
    eps = jax.jit(eps_fn)
    x = torch.from_numpy(np.array(x_T))
    for t in ref.timesteps:
        e = eps(jnp.asarray(x.numpy()), jnp.full((x.shape[0],), int(t), jnp.int32))
        x = ref.step(torch.from_numpy(np.asarray(e)), t, x).prev_sample
    return x.numpy(), len(ref.timesteps)


# (row name, sampler, spacing, order)
ROWS = (
    ("DDPM ancestral (uniform)", "ddpm", "uniform", None),
    ("DDIM (uniform)", "ddim", "uniform", None),
    ("DDIM (quad)", "ddim", "quad", None),
    ("DPM-Solver++ 2M (logSNR)", "dpm_solver++", "logSNR", 2),
    ("DPM-Solver++ 3M (logSNR)", "dpm_solver++", "logSNR", 3),
    ("DPM-Solver++ 2M (time_uniform)", "dpm_solver++", "time_uniform", 2),
    ("DPM-Solver++ 2S (logSNR)", "dpm_solver++ 2S", "logSNR", 2),
    ("diffusers DPM-Solver++ 2M (lu)", "diffusers", "lu", 2),
    ("diffusers DPM-Solver++ 3M (lu)", "diffusers", "lu", 3),
    ("Euler (karras)", "euler", "karras", None),
    ("Heun (karras)", "heun", "karras", None),
    ("Heun + churn 80 (karras)", "heun_churn", "karras", None),  # Karras et al.'s ImageNet-64 settings
)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    parser.add_argument("--sets", type=int, default=8)
    parser.add_argument("--rows", nargs="+", default=None, metavar="KIND",
                        help=f"only these samplers' rows ({', '.join(dict.fromkeys(r[1] for r in ROWS))})")
    args = parser.parse_args()

    sched = S.make_schedule("linear", 1000)
    eps_fn = analytic.gaussian_mixture_eps(sched, np.full(K, 1 / K), MEANS, np.full(K, STD**2))
    x_T = jax.random.normal(jax.random.PRNGKey(0), (args.sets * args.samples, 2))  # all sets in one batch
    truths = [data(args.samples, seed) for seed in range(1, args.sets + 1)]
    floors = [sliced_wasserstein(data(args.samples, 1000 + k), truth) for k, truth in enumerate(truths)]
    floor = float(np.mean(floors))
    print(f"data-vs-data floor: {floor:.5f} +- {np.std(floors, ddof=1) / np.sqrt(args.sets):.5f} "
          f"(sliced Wasserstein-1, {args.samples} samples, mean of {args.sets} pairs +- its standard "
          "error)\n")

    def distance(x):
        sets = np.split(x, args.sets)
        return float(np.mean([sliced_wasserstein(s, truth) for s, truth in zip(sets, truths, strict=True)]))

    header = f"{'sampler':34s}" + "".join(f"{'NFE ' + str(n):>22s}" for n in args.nfe)
    print(header + "\n" + "-" * len(header))
    for name, kind, spacing, order in ROWS:
        if args.rows is not None and kind not in args.rows:
            continue
        cells = []
        for nfe in args.nfe:
            if kind == "diffusers":
                x, used = diffusers_dpm_solver(order, nfe, eps_fn, x_T)
            else:
                x, used = ours(kind, spacing, order, nfe, sched, eps_fn, x_T)
            d = distance(x)
            cells.append(f"{d:.4f} ({d / floor:5.2f}x)" + ("" if used == nfe else f" [{used}]"))
        print(f"{name:34s}" + "".join(f"{c:>22s}" for c in cells), flush=True)
    print("\nEach cell: distance to the data (ratio to the floor); [n]: n model evaluations where rounding "
          "to integer timesteps merged some, or where Heun's 2N - 1 cannot equal the column's.")


if __name__ == "__main__":
    main()
