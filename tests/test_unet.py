"""The DDPM U-Net: parameter counts, layer details, and that it trains on this CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from diffusion_jax import losses
from diffusion_jax import schedule as S
from diffusion_jax.models.unet import PRESETS, UNet, timestep_embedding


def count(model, size):
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1,), jnp.int32))
    )
    return sum(x.size for x in jax.tree_util.tree_leaves(shapes))


def original_count(ch, ch_mult, num_res_blocks, attn_resolutions, size, in_ch=3, out_ch=3):
    """Variables of the original TF graph (diffusion_tf/models/unet.py), counted layer by layer."""
    conv = lambda i, o, k=3: k * k * i * o + o  # noqa: E731
    norm = lambda c: 2 * c  # noqa: E731
    temb = 4 * ch

    def res(i, o):
        return norm(i) + conv(i, o) + temb * o + o + norm(o) + conv(o, o) + (i * o + o if i != o else 0)

    def attn(c):
        return norm(c) + 4 * (c * c + c)

    total = (ch * temb + temb) + (temb * temb + temb) + conv(in_ch, ch)
    chans, c, res_now = [ch], ch, size
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            total += res(c, ch * mult) + (attn(ch * mult) if res_now in attn_resolutions else 0)
            c = ch * mult
            chans.append(c)
        if level != len(ch_mult) - 1:
            total += conv(c, c)
            chans.append(c)
            res_now //= 2
    total += 2 * res(c, c) + attn(c)
    for level, mult in reversed(list(enumerate(ch_mult))):
        for _ in range(num_res_blocks + 1):
            total += res(c + chans.pop(), ch * mult) + (attn(ch * mult) if res_now in attn_resolutions else 0)
            c = ch * mult
        if level != 0:
            total += conv(c, c)
            res_now *= 2
    return total + norm(c) + conv(c, out_ch)


def test_parameter_counts_of_the_paper_networks():
    cifar = {k: v for k, v in PRESETS["ddpm_cifar10"].items() if k != "dropout"}
    assert count(UNet(**PRESETS["ddpm_cifar10"]), 32) == 35_746_307 == original_count(**cifar, size=32)
    big = {k: v for k, v in PRESETS["ddpm_256"].items() if k != "dropout"}
    assert count(UNet(**PRESETS["ddpm_256"]), 256) == 113_673_219 == original_count(**big, size=256)
    learned = UNet(**PRESETS["ddpm_cifar10"], out_ch=6)
    assert count(learned, 32) == original_count(**cifar, size=32, out_ch=6)


def test_timestep_embedding_is_the_original():
    t = jnp.array([0, 1, 999])
    emb = timestep_embedding(t, 8)
    freqs = np.exp(-np.log(10000) * np.arange(4) / 3)
    expected = np.concatenate([np.sin(np.outer([0, 1, 999], freqs)), np.cos(np.outer([0, 1, 999], freqs))], 1)
    np.testing.assert_allclose(emb, expected, atol=2e-4)  # float32 sin of 999 rad
    assert timestep_embedding(t, 9).shape == (3, 9)


SMALL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), out_ch=6)


@functools.cache
def small_init():
    """Params of a small network with a learned-variance head, initialized once for the tests."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    return x, jax.jit(UNet(**SMALL).init)(jax.random.PRNGKey(1), x, jnp.array([0, 5]))


@pytest.mark.slow
def test_zero_init_layers_and_output_shape():
    model = UNet(**SMALL)
    x, variables = small_init()
    params = variables["params"]
    # fan_avg uniform: limit sqrt(3 scale / ((fan_in + fan_out) / 2)); "zero" layers have scale 1e-10
    for kernel, fan_avg, scale in [(params["conv_in"]["kernel"], (9 * 3 + 9 * 32) / 2, 1.0),
                                   (params["conv_out"]["kernel"], (9 * 32 + 9 * 6) / 2, 1e-10),
                                   (params["down_1_attn_0"]["proj_out"]["kernel"], 64.0, 1e-10)]:
        limit = np.sqrt(3 * scale / fan_avg)
        assert 0.9 * limit < float(jnp.abs(kernel).max()) <= limit
    out = jax.jit(model.apply)({"params": params}, x, jnp.array([0, 5]))
    assert out.shape == (2, 16, 16, 6) and out.dtype == jnp.float32


def test_downsampling_pads_like_tf_same():
    """A stride-2 3x3 conv with TF 'SAME' pads 0 before and 1 after: output (0, 0) sees rows 0..1 only."""
    model = UNet(ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)),
                                 jnp.zeros((1,), jnp.int32))["params"]
    kernel = params["down_0_downsample_conv"]["kernel"]
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 8, 32))
    y = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((0, 1), (0, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = nn.Conv(32, (3, 3), strides=(2, 2), padding="SAME").apply(
        {"params": params["down_0_downsample_conv"]}, x)
    np.testing.assert_allclose(ours, y + params["down_0_downsample_conv"]["bias"], atol=1e-5)


def test_bad_shapes_are_refused():
    model = UNet(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=())
    with pytest.raises(ValueError, match=r"divisible by 2\^\(levels - 1\) = 4"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 10, 10, 3)), jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match=r"timesteps must have shape \[B\] = \[2\]"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 3)), jnp.zeros((1,), jnp.int32))


@pytest.mark.slow
def test_cifar10_network_forward_and_train_step_run_on_cpu():
    """The 35.7M network compiles and takes one Adam step at batch 2 with dropout (smoke test)."""
    model = UNet(**PRESETS["ddpm_cifar10"])
    sched = S.make_schedule()
    x0 = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1, maxval=1)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x0, jnp.zeros((2,), jnp.int32))["params"]
    tx = optax.adam(2e-4)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, rng):
        def loss_fn(p):
            model_fn = lambda x, t: model.apply({"params": p}, x, t, train=True, rngs={"dropout": rng})  # noqa: E731
            return losses.training_losses(model_fn, sched, x0, rng, loss_type="mse", mean_type="eps",
                                          var_type="fixed_large").mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    new_params, opt_state, loss = step(params, opt_state, jax.random.PRNGKey(2))
    assert np.isfinite(float(loss)) and 0.5 < float(loss) < 2.0  # eps ~ N(0, 1) and a near-zero output
    # Adam's first step moves each weight with a non-negligible gradient by ~lr; the zero-init output
    # layer has one, while the layers behind it see gradients ~1e-10 until it grows
    moved = float(jnp.abs(new_params["conv_out"]["kernel"] - params["conv_out"]["kernel"]).max())
    assert 1e-4 < moved <= 2e-4 * 1.01
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree_util.tree_leaves(new_params))


def randomized(variables, seed=0, scale=0.05):
    """Weights with every entry perturbed, so that no layer (zero-init ones included) is trivial."""
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return tree.unflatten([p + scale * jax.random.normal(k, p.shape)
                           for p, k in zip(leaves, keys, strict=True)])


@pytest.mark.slow
def test_bf16_compute_keeps_float32_params_and_output():
    model = UNet(**SMALL, dtype=jnp.bfloat16)
    x, variables = small_init()
    variables = randomized(variables)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
    out = jax.jit(model.apply)(variables, x, jnp.array([3, 7]))
    ref = jax.jit(UNet(**SMALL).apply)(variables, x, jnp.array([3, 7]))
    assert out.dtype == jnp.float32
    assert float(jnp.abs(ref).max()) > 0.1
    assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max())
