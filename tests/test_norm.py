"""GroupNorm: the layer's equations in float64, and flax's nn.GroupNorm's parameters and numbers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models.norm import GroupNorm

GROUPS, EPS = 8, 1e-6


def reference(x, scale, bias, groups=GROUPS, eps=EPS):
    """Wu & He (2018), eq. 1-3, in float64: each group of C/G channels normalized over all positions."""
    x = np.asarray(x, np.float64)
    b, *positions, c = x.shape
    g = x.reshape(b, -1, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def inputs(shape, seed=0):
    """Activations whose channels have their own offsets and scales (a group's mean is not 0)."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    return (rng.normal(size=shape) * rng.uniform(0.5, 3, c) + rng.normal(size=c) * 2).astype(np.float32)


@pytest.mark.parametrize("shape", [(3, 8, 8, 32), (2, 5, 7, 16), (4, 64)])
def test_matches_the_equations_in_float64(shape):
    x = inputs(shape)
    rng = np.random.default_rng(1)
    params = {"scale": rng.normal(size=shape[-1]).astype(np.float32),
              "bias": rng.normal(size=shape[-1]).astype(np.float32)}
    y = GroupNorm(GROUPS, EPS).apply({"params": params}, jnp.asarray(x))
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, reference(x, params["scale"], params["bias"]), rtol=1e-4, atol=2e-5)


def test_a_large_mean_against_its_spread_keeps_float32_precision():
    """Mean 1e3, std 1: the variance from E[(x - mean)^2] stays within float32 rounding of the
    group mean (E[x^2] - E[x]^2 loses all of it: outputs 0.25 off)."""
    x = (1e3 + np.random.default_rng(3).normal(size=(2, 16, 16, 64))).astype(np.float32)
    layer = GroupNorm(GROUPS, EPS)
    y = layer.apply(layer.init(jax.random.PRNGKey(0), jnp.asarray(x)), jnp.asarray(x))
    np.testing.assert_allclose(y, reference(x, 1.0, 0.0), rtol=0, atol=1e-3)


def test_bfloat16_input_gives_float32_output_from_its_float32_values():
    x = jnp.asarray(inputs((2, 4, 4, 32)), jnp.bfloat16)
    variables = GroupNorm(GROUPS, EPS).init(jax.random.PRNGKey(0), x)
    y = GroupNorm(GROUPS, EPS).apply(variables, x)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, reference(np.asarray(x, np.float32), 1.0, 0.0), rtol=1e-4, atol=2e-5)


def test_has_flax_group_norms_parameters_and_numbers():
    """U-Net checkpoints made with flax's nn.GroupNorm load unchanged: same outputs and gradients."""
    x = jnp.asarray(inputs((4, 16, 16, 64)))
    ours, theirs = GroupNorm(GROUPS, EPS), nn.GroupNorm(num_groups=GROUPS, epsilon=EPS)
    params = theirs.init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(0), x)) == jax.tree.map(jnp.shape, params)
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-5, atol=1e-5)
    weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def grads(layer):
        return jax.grad(lambda p, x: jnp.sum(layer.apply(p, x) * weights), argnums=(0, 1))(params, x)

    for g_ours, g_theirs in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(theirs)), strict=True):
        np.testing.assert_allclose(g_ours, g_theirs, rtol=1e-4, atol=1e-4)


def test_channels_that_do_not_split_into_the_groups_are_refused():
    with pytest.raises(ValueError, match="48 channels do not split into 32 groups"):
        GroupNorm(32).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 48)))
