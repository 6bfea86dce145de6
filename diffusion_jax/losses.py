"""Training objectives and the variational bound in bits/dim (DDPM sections 3.3-3.4, 4.2).

``model_fn(x_t, t) -> output`` is any denoiser: integer timesteps ``t`` [B] in [0, T),
output with C channels, or 2C when the variance is learned.

Loss types: ``mse`` is L_simple (DDPM eq. 14) on the target of the ``mean_type``;
``kl`` is the true bound's term L_{t-1} in bits/dim at a uniform t (the DDPM code's ``kl``
loss, which its table 2 ablations train); ``rescaled_kl`` is improved DDPM's L_vlb = T * L_{t-1},
an unbiased estimate of the whole bound L_0 + ... + L_{T-1} (their eq. 16 and their code's
``RESCALED_KL``, what its ``use_kl`` trains); ``hybrid`` is their L_simple + lambda L_vlb with
the mean stopped in the bound term, so that lambda = 0.001 is the paper's value.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

from diffusion_jax import schedule as sch

LOSS_TYPES = ("mse", "kl", "rescaled_kl", "hybrid")

# Floor of the decoder's bin probabilities, as in the DDPM and improved DDPM codes (see
# discretized_gaussian_log_likelihood).
DECODER_FLOOR = 1e-12


def mean_flat(x: jnp.ndarray) -> jnp.ndarray:
    """Mean over all axes but the batch axis."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def _log_gaussian_interval(lo, hi):
    """log(Phi(hi) - Phi(lo)) for lo < hi, accurate in both tails down to DECODER_FLOOR * Phi(hi).

    Below that the bin is floored anyway; the bound on the ratio Phi(lo) / Phi(hi) keeps the
    log (and its gradient) finite where the two CDF values are equal in float32.
    """
    flip = lo > 0  # mirror intervals in the upper tail into the lower one
    lo, hi = jnp.where(flip, -hi, lo), jnp.where(flip, -lo, hi)
    log_hi, log_lo = log_ndtr(hi), log_ndtr(lo)
    ratio = jnp.minimum(log_lo - log_hi, np.log1p(-DECODER_FLOOR))
    return log_hi + jnp.log(-jnp.expm1(ratio))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of the discretized Gaussian decoder (DDPM eq. 13), elementwise, in nats.

    ``x`` holds data values on the grid {-1 + 2k/255}; the bins are of width 2/255 and the
    two edge bins extend to -inf and +inf. The original code uses a tanh approximation of
    the normal CDF; here it is exact (``log_ndtr``), so bin probabilities sum to 1. Each bin's
    probability is floored at ``DECODER_FLOOR`` = 1e-12 as in the DDPM and improved DDPM codes,
    so a pixel costs at most -log2(1e-12) = 39.9 bits however far the mean is from it (with the
    floor's zero gradient there); a model whose mean lies within a few sigma of x is unaffected.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"shapes differ: x {x.shape}, means {means.shape}, log_scales {log_scales.shape}")
    inv_stdv = jnp.exp(-log_scales)
    plus_in = inv_stdv * (x - means + 1.0 / 255.0)
    min_in = inv_stdv * (x - means - 1.0 / 255.0)
    log_cdf_plus = log_ndtr(plus_in)
    log_one_minus_cdf_min = log_ndtr(-min_in)
    log_bin = _log_gaussian_interval(min_in, plus_in)
    log_p = jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_bin))
    return jnp.maximum(log_p, np.log(DECODER_FLOOR))


def vb_terms_bpd(
    sched: sch.Schedule, model_output, x0, x_t, t, *, mean_type: str, var_type: str, clip_x0: bool
):
    """L_{t-1} of the bound (DDPM eq. 5) in bits/dim, per example, and the x_0 prediction.

    KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0; the decoder's -log p(x_0|x_1) for t = 0.
    """
    true_mean, _, true_log_var = sch.q_posterior_mean_variance(sched, x0, x_t, t)
    p = sch.p_mean_variance(
        sched, model_output, x_t, t, mean_type=mean_type, var_type=var_type, clip_x0=clip_x0
    )
    kl = mean_flat(normal_kl(true_mean, true_log_var, p.mean, p.log_variance)) / np.log(2.0)
    decoder_nll = -mean_flat(
        discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance)
    ) / np.log(2.0)
    return jnp.where(t == 0, decoder_nll, kl), p.pred_x0


