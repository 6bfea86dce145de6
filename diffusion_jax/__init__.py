"""diffusion-jax: DDPM (Ho et al. 2020) and DDIM (Song et al. 2021) in JAX, exact to the papers.

Pure functions of arrays at the core: ``schedule`` (betas, q and its posterior,
parameterizations), ``losses`` (L_simple, the variational bound, bits/dim) and ``analytic``
(exact denoisers of Gaussian mixtures). Every denoiser is a callable ``model_fn(x_t, t)``.
"""

import os as _os

# On CPU, jaxlib 0.10 sends convolutions to YNNPACK, whose weight-gradient convolutions are
# slow; this routes single convolutions to Eigen instead: training twice as fast on this
# project's CPU (see benchmarks/), same results. A CPU-only option that other backends
# ignore; it takes effect only if set before JAX starts its backends, and a value the user
# set is kept.
if "xla_cpu_experimental_ynn_fusion_type" not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (
        _os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
    ).strip()
