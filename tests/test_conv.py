"""conv.py's convolutions, oneDNN's (diffusion_jax/models/onednn.py) against XLA's, and when each is used."""

import functools
import pathlib
import platform
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffusion_jax.evaluation.inception import InceptionV3
from diffusion_jax.models import conv, onednn
from diffusion_jax.models.unet import UNet

NHWC = ("NHWC", "HWIO", "NHWC")


def xla_conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC,
                                    precision=lax.Precision.HIGHEST)


def onednn_conv(x, w, strides, padding):
    return conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


def test_the_library_is_built_and_used_on_this_machine():
    # make install builds it on x86-64 Linux (setup.py); elsewhere XLA's convolutions run.
    if platform.machine() != "x86_64":
        pytest.skip(f"the oneDNN wheels are x86-64 only; this machine is {platform.machine()}")
    assert onednn.onednn_available(), "diffusion_jax/_onednn_conv*.so is missing: run make install (setup.py)"
    assert onednn.uses_onednn()


def test_a_library_that_does_not_load_is_one_warning_and_xla_convolutions(tmp_path, monkeypatch):
    library = tmp_path / "_onednn_conv.cpython-311-x86_64-linux-gnu.so"
    library.write_bytes(b"not a shared library")
    monkeypatch.setattr(onednn, "__file__", str(tmp_path / "models" / "onednn.py"))  # where _library looks
    # uncached copies for this test; the module's own, with the real library, come back after it
    monkeypatch.setattr(onednn, "_library", functools.cache(onednn._library.__wrapped__))
    monkeypatch.setattr(onednn, "onednn_available", functools.cache(onednn.onednn_available.__wrapped__))
    x, w = jnp.ones((1, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")  # each warning recorded, repeats included
        assert not onednn.onednn_available()
        assert not onednn.uses_onednn()
        np.testing.assert_allclose(onednn_conv(x, w, (1, 1), "SAME"), xla_conv(x, w, (1, 1), "SAME"),
                                   rtol=1e-6)
    assert [warning.category for warning in warned] == [RuntimeWarning], [str(m.message) for m in warned]
    message = str(warned[0].message)
    assert str(library) in message and "make install" in message, message
    assert "pip install --no-build-isolation -e ." in message, message


needs_onednn = pytest.mark.skipif(not onednn.uses_onednn(), reason="oneDNN convolutions not in use here")


def _hlo(f, *args):
    return jax.jit(f).lower(*args).as_text()


@needs_onednn
def test_onednn_computes_the_weight_gradient_on_avx512_cpus_and_of_large_inputs():
    flags = set()
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    # oneDNN's avx512_core: AVX-512 F, BW, VL and DQ
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    limit = onednn.XLA_WEIGHT_GRADIENT_MAX_SIZE
    assert onednn.onednn_weight_gradient(limit) == avx512
    assert onednn.onednn_weight_gradient(limit + 1)


@needs_onednn
@pytest.mark.parametrize("weight_gradient", ["onednn", "xla"])
@pytest.mark.parametrize("n,h,w,c,o,k,stride,padding", [
    (2, 8, 8, 16, 32, 3, 1, "SAME"),
    (2, 8, 8, 16, 16, 3, 2, "SAME"),  # the U-Net's downsampling: TF 'SAME', 0 before and 1 after
    (3, 7, 5, 3, 8, 3, 1, "SAME"),  # odd, non-square, 3 input channels (conv_in)
    (2, 6, 6, 8, 3, 1, 1, "VALID"),
    (1, 9, 9, 4, 4, 3, 2, ((2, 0), (1, 1))),
])
def test_forward_and_gradients_match_xla(monkeypatch, weight_gradient, n, h, w, c, o, k, stride, padding):
    monkeypatch.setattr(onednn, "onednn_weight_gradient", lambda x_size: weight_gradient == "onednn")
    kx, kw, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (n, h, w, c))
    kernel = jax.random.normal(kw, (k, k, c, o)) / np.sqrt(k * k * c)
    strides = (stride, stride)
    y_ref = xla_conv(x, kernel, strides, padding)
    cotangent = jax.random.normal(ky, y_ref.shape)

    def loss(f):
        return lambda x, kernel: jnp.sum(f(x, kernel, strides, padding) * cotangent)

    assert "onednn_conv_forward" in _hlo(lambda x, w: onednn_conv(x, w, strides, padding), x, kernel)
    y = jax.jit(onednn_conv, static_argnums=(2, 3))(x, kernel, strides, padding)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    gradient = jax.grad(loss(onednn_conv), argnums=(0, 1))
    hlo = _hlo(gradient, x, kernel)
    assert "onednn_conv_backward_data" in hlo
    assert ("onednn_conv_backward_weights" in hlo) == (weight_gradient == "onednn")
    dx, dw = jax.jit(gradient)(x, kernel)
    dx_ref, dw_ref = jax.grad(loss(xla_conv), argnums=(0, 1))(x, kernel)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("variable", ["1", "0"])
@pytest.mark.parametrize("n,h,w,c,o", [(2, 4, 4, 8, 8), (3, 5, 3, 4, 6), (1, 1, 1, 2, 3)])
def test_upsample_conv_is_nearest_upsampling_then_a_3x3_conv(monkeypatch, variable, n, h, w, c, o):
    """Values and both gradients of the four-phase form against the upsampled image convolved by XLA."""
    monkeypatch.setenv("DIFFUSION_JAX_ONEDNN", variable)
    kx, kw, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    x, kernel = jax.random.normal(kx, (n, h, w, c)), jax.random.normal(kw, (3, 3, c, o)) / np.sqrt(9 * c)
    cotangent = jax.random.normal(ky, (n, 2 * h, 2 * w, o))

    def upsampled(x, kernel):
        return xla_conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), kernel, (1, 1), "SAME")

    def loss(f):
        return lambda x, kernel: jnp.sum(f(x, kernel) * cotangent)

    def ours(x, kernel):  # a new function each test, traced afresh under its DIFFUSION_JAX_ONEDNN
        return conv.upsample_conv(x, kernel)

    assert ("onednn_conv_forward" in _hlo(ours, x, kernel)) == onednn.uses_onednn()
    np.testing.assert_allclose(jax.jit(ours)(x, kernel), upsampled(x, kernel), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, kernel)
    for g, g_ref in zip(grads, jax.grad(loss(upsampled), argnums=(0, 1))(x, kernel), strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-4)


