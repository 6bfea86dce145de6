"""Classifier-free guidance (Ho & Salimans 2022): one network for a class and for no class, combined.

A conditional denoiser ``model_fn(x_t, t, y)`` takes integer labels ``y`` [B] in [0, K), or the
extra label K for "no class" (``null_label``), on which the network was also trained by dropping
labels at random (:func:`drop_labels`, their Algorithm 1). :func:`guided` turns it, for the
labels ``y`` to sample and a guidance scale ``w``, into the plain ``model_fn(x_t, t)`` every
sampler takes, so that DDPM, DDIM and DPM-Solver++ are guided with no code of their own:

    eps~(x_t, t, y) = (1 + w) eps(x_t, t, y) - w eps(x_t, t, no class)      (their eq. 6)

The combination has weights summing to 1, so it is the same whether the network predicts eps,
x_0 or v (each is affine in eps at a given x_t): an x_0-predicting solver such as DPM-Solver++
converts the guided output, which is guiding before the conversion. With a learned variance
(2C output channels) only the mean's channels are combined; the variance is the conditional
pass's (as in GLIDE). The two passes run as one forward of batch 2B; w = 0 is one pass of B.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import schedule as sch

# model_fn(x_t [B, ...], t [B], y [B]) -> output, as schedule.ModelFn with class labels
ConditionalModelFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def drop_labels(y, rng, p_uncond: float, null_label: int):
    """``y`` with each label replaced by ``null_label`` with probability ``p_uncond`` (independently, from
    ``rng``): the joint training of the conditional and unconditional model (their Algorithm 1)."""
    return jnp.where(jax.random.bernoulli(rng, p_uncond, y.shape), null_label, y)


def guided(model_fn: ConditionalModelFn, y, w: float, null_label: int) -> sch.ModelFn:
    """``model_fn(x_t, t)`` sampling labels ``y`` [B] at guidance scale ``w`` >= 0 (eq. 6 above)."""
    if w < 0:
        raise ValueError(f"the guidance scale w must be >= 0 (0: the conditional model alone), got {w}")
    if not isinstance(y, jax.core.Tracer):  # labels known here (not traced): checked now
        known = np.asarray(y)
        if known.size and (known.min() < 0 or known.max() > null_label):
            raise ValueError(f"class labels must be in [0, {null_label}) ({null_label}: no class), got "
                             f"{sorted(set(known.ravel().tolist()))[:10]}")
    y = jnp.asarray(y, jnp.int32)
    if w == 0:
        return lambda x_t, t: model_fn(x_t, t, y)

    def guided_fn(x_t, t):
        batch = x_t.shape[0]
        both = model_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                        jnp.concatenate([y, jnp.full_like(y, null_label)]))
        cond, uncond = both[:batch], both[batch:]
        channels = x_t.shape[-1]
        mean = (1.0 + w) * cond[..., :channels] - w * uncond[..., :channels]
        return jnp.concatenate([mean, cond[..., channels:]], axis=-1) if cond.shape[-1] > channels else mean

    return guided_fn
