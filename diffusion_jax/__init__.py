"""diffusion-jax: DDPM (Ho et al. 2020) and DDIM (Song et al. 2021) in JAX, exact to the papers.

Pure functions of arrays at the core: ``schedule`` (betas, q and its posterior,
parameterizations), ``losses`` (L_simple, the variational bound, bits/dim) and ``analytic``
(exact denoisers of Gaussian mixtures). Every denoiser is a callable ``model_fn(x_t, t)``.
"""
