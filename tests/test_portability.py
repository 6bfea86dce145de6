"""The project's programs lower for TPU and for CUDA GPUs from this CPU host (``jax.export``).

Each program is traced here, where the oneDNN convolutions are in use (one CPU device, the
library built), and exported for ``tpu`` and for ``cuda`` with all of export's checks: a
program that carried the CPU's custom calls to another platform would fail to export. Beyond
those checks, an exported module may hold no custom call but the sharding markers every
platform has, so that a kernel of one platform (the CPU's oneDNN, a CUDA library) is caught
by name. Parameters are shapes only (``jax.eval_shape``): nothing is initialized or compiled.
"""

import json
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scripts
from jax import export

from configs import cifar10, cifar10_cond, ddpm256
from diffusion_jax import builders, sample_lib
from diffusion_jax.evaluation import inception, likelihood
from diffusion_jax.models import onednn

PLATFORMS = ("tpu", "cuda")
# custom calls that every platform's compiler implements: JAX's sharding annotations
PORTABLE_TARGETS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}


def custom_calls(module_text: str) -> set[str]:
    return set(re.findall(r"custom_call @([\w.$-]+)", module_text))


def check_exports(jitted, *args) -> dict[str, str]:
    """Export ``jitted`` at ``args`` for each of PLATFORMS; fail on a custom call they may lack. Returns
    each platform's module as text."""
    texts = {}
    for platform in PLATFORMS:
        exported = export.export(jitted, platforms=(platform,))(*args)
        assert exported.platforms == (platform,)
        texts[platform] = exported.mlir_module()
        foreign = custom_calls(texts[platform]) - PORTABLE_TARGETS
        assert not foreign, f"the {platform} program calls {sorted(foreign)}"
    return texts


def precisions(module_text: str) -> list[str]:
    """The operand precision of each convolution and dot of a StableHLO module ('DEFAULT' when unset)."""
    products = [line for line in module_text.splitlines()
                if re.search(r"= stablehlo\.(convolution|dot_general)\b", line)]
    assert products, "the module has no convolution or dot"
    names = [re.findall(r"precision(?:_config)? = \[(?:#stablehlo<precision )?(\w+)", p) for p in products]
    return [found[0] if found else "DEFAULT" for found in names]


def test_the_programs_here_use_onednn_on_the_cpu():
    """The premise of the tests below: traced here, the programs contain oneDNN's calls for the CPU."""
    if not onednn.uses_onednn():
        pytest.skip("the oneDNN library is not in use on this host, so there is no CPU-only call to keep out")
    c = cifar10.get_config()
    model = builders.make_model(c)
    x, t = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32)
    params = abstract_params(model, 32)
    text = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t)).lower(params, x, t).as_text()
    assert "onednn_conv_forward" in custom_calls(text)


def abstract_params(model, image_size: int, channels: int = 3):
    y = jnp.zeros((1,), jnp.int32) if model.num_classes else None
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, image_size, image_size, channels)),
                                             jnp.zeros((1,), jnp.int32), y)["params"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("get_config", [cifar10.get_config, ddpm256.get_config], ids=["cifar10", "256x256"])
def test_unet_forward(get_config, dtype):
    c = get_config()
    c.model.dtype = dtype
    model, size = builders.make_model(c), c.data.image_size
    x, t = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32)
    check_exports(jax.jit(lambda p, x, t: model.apply({"params": p}, x, t)), abstract_params(model, size),
                  x, t)


@pytest.mark.parametrize("sampler, spacing", [("ddpm", "quad"), ("ddim", "quad"), ("dpm_solver++", "logSNR")])
def test_sampling_loops(sampler, spacing):
    """The sampler of sample.py and of the training run's grids, as ``Generator`` compiles it."""
    c = cifar10.get_config()
    c.sample.update(sampler=sampler, steps=10, spacing=spacing)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    model, sched = builders.make_model(c), builders.make_schedule(c)
    generate = sample_lib.Generator(c, model, sched, mesh).compiled(4)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    check_exports(generate, abstract_params(model, 32), key, jax.ShapeDtypeStruct((), jnp.int32), None)


def test_guided_sampling():
    """configs/cifar10_cond.py's class-conditional network, sampled with guidance (two passes batched)
    and DPM-Solver++'s dynamic thresholding."""
    c = cifar10_cond.get_config()
    c.sample.update(sampler="dpm_solver++", steps=10, spacing="logSNR", threshold=0.995, guidance=2.0)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    model, sched = builders.make_model(c), builders.make_schedule(c)
    generate = sample_lib.Generator(c, model, sched, mesh).compiled(4)
    key, index = jax.ShapeDtypeStruct((2,), jnp.uint32), jax.ShapeDtypeStruct((), jnp.int32)
    check_exports(generate, abstract_params(model, 32), key, index, jax.ShapeDtypeStruct((4,), jnp.int32))


def test_fid_inception_features_at_float32_precision_on_every_backend():
    params = jax.eval_shape(inception.random_params)
    extractor = inception.Extractor(params, batch_size=8)
    images = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.uint8)
    for platform, text in check_exports(extractor.apply, {"params": params}, images).items():
        found = precisions(text)  # 94 convolutions, the logits' dot and the resize's products
        assert set(found) == {"HIGHEST"} and len(found) >= 95, (platform, len(found), set(found))


def test_nll_bound_at_float32_precision_on_every_backend():
    c = cifar10.get_config()
    evaluator = likelihood.Bound(builders.apply_fn(builders.make_model(c, evaluation=True)),
                                 builders.make_schedule(c), batch_size=4, **builders.output_types(c))
    params = abstract_params(builders.make_model(c), 32)
    texts = check_exports(evaluator.bound, params, jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.uint8),
                          jax.ShapeDtypeStruct((2,), jnp.uint32))
    assert all(set(precisions(text)) == {"HIGHEST"} for text in texts.values())


@pytest.mark.parametrize("setting, expected", [("default", "DEFAULT"), ("highest", "HIGHEST")])
def test_the_training_networks_precision_is_the_configs(setting, expected):
    c = cifar10.get_config()
    c.model.matmul_precision = setting
    model = builders.make_model(c)
    x, t = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32)
    forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
    texts = check_exports(forward, abstract_params(model, 32), x, t)
    assert set(precisions(texts["tpu"])) == {expected}


@pytest.mark.parametrize("config, batch_leaves", [("cifar10", 1), ("cifar10_cond", 2)])
@pytest.mark.integration
def test_train_step_over_eight_devices_keeps_its_shardings_and_donation(config, batch_leaves):
    """The CIFAR-10 train step of ``Trainer`` on a Mesh('data') of 8 CPU devices (a subprocess); of the
    class-conditional network, the labels sharded as the images."""
    result = subprocess.run(scripts.command("tests/export_train_step.py", config),
                            env=scripts.environment(8), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = json.loads(result.stdout.splitlines()[-1])
    for platform in PLATFORMS:
        e = exported[platform]
        assert e["nr_devices"] == 8
        state, batch, rng = (e["in_specs"][:-1 - batch_leaves], e["in_specs"][-1 - batch_leaves:-1],
                             e["in_specs"][-1])
        assert batch == ["P('data',)"] * batch_leaves and rng == "P()", (batch, rng)
        # the state and the metrics replicated
        assert set(state) == {"P()"} and set(e["out_specs"]) == {"P()"}
        assert e["donated"] == len(state)  # the state, donated; not the batch nor the rng
        assert not set(e["custom_calls"]) - PORTABLE_TARGETS, e["custom_calls"]
