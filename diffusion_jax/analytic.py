"""Exact denoisers for data whose distribution is known: isotropic Gaussian mixtures.

For x_0 ~ sum_k w_k N(m_k, s_k^2 I), q(x_t | x_0) (DDPM eq. 4) gives
x_t | k ~ N(sqrt(a-bar_t) m_k, (a-bar_t s_k^2 + 1 - a-bar_t) I), so the optimal eps-network,
E[eps | x_t], is the responsibility-weighted sum of
E[eps | x_t, k] = sqrt(1 - a-bar_t) (x_t - sqrt(a-bar_t) m_k) / (a-bar_t s_k^2 + 1 - a-bar_t).
A component with s_k = 0 is a point mass, so data on a finite grid (such as 8-bit pixels)
has an exact denoiser too. These plug into every function that takes ``model_fn``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax import schedule as sch


def gaussian_mixture_eps(sched: sch.Schedule, weights, means, variances):
    """``model_fn(x_t, t) -> E[eps | x_t]`` for a mixture of isotropic Gaussians.

    ``weights`` [K] (summing to 1), ``means`` [K, *event], ``variances`` [K] (s_k^2 >= 0).
    The trailing ``len(event)`` axes of x_t form one draw; all leading axes are independent
    draws, the first of which is the batch axis matched by ``t`` [B]. With ``event = ()``
    every element of x_t is an independent scalar draw (per-pixel data).
    """
    weights = jnp.asarray(weights, jnp.float32)
    means = jnp.asarray(means, jnp.float32)
    variances = jnp.asarray(variances, jnp.float32)
    num_k = weights.shape[0]
    if means.shape[0] != num_k or variances.shape != (num_k,):
        raise ValueError(
            f"weights {weights.shape}, means {means.shape} and variances {variances.shape} "
            "must share the number of components K as their first axis"
        )
    event_ndim = means.ndim - 1
    event_axes = tuple(range(-event_ndim - 1, -1))  # of [..., *event, K]
    dim = means[0].size

    def model_fn(x_t, t):
        if x_t.shape[x_t.ndim - event_ndim:] != means.shape[1:]:
            raise ValueError(f"x_t shape {x_t.shape} does not end in the event shape {means.shape[1:]}")
        a_bar = sch.extract(sched.alphas_cumprod, t, x_t.shape)[..., None]  # [B, 1.., 1]
        x = x_t[..., None]  # [..., *event, 1]: components on the last axis
        m = jnp.moveaxis(means, 0, -1)  # [*event, K]
        var = a_bar * variances + 1.0 - a_bar  # [B, 1.., K]
        diff = x - jnp.sqrt(a_bar) * m
        sq = jnp.sum(jnp.square(diff), axis=event_axes)  # [..., K]
        var_k = var.reshape(var.shape[: x_t.ndim - event_ndim] + (num_k,))
        log_r = jnp.log(weights) - 0.5 * dim * jnp.log(var_k) - 0.5 * sq / var_k
        r = jax.nn.softmax(log_r, axis=-1)  # responsibilities, [..., K]
        r = r.reshape(r.shape[:-1] + (1,) * event_ndim + (num_k,))
        eps_k = jnp.sqrt(1.0 - a_bar) * diff / var
        return jnp.sum(r * eps_k, axis=-1)

    return model_fn


def class_conditional_eps(sched: sch.Schedule, weights, means, variances):
    """``model_fn(x_t, t, y) -> E[eps | x_t, y]`` for a mixture whose components are the classes.

    ``y`` [B] in [0, K] holds class labels, with K (``len(weights)``) the "no class" label: label k
    gives component k's exact eps (the mixture restricted to k), label K the whole mixture's
    (:func:`gaussian_mixture_eps`), as a classifier-free-guidance network learns them both.
    """
    weights = jnp.asarray(weights, jnp.float32)
    num_k = weights.shape[0]
    components = [gaussian_mixture_eps(sched, [1.0], jnp.asarray(means)[k:k + 1],
                                       jnp.asarray(variances)[k:k + 1]) for k in range(num_k)]
    mixture = gaussian_mixture_eps(sched, weights, means, variances)

    def model_fn(x_t, t, y):
        if y.shape != t.shape:
            raise ValueError(f"labels y must have the shape of t {t.shape}, got {y.shape}")
        eps = jnp.stack([fn(x_t, t) for fn in components] + [mixture(x_t, t)])  # [K + 1, B, ...]
        return jnp.take_along_axis(eps, y.reshape((1, -1) + (1,) * (x_t.ndim - 1)), axis=0)[0]

    return model_fn
