"""Samplers by name: how each chooses its timesteps, the settings it takes, and the function that runs it.

``config.validate``, sample.py's flags and ``sample_lib`` read :data:`SAMPLERS`. A sampler is one
function and one :func:`register` call; the function is called as

    run(model_fn, sched, x_T, rng, *, timesteps, mean_type, var_type, clip_x0, record, **options)

and returns :class:`~diffusion_jax.samplers.Samples`, with ``timesteps`` what the entry's
``timesteps(sched, steps, spacing)`` chose from ``config.sample`` and ``options`` the entry's
settings of ``config.sample`` (among :data:`OPTIONS`). It is traced inside ``jax.jit``.

This module does not load JAX (sample.py defines its flags from it before JAX starts); the
built-in samplers import :mod:`diffusion_jax.samplers` when they run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from diffusion_jax.spacings import DPM_SOLVER_SKIPS, SPACINGS

# The settings of config.sample that samplers may take beyond steps, spacing and clip_x0, each with the
# value it must keep under a sampler that does not take it (None: any, it is ignored).
OPTIONS = {"eta": 0.0, "order": None, "threshold": 0.0}


class Option(NamedTuple):
    """A setting a sampler takes: whether a value is allowed, and what is (for the config error)."""

    valid: Callable[[Any], bool]
    allowed: str


class Sampler(NamedTuple):
    """A registered sampler (see :func:`register`)."""

    name: str
    run: Callable[..., Any]
    timesteps: Callable[[Any, int, str], Any]
    spacings: tuple[str, ...]
    options: Mapping[str, Option]
    default_spacing: str | None
    all_steps_by_default: bool


SAMPLERS: dict[str, Sampler] = {}


def register(name: str, run, *, timesteps, spacings, options: Mapping[str, Option] | None = None,
             default_spacing: str | None = None, all_steps_by_default: bool = False) -> None:
    """Make ``config.sample.sampler = name`` (and sample.py's ``--sampler=name``) sample with ``run``.

    ``timesteps(sched, steps, spacing)``: the increasing timesteps to visit, or None for all T;
    ``spacings``: the values of ``config.sample.spacing`` it accepts; ``options``: the settings of
    :data:`OPTIONS` it takes, each with its check. When sample.py's ``--sampler`` names it, the
    spacing becomes ``default_spacing`` unless ``--spacing`` is given, and with
    ``all_steps_by_default`` the steps become T unless ``--steps`` is given.
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
    SAMPLERS[name] = Sampler(name, run, timesteps, tuple(spacings), options, default_spacing,
                             all_steps_by_default)


def get(name: str) -> Sampler:
    """The sampler registered as ``name``; a ValueError naming the registered ones if there is none."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; registered: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


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


register("ddpm", _ddpm, timesteps=_ddpm_timesteps, spacings=SPACINGS, all_steps_by_default=True)
register("ddim", _ddim, timesteps=_ddim_timesteps, spacings=SPACINGS,
         options={"eta": Option(lambda eta: eta >= 0, ">= 0 (0: deterministic, 1: DDPM's variance)")})
register("dpm_solver++", _dpm_solver, timesteps=_dpm_solver_timesteps, spacings=DPM_SOLVER_SKIPS,
         options={"order": Option(lambda order: order in (1, 2, 3), "1, 2 or 3 (DPM-Solver++ 2M: 2, 3M: 3)"),
                  "threshold": Option(lambda ratio: 0 <= ratio < 1,
                                      "in [0, 1): 0 off, else the percentile of dynamic thresholding "
                                      "(0.995 in DPM-Solver++)")},
         default_spacing="logSNR")  # the DPM-Solver papers' choice