def test_upsample_conv_refuses_other_kernels():
    with pytest.raises(ValueError, match="3x3 kernel, got 1x1"):
        conv.upsample_conv(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 1, 2, 2)))


@needs_onednn
def test_a_dense_layer_over_nhwc_channels_is_a_1x1_convolution():
    # nn.Dense(dot_general=conv.dot_general) on activations, as the U-Net's q, k, v, proj_out and shortcuts
    kx, kw, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    x, kernel = jax.random.normal(kx, (2, 5, 6, 12)), jax.random.normal(kw, (12, 7)) / np.sqrt(12)
    cotangent = jax.random.normal(ky, (2, 5, 6, 7))
    dense = (((3,), (0,)), ((), ()))

    def loss(dot_general):
        return lambda x, kernel: jnp.sum(dot_general(x, kernel, dense) * cotangent)

    ours = functools.partial(conv.dot_general, dimension_numbers=dense)
    assert "onednn_conv_forward" in _hlo(ours, x, kernel)
    y_ref = jnp.einsum("nhwc,co->nhwo", x, kernel, precision="highest")
    np.testing.assert_allclose(jax.jit(ours)(x, kernel), y_ref, rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(loss(conv.dot_general), argnums=(0, 1)))(x, kernel)
    xla_dot = functools.partial(lax.dot_general, precision="highest")
    grads_ref = jax.grad(loss(xla_dot), argnums=(0, 1))(x, kernel)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
    # a dense layer on vectors (the timestep embedding's) and other contractions stay XLA's dot
    for args in ((x[:, 0, 0], kernel, (((1,), (0,)), ((), ()))), (x, x, (((3,), (3,)), ((0,), (0,))))):
        hlo = _hlo(lambda a, b, d=args[2]: conv.dot_general(a, b, d), *args[:2])
        assert "onednn" not in hlo and "dot_general" in hlo


