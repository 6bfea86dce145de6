"""Group normalization (Wu & He 2018) over channels-last activations, the U-Net's only normalization.

The same layer as flax's ``nn.GroupNorm`` (and the original's ``tf.contrib.layers.group_norm``):
parameters ``scale`` and ``bias`` of shape [C], the mean and variance of each group of C / G
channels over all positions, computed in float32. The variance is E[(x - mean)^2], two passes
as the original's ``tf.nn.moments``: flax's default E[x^2] - E[x]^2 cancels catastrophically
when a group's mean is large against its spread (at mean 1e3 and std 1, outputs 0.25 off).
Each channel's sums over the positions come first, over the contiguous channel axis, and the
C / G channels of a group are added after; flax reduces the 5-D view [B, H, W, G, C/G] over
(H, W, C/G) at once, which XLA:CPU runs about half as fast (the measurements are in
benchmarks/README.md). On GPU and TPU both forms are the same reductions over the same data.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


class GroupNorm(nn.Module):
    """y = (x - mean_g) / sqrt(var_g + epsilon) * scale + bias, with g the group of x's channel (eq. 1-3)."""

    num_groups: int = 32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """``x`` [B, ..., C] with C a multiple of ``num_groups``; float32 out, whatever ``x``'s dtype."""
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"{channels} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        x = x.astype(jnp.float32)
        positions = tuple(range(1, x.ndim - 1))
        width = channels // self.num_groups  # channels a group
        count = math.prod(x.shape[1:-1]) * width  # values a group

        def group_mean(channel_sums):  # [B, C] -> [B, C], each channel given its group's mean
            groups = channel_sums.reshape(-1, self.num_groups, width).sum(-1) / count
            return jnp.repeat(groups, width, axis=-1)

        expand = (slice(None),) + (None,) * len(positions)  # [B, C] -> [B, 1, ..., 1, C]
        centered = x - group_mean(jnp.sum(x, axis=positions))[expand]
        var = group_mean(jnp.sum(jnp.square(centered), axis=positions))
        return centered * (jax.lax.rsqrt(var + self.epsilon) * scale)[expand] + bias
