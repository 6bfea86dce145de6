"""The names of the samplers' timestep spacings, importable without JAX: sample.py lists them in its
flags' help before JAX starts (see ``sampler_registry``)."""

# samplers.ddim_timesteps: DDIM section 4.2 and appendix D.2 (uniform, quad), Lin et al. 2023 (the others)
SPACINGS = ("uniform", "quad", "trailing", "linspace")
# samplers.dpm_solver_timesteps: DPM-Solver (Lu et al. 2022a) section 3.3
DPM_SOLVER_SKIPS = ("logSNR", "time_uniform", "time_quadratic")
