"""Importance sampling of t for the variational bound (improved DDPM, Nichol & Dhariwal 2021, section 3.3).

L_vlb = E_{t ~ p_t}[L_t / p_t] with p_t proportional to sqrt(E[L_t^2]) (their eq. 18), E[L_t^2]
estimated from the last ``history`` values of L_t seen in training for each t. Until every t
has ``history`` values, t is uniform; afterwards a ``uniform_prob`` share stays uniform, as in
their code (``LossSecondMomentResampler``). Estimates are reweighted by 1 / (T p_t), so they have
the expectation of the uniform estimator (1/T) sum_t L_t whatever p.

The state is a pytree carried in the train state: pure functions, no host round trip.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

SAMPLERS = ("uniform", "loss-second-moment")


class LossHistory(NamedTuple):
    losses: jnp.ndarray  # [T, H] float32: the last H values of L_t for each t, oldest first
    counts: jnp.ndarray  # [T] int32: how many values each row holds (at most H)


def init_history(num_timesteps: int, history: int = 10) -> LossHistory:
    return LossHistory(jnp.zeros((num_timesteps, history), jnp.float32),
                       jnp.zeros((num_timesteps,), jnp.int32))


def probabilities(hist: LossHistory, uniform_prob: float = 1e-3) -> jnp.ndarray:
    """p_t [T]: uniform until every row is full, then sqrt(mean of L_t^2) normalized, mixed with uniform."""
    num_timesteps, size = hist.losses.shape
    uniform = jnp.full((num_timesteps,), 1.0 / num_timesteps)
    weights = jnp.sqrt(jnp.mean(jnp.square(hist.losses), axis=1))
    p = weights / jnp.sum(weights) * (1.0 - uniform_prob) + uniform_prob / num_timesteps
    return jnp.where(jnp.all(hist.counts >= size), p, uniform)


def sample(hist: LossHistory, rng, batch_size: int):
    """Timesteps t [B] drawn from p_t and the weights 1 / (T p_t) [B] that keep the estimate unbiased."""
    p = probabilities(hist)
    t = jax.random.choice(rng, p.shape[0], (batch_size,), p=p)
    return t.astype(jnp.int32), 1.0 / (p.shape[0] * p[t])


def update(hist: LossHistory, t, losses) -> LossHistory:
    """Record per-example ``losses`` [B] at timesteps ``t`` [B], in batch order; a full row drops its
    oldest."""
    size = hist.losses.shape[1]

    def record(i, h):
        row, count = h.losses[t[i]], h.counts[t[i]]
        row = jnp.where(count >= size, jnp.roll(row, -1).at[-1].set(losses[i]),
                        row.at[jnp.minimum(count, size - 1)].set(losses[i]))
        return LossHistory(h.losses.at[t[i]].set(row), h.counts.at[t[i]].set(jnp.minimum(count + 1, size)))

    return jax.lax.fori_loop(0, t.shape[0], record, hist)
