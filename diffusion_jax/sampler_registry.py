"""Samplers by name: how each chooses its timesteps, the settings it takes, and the function that runs it.

``config.validate``, sample.py's flags and ``sample_lib`` read :data:`SAMPLERS`. A sampler is one
function and one :func:`register` call; the function is called as

    run(model_fn, sched, x_T, rng, *, timesteps, mean_type, var_type, clip_x0, record, **options)

and returns :class:`~diffusion_jax.samplers.Samples`, with ``timesteps`` what the entry's
``timesteps(sched, steps, spacing)`` chose from ``config.sample`` (:func:`visited_timesteps`) and
``options`` the entry's settings of ``config.sample`` (among :data:`OPTIONS`). It is traced inside
``jax.jit``. :func:`evaluations` counts the network evaluations of a run (the entry's ``nfe``).

This module does not load JAX (sample.py defines its flags from it before JAX starts); the
built-in samplers import :mod:`diffusion_jax.samplers` when they run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from diffusion_jax.spacings import DPM_SOLVER_SKIPS, SPACINGS

# The settings of config.sample that samplers may take beyond steps, spacing and clip_x0, each with the
# value it must keep under a sampler that does not take it (None: any, it is ignored).
OPTIONS = {"eta": 0.0, "order": None, "threshold": 0.0, "rho": None, "S_churn": 0.0, "S_tmin": None,
           "S_tmax": None, "S_noise": None}
# samplers.edm_timesteps: Karras et al. 2022, eq. 5
EDM_SPACINGS = ("karras",)


class Option(NamedTuple):
    """A setting a sampler takes: whether a value is allowed, and what is (for the config error)."""

    valid: Callable[[Any], bool]
    allowed: str


class Check(NamedTuple):
    """A condition on a sampler's options together, such as S_tmin <= S_tmax: ``valid({option: value})``,
    and the option the config error names with what is allowed."""

    key: str
    valid: Callable[[Mapping[str, Any]], bool]
    allowed: str


def one_per_timestep(levels: int) -> int:
    """One network evaluation per distinct timestep visited (DDPM, DDIM, DPM-Solver++ multistep)."""
    return levels


class Sampler(NamedTuple):
    """A registered sampler (see :func:`register`)."""

    name: str
    run: Callable[..., Any]
    timesteps: Callable[..., Any]
    spacings: tuple[str, ...]
    options: Mapping[str, Option]
    default_spacing: str | None
    all_steps_by_default: bool
    timestep_options: tuple[str, ...] = ()
    nfe: Callable[[int], int] = one_per_timestep
    min_steps: int = 1
    checks: tuple[Check, ...] = ()


SAMPLERS: dict[str, Sampler] = {}


def register(name: str, run, *, timesteps, spacings, options: Mapping[str, Option] | None = None,
             default_spacing: str | None = None, all_steps_by_default: bool = False,
             timestep_options: tuple[str, ...] = (), nfe: Callable[[int], int] = one_per_timestep,
             min_steps: int = 1, checks: tuple[Check, ...] = ()) -> None:
    """Make ``config.sample.sampler = name`` (and sample.py's ``--sampler=name``) sample with ``run``.

    ``timesteps(sched, steps, spacing)``: the increasing timesteps to visit, or None for all T (it is
    also given, as keywords, the ``timestep_options`` among its options, such as Karras et al.'s
    rho); ``spacings``: the values of ``config.sample.spacing`` it accepts; ``options``: the settings
    of :data:`OPTIONS` it takes, each with its check, and ``checks`` those of several together;
    ``min_steps``: the fewest steps it takes; ``nfe(n)``: its network evaluations on n distinct
    timesteps. When sample.py's ``--sampler`` names it, the spacing becomes ``default_spacing``
    unless ``--spacing`` is given, and with ``all_steps_by_default`` the steps become T unless
    ``--steps`` is given.
    """
    options = dict(options or {})
    if name in SAMPLERS:
        raise ValueError(f"a sampler named {name!r} is registered already")
    unknown = [key for key in options if key not in OPTIONS]
    if unknown:
        raise ValueError(f"sampler {name!r}: config.sample has no option {unknown[0]!r}; options: "
                         f"{', '.join(OPTIONS)}")
    if default_spacing is not None and default_spacing not in spacings:
        raise ValueError(f"sampler {name!r}: default_spacing {default_spacing!r} is not among its spacings "
                         f"{', '.join(spacings)}")
    foreign = [key for key in (*timestep_options, *(check.key for check in checks)) if key not in options]
    if foreign:
        raise ValueError(f"sampler {name!r}: {foreign[0]!r} is not among its options {', '.join(options)}")
    SAMPLERS[name] = Sampler(name, run, timesteps, tuple(spacings), options, default_spacing,
                             all_steps_by_default, tuple(timestep_options), nfe, min_steps, tuple(checks))


def get(name: str) -> Sampler:
    """The sampler registered as ``name``; a ValueError naming the registered ones if there is none."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; registered: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def visited_timesteps(sample, sched):
    """The timesteps a run of ``config.sample`` (``sample``) visits, or None for all T: its sampler's
    ``timesteps(sched, steps, spacing)``, given the options that choose them too (Karras et al.'s rho)."""
    sampler = get(sample["sampler"])
    return sampler.timesteps(sched, sample["steps"], sample["spacing"],
                             **{key: sample[key] for key in sampler.timestep_options})


def settings(sample) -> dict:
    """What of a config's ``sample`` section decides the samples, as sample.py and the guidance sweep
    record it: the sampler, its steps and spacing, eta (kept for every sampler), the clipping of x_0
    and the sampler's own options."""
    keys = ("sampler", "steps", "spacing", "eta", "clip_x0", *get(sample.sampler).options)
    return {k: sample[k] for k in keys}


def evaluations(sample, sched) -> int:
    """The network evaluations (NFE) of one run of ``config.sample``'s sampler: its ``nfe`` of the distinct
    timesteps it visits (all T for the full chain). Under classifier-free guidance each is one
    forward pass of twice the batch."""
    timesteps = visited_timesteps(sample, sched)
    levels = sched.num_timesteps if timesteps is None else len({int(t) for t in timesteps})
    return get(sample["sampler"]).nfe(levels)


def spacing_help() -> str:
    """Each sampler's spacings, samplers of the same ones together: ``ddpm, ddim: uniform, ...; ...``."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for sampler in SAMPLERS.values():
        groups.setdefault(sampler.spacings, []).append(sampler.name)
    return "; ".join(f"{', '.join(names)}: {', '.join(spacings)}" for spacings, names in groups.items())


def option_help(option: str) -> str:
    """The samplers that take ``option`` with what each allows: ``dpm_solver++: 1, 2 or 3 ...``."""
    return "; ".join(f"{name}: {sampler.options[option].allowed}" for name, sampler in SAMPLERS.items()
                     if option in sampler.options)


def _ddim_timesteps(sched, steps: int, spacing: str):
    """DDIM's S of T timesteps (section 4.2 and appendix D.2) by ``spacing``."""
    from diffusion_jax import samplers  # here, not at import: this module is read without loading JAX

    return samplers.ddim_timesteps(sched.num_timesteps, steps, spacing)


def _ddpm_timesteps(sched, steps: int, spacing: str):
    """The full chain (None) for S = T, else DDIM's S timesteps."""
    return None if steps == sched.num_timesteps else _ddim_timesteps(sched, steps, spacing)


def _ddpm(model_fn, sched, x_T, rng, **kwargs):
    """DDPM ancestral sampling, Algorithm 2 (Ho et al. 2020); with fewer steps on the respaced chain
    (improved DDPM section 4)."""
    from diffusion_jax import samplers

    return samplers.ddpm_sample(model_fn, sched, x_T, rng, **kwargs)


def _ddim(model_fn, sched, x_T, rng, **kwargs):
    """Generalized DDIM, eq. 12 with sigma of eq. 16 scaled by eta (Song et al. 2021)."""
    from diffusion_jax import samplers

    return samplers.ddim_sample(model_fn, sched, x_T, rng=rng, **kwargs)


def _dpm_solver_timesteps(sched, steps: int, spacing: str):
    """DPM-Solver's S timesteps (Lu et al. 2022a, section 3.3) by ``spacing``, its skip type."""
    from diffusion_jax import samplers

    return samplers.dpm_solver_timesteps(sched, steps, spacing)


def _dpm_solver(model_fn, sched, x_T, rng, **kwargs):
    """DPM-Solver++ multistep of order 1 (DDIM), 2 (2M) or 3 (3M) (Lu et al. 2022b); deterministic, so
    ``rng`` is not used."""
    from diffusion_jax import samplers

    return samplers.dpm_solver_sample(model_fn, sched, x_T, **kwargs)


def _edm_timesteps(sched, steps: int, spacing: str, rho: float = 7.0):
    """Karras et al.'s N = ``steps`` noise levels (eq. 5) with ``rho``, each at its nearest timestep."""
    from diffusion_jax import samplers

    return samplers.edm_timesteps(sched, steps, rho)


def _karras_steps(sched, timesteps, rho: float):
    """``timesteps``, refused unless they are Karras et al.'s with ``rho``: as :func:`visited_timesteps`
    chooses them, passing rho, and not with the default rho of a caller that did not."""
    import numpy as np

    steps = np.asarray(timesteps)
    ok = steps.ndim == 1 and len(steps) >= 2
    if not (ok and np.array_equal(steps, _edm_timesteps(sched, len(steps), "karras", rho))):
        raise ValueError(f"the timesteps {steps.tolist()} are not Karras et al.'s {len(steps)} steps with "
                         f"rho = {rho}: choose them with sampler_registry.visited_timesteps(config.sample, "
                         "sched)")
    return steps


def _euler(model_fn, sched, x_T, rng, *, timesteps, rho, **kwargs):
    """Euler's method on the probability-flow ODE in Karras et al.'s sigma form (their Algorithm 1 without
    the correction; DDIM with eta = 0 on the same timesteps); deterministic, ``rng`` is not used."""
    from diffusion_jax import samplers

    return samplers.edm_sample(model_fn, sched, x_T, timesteps=_karras_steps(sched, timesteps, rho),
                               second_order=False, **kwargs)


def _heun(model_fn, sched, x_T, rng, *, timesteps, rho, **kwargs):
    """Karras et al.'s Algorithm 1: Heun's 2nd-order method, the correction skipped at the last step;
    deterministic, ``rng`` is not used."""
    from diffusion_jax import samplers

    return samplers.edm_sample(model_fn, sched, x_T, timesteps=_karras_steps(sched, timesteps, rho), **kwargs)


def _heun_churn(model_fn, sched, x_T, rng, *, timesteps, rho, **kwargs):
    """Karras et al.'s Algorithm 2: Heun with noise added before each step (S_churn, S_tmin, S_tmax,
    S_noise), drawn from ``rng``; with S_churn = 0 it is ``heun``, bit for bit."""
    from diffusion_jax import samplers

    return samplers.edm_sample(model_fn, sched, x_T, timesteps=_karras_steps(sched, timesteps, rho), rng=rng,
                               **kwargs)


register("ddpm", _ddpm, timesteps=_ddpm_timesteps, spacings=SPACINGS, all_steps_by_default=True)
register("ddim", _ddim, timesteps=_ddim_timesteps, spacings=SPACINGS,
         options={"eta": Option(lambda eta: eta >= 0, ">= 0 (0: deterministic, 1: DDPM's variance)")})
register("dpm_solver++", _dpm_solver, timesteps=_dpm_solver_timesteps, spacings=DPM_SOLVER_SKIPS,
         options={"order": Option(lambda order: order in (1, 2, 3), "1, 2 or 3 (DPM-Solver++ 2M: 2, 3M: 3)"),
                  "threshold": Option(lambda ratio: 0 <= ratio < 1,
                                      "in [0, 1): 0 off, else the percentile of dynamic thresholding "
                                      "(0.995 in DPM-Solver++)")},
         default_spacing="logSNR")  # the DPM-Solver papers' choice
_RHO = {"rho": Option(lambda rho: 0 < rho < math.inf,
                      "> 0 and finite (eq. 5 of Karras et al.: 7; 1: uniform in sigma)")}
_EDM = dict(timesteps=_edm_timesteps, spacings=EDM_SPACINGS, default_spacing="karras",
            timestep_options=("rho",), min_steps=2)  # eq. 5 spaces N >= 2 levels
_CHURN = {
    "S_churn": Option(lambda churn: 0 <= churn < math.inf,
                      ">= 0 and finite (Algorithm 2's total churn; 0: heun's deterministic steps)"),
    "S_tmin": Option(lambda sigma: sigma >= 0, ">= 0 (the smallest sigma where noise is added)"),
    "S_tmax": Option(lambda sigma: sigma >= 0, ">= 0 or inf (the largest sigma where noise is added)"),
    "S_noise": Option(lambda scale: 0 < scale < math.inf,
                      "> 0 and finite (the added noise's scale; 1: exact; Karras et al.: 1.003 to 1.007)"),
}
register("euler", _euler, options=_RHO, **_EDM)
register("heun", _heun, options=_RHO, nfe=lambda levels: 2 * levels - 1, **_EDM)  # none at sigma_N = 0
register("heun_churn", _heun_churn, options={**_RHO, **_CHURN}, nfe=lambda levels: 2 * levels - 1,
         checks=(Check("S_tmin", lambda o: o["S_tmin"] <= o["S_tmax"],
                       "at most config.sample.S_tmax (noise is added where S_tmin <= sigma <= S_tmax)"),),
         **_EDM)
