"""bf16 training: network compute in bfloat16, float32 master params, Adam and EMA."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest
from scripts import ROOT

from diffusion_jax import input_pipeline, losses, train_lib

pytestmark = pytest.mark.slow


def tiny_config(dtype):
    spec = importlib.util.spec_from_file_location("tiny_config",
                                                  os.path.join(ROOT, "tests", "tiny_config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.dtype = dtype
    config.train.batch_size = 64
    return config


def test_bf16_training_reaches_the_float32_loss_after_50_steps():
    """Both runs see the same batches, timesteps and noise; the loss after 50 steps is L_simple on 256
    held-out digits (fixed t and noise), each run with its own compute dtype."""
    train_images = input_pipeline.digits("train")
    held_out = jnp.asarray(input_pipeline.digits("test")[:256], jnp.float32) / 127.5 - 1.0
    t = jax.random.randint(jax.random.PRNGKey(1), (256,), 0, 100)
    noise = jax.random.normal(jax.random.PRNGKey(2), held_out.shape)
    results = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_config(dtype)
        trainer = train_lib.Trainer(config)
        state = trainer.init(jax.random.PRNGKey(0))

        @jax.jit
        def held_out_loss(params, trainer=trainer):  # this iteration's trainer
            def model_fn(x, t):
                return trainer.model.apply({"params": params}, x, t)

            return losses.losses_at(model_fn, trainer.sched, held_out, t, noise, loss_type="mse",
                                    mean_type="eps", var_type="fixed_large").mean()

        before = float(held_out_loss(state.params))
        for step in range(50):
            batch = input_pipeline.make_batch(train_images, step, batch_size=64, seed=0,
                                              randflip=True)
            state, _ = trainer.step(state, trainer.global_batch(batch), jax.random.PRNGKey(3))
        assert all(p.dtype == jnp.float32
                   for p in jax.tree_util.tree_leaves((state.params, state.ema_params)))
        assert not any(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(state.opt_state))
        results[dtype] = (before, float(held_out_loss(state.params)))
    print(f"\nheld-out L_simple before -> after 50 steps: float32 {results['float32']}, "
          f"bfloat16 {results['bfloat16']}")
    f32, bf16 = results["float32"][1], results["bfloat16"][1]
    assert f32 < 0.5 * results["float32"][0]  # 50 steps have learned something
    assert abs(bf16 - f32) < 0.05 * f32