@needs_onednn
def test_under_vmap_each_example_is_convolved_in_turn():
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 6, 6, 4))
    kernel = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 4, 5))
    y = jax.jit(jax.vmap(lambda x: onednn_conv(x, kernel, (1, 1), "SAME")))(x)
    y_ref = jax.vmap(lambda x: xla_conv(x, kernel, (1, 1), "SAME"))(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_xla_convolves_what_onednn_is_not_asked_to(monkeypatch):
    x, kernel = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    nhwc = functools.partial(conv.conv_general_dilated, dimension_numbers=NHWC)
    bf16 = jnp.bfloat16
    cases = {
        "bfloat16": lambda: nhwc(x.astype(bf16), kernel.astype(bf16), (1, 1), "SAME"),
        "dilation": lambda: nhwc(x, kernel, (1, 1), "SAME", rhs_dilation=(2, 2)),
        "groups": lambda: nhwc(x, kernel[..., :2, :], (1, 1), "SAME", feature_group_count=2),
        "cropping": lambda: nhwc(x, kernel, (1, 1), ((-1, 1), (1, 1))),
        "NCHW": lambda: conv.conv_general_dilated(x.transpose(0, 3, 1, 2), kernel.transpose(3, 2, 0, 1),
                                                  (1, 1), "SAME"),
    }
    for name, f in cases.items():
        hlo = _hlo(f)
        assert "onednn" not in hlo and "convolution" in hlo, name
    monkeypatch.setenv("DIFFUSION_JAX_ONEDNN", "0")
    assert "onednn" not in _hlo(lambda: onednn_conv(x, kernel, (1, 1), "SAME"))


@needs_onednn
def test_convolutions_that_xla_runs_at_once_do_not_share_a_scratchpad():
    # 24 independent convolutions: XLA runs some at the same time on different threads. With
    # oneDNN's library-managed scratchpad (shared by the primitives one thread made) 80 of 100
    # runs of this program were wrong, by up to 97%.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 17, 17, 192)), jnp.float32)
    geometries = [((1, 7), (0, 3)), ((7, 1), (3, 0)), ((3, 3), (1, 1)), ((1, 1), (0, 0)), ((5, 5), (2, 2)),
                  ((1, 3), (0, 1)), ((3, 1), (1, 0)), ((3, 3), (0, 0))] * 3
    kernels = [jnp.asarray(rng.normal(size=(*k, 192, 160)) / 40, jnp.float32) for k, _ in geometries]

    def branches(conv2d):
        return jax.jit(lambda x, kernels: [conv2d(x, k, (1, 1), tuple((p, p) for p in pad))
                                           for k, (_, pad) in zip(kernels, geometries, strict=True)])

    expected = branches(xla_conv)(x, kernels)
    ours = branches(onednn_conv)
    for _ in range(20):
        for y, y_ref in zip(ours(x, kernels), expected, strict=True):
            np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4 * float(np.abs(y_ref).max()))


@needs_onednn
@pytest.mark.parametrize("weight_gradient", ["onednn", "xla"])  # the AVX-512 CPUs' choice, and AVX2's here
@pytest.mark.slow
def test_the_unet_convolves_through_onednn_and_matches_xla(monkeypatch, weight_gradient):
    monkeypatch.setattr(onednn, "onednn_weight_gradient", lambda x_size: weight_gradient == "onednn")
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    x, t = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 3)), jnp.array([3, 700])
    params = model.init(jax.random.PRNGKey(4), x, t)
    # conv_out starts near zero (scale 1e-10): give it weights so the comparison sees the whole network
    def nonzero_conv_out(path, p):
        return jax.random.normal(jax.random.PRNGKey(5), p.shape) * 0.1 if "conv_out" in str(path) else p

    params = jax.tree.map_with_path(nonzero_conv_out, params)

    def loss(params):
        return jnp.mean(model.apply(params, x, t) ** 2)

    # conv_in, two per block (2 down, 2 mid, 4 up), one downsample conv, the upsample conv's four
    # phases, conv_out; the 1x1 layers: q, k, v and proj_out of 4 attention blocks, 5 shortcuts
    assert _hlo(loss, params).count("@onednn_conv_forward(") == 1 + 2 * 8 + 1 + 4 + 1 + 4 * 4 + 5
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    monkeypatch.setenv("DIFFUSION_JAX_ONEDNN", "0")
    value_ref, grads_ref = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    # some gradients are zero but for rounding (a conv's bias before a GroupNorm): their scale is the
    # largest gradient's
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_ref))
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6 * scale)


@needs_onednn
def test_the_inception_convolves_through_onednn():
    # its features against pytorch-fid's, through this path, are tests/test_inception_parity.py's
    network, images = InceptionV3(), jnp.zeros((1, 32, 32, 3), jnp.uint8)
    params = jax.eval_shape(network.init, jax.random.PRNGKey(0), images)
    kernels = [p for p in jax.tree.leaves(params) if p.ndim == 4]
    hlo = _hlo(network.apply, params, images)
    assert hlo.count("@onednn_conv_forward(") == len(kernels) == 94 and "convolution" not in hlo


@pytest.mark.integration
def test_a_program_over_several_devices_keeps_xla_convolutions():
    # A custom call carries no partitioning rule: sharded programs keep XLA's convolutions.
    code = ("from diffusion_jax.models import onednn\n"
            "import jax\n"
            "assert jax.device_count() == 2 and not onednn.uses_onednn()\n"
            "print('ok')\n")
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