def prior_bpd(sched: sch.Schedule, x0):
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, per example (DDPM eq. 5)."""
    t_last = jnp.full((x0.shape[0],), sched.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_var = sch.q_mean_variance(sched, x0, t_last)
    return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / np.log(2.0)


def losses_at(
    model_fn: sch.ModelFn,
    sched: sch.Schedule,
    x0,
    t,
    noise,
    *,
    loss_type: str,
    mean_type: str,
    var_type: str,
    hybrid_lambda: float = 1e-3,
):
    """Per-example loss [B] at given timesteps and noise (see the module docstring)."""
    check_loss_type(loss_type, var_type)
    sch.check_types(mean_type, var_type)
    x_t = sch.q_sample(sched, x0, t, noise)
    model_output = model_fn(x_t, t)

    def l_vlb(output):  # improved DDPM's L_vlb, T * L_{t-1}
        vb = vb_terms_bpd(sched, output, x0, x_t, t, mean_type=mean_type, var_type=var_type, clip_x0=False)
        return sched.num_timesteps * vb[0]

    if loss_type == "kl":
        return vb_terms_bpd(sched, model_output, x0, x_t, t, mean_type=mean_type, var_type=var_type,
                            clip_x0=False)[0]
    if loss_type == "rescaled_kl":
        return l_vlb(model_output)
    mean_out, var_out = sch.split_model_output(model_output, x_t, var_type)
    target = sch.training_target(sched, x0, x_t, t, noise, mean_type)
    mse = mean_flat(jnp.square(target - mean_out))
    if loss_type == "mse":
        return mse
    return mse + hybrid_lambda * l_vlb(jnp.concatenate([jax.lax.stop_gradient(mean_out), var_out], axis=-1))


def training_losses(model_fn: sch.ModelFn, sched: sch.Schedule, x0, rng, **loss_kwargs):
    """Per-example loss [B] with t ~ Uniform{0, ..., T-1} and eps ~ N(0, I) (DDPM Algorithm 1).

    ``loss_kwargs`` are those of :func:`losses_at`.
    """
    t_rng, noise_rng = jax.random.split(rng)
    t = jax.random.randint(t_rng, (x0.shape[0],), 0, sched.num_timesteps)
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    return losses_at(model_fn, sched, x0, t, noise, **loss_kwargs)


class BitsPerDim(NamedTuple):
    """The full bound per example: ``total`` = sum of ``terms`` over t + ``prior``."""

    total: jnp.ndarray  # [B]
    prior: jnp.ndarray  # [B], L_T
    terms: jnp.ndarray  # [B, T], L_{t-1} for t = 0..T-1 (index 0 is the decoder term)
    x0_mse: jnp.ndarray  # [B, T], mean squared error of the x_0 prediction at each t


def bits_per_dim(
    model_fn: sch.ModelFn,
    sched: sch.Schedule,
    x0,
    rng,
    *,
    mean_type: str,
    var_type: str,
    clip_x0: bool = True,
) -> BitsPerDim:
    """Negative log-likelihood bound L (DDPM eq. 5) in bits/dim: all T terms plus the prior.

    Each term uses fresh noise ``fold_in(rng, t)``, as the original ``calc_bpd_loop``; the
    loop over t is one ``lax.scan``.
    """
    sch.check_types(mean_type, var_type)
    batch = x0.shape[0]

    def term(_, t_scalar):
        t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x0.shape, x0.dtype)
        x_t = sch.q_sample(sched, x0, t, noise)
        bpd, pred_x0 = vb_terms_bpd(
            sched, model_fn(x_t, t), x0, x_t, t, mean_type=mean_type, var_type=var_type, clip_x0=clip_x0
        )
        return None, (bpd, mean_flat(jnp.square(pred_x0 - x0)))

    _, (terms, mse) = jax.lax.scan(term, None, jnp.arange(sched.num_timesteps, dtype=jnp.int32))
    prior = prior_bpd(sched, x0)
    terms, mse = terms.T, mse.T
    return BitsPerDim(jnp.sum(terms, axis=1) + prior, prior, terms, mse)


def check_loss_type(loss_type: str, var_type: str) -> None:
    """Raise a ValueError for an unknown loss type or one that does not fit the variance."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
    learned = var_type in sch.LEARNED_VAR_TYPES
    if loss_type == "hybrid" and not learned:
        raise ValueError(
            f"loss_type 'hybrid' trains a learned variance; model_var_type is {var_type!r}, "
            "use 'learned' or 'learned_range' (or loss_type 'mse' for a fixed variance)"
        )
    if loss_type == "mse" and learned:
        raise ValueError(
            f"loss_type 'mse' gives no gradient to the variance of model_var_type {var_type!r}; "
            "use 'hybrid' or 'kl'"
        )
