"""What a config builds: the U-Net, the diffusion schedule, the optimizer and the initial train state.

Everything that turns a config (``config.py``) into objects lives here, so that training,
sampling, evaluation and the checkpoint readers build the same network and schedule from the
same settings.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax import schedule, timestep_sampler
from diffusion_jax.models import conv
from diffusion_jax.models.unet import UNet


class TrainState(NamedTuple):
    step: jnp.ndarray  # int32 []
    params: Any
    ema_params: Any
    opt_state: Any
    bad_step: jnp.ndarray  # int32 [], the first step with a non-finite loss or gradient, -1 if none
    # timestep_sampler.LossHistory with diffusion.timestep_sampler 'loss-second-moment'
    loss_history: Any = None


# above this share of the random initial parameters in the EMA, samples of the EMA are announced as such
EMA_NOTICE_SHARE = 0.05


def ema_decay(optim, step, xp=jnp):
    """The EMA's decay at update ``step`` (from 0): ``optim.ema_decay``, or with ``optim.ema_warmup``
    min(ema_decay, (1 + n) / (10 + n)), tf.train.ExponentialMovingAverage's num_updates rule.
    ``xp``: the array module of ``step`` (jax.numpy in the train step, NumPy on the host)."""
    if optim.ema_warmup:
        return xp.minimum(optim.ema_decay, (1.0 + step) / (10.0 + step))
    return optim.ema_decay  # a Python float: 1 - decay is then computed in float64, as it always was


def ema_initial_share(optim, steps: int) -> float:
    """How much of the initial (random) parameters the EMA holds after ``steps`` updates: the product
    of the decays, as ema <- decay * ema + (1 - decay) * params starts from the initial params."""
    n = np.arange(steps, dtype=np.float64)
    return float(np.exp(np.sum(np.log(np.broadcast_to(ema_decay(optim, n, xp=np), n.shape)))))


def ema_notice(optim, steps: int) -> str | None:
    """What to tell the user of samples of the EMA parameters after ``steps`` updates, while they still
    hold more than ``EMA_NOTICE_SHARE`` of the random initial ones (None after that)."""
    share = ema_initial_share(optim, steps)
    if share <= EMA_NOTICE_SHARE:
        return None
    rule = "with optim.ema_warmup" if optim.ema_warmup else "without optim.ema_warmup"
    return (f"note: after {steps} steps the EMA parameters (optim.ema_decay = {optim.ema_decay}, {rule}) "
            f"still hold {share:.0%} of the random initial ones, so their samples may look like noise; "
            "sample.py --params=raw samples the trained parameters, and optim.ema_warmup=True or a lower "
            "optim.ema_decay lets the EMA follow a short run")


def out_channels(config) -> int:
    """The network's output channels: C, or 2C when it also outputs the variance (improved DDPM)."""
    return schedule.output_channels(config.data.channels, config.diffusion.var_type)


def make_model(config, *, evaluation: bool = False) -> UNet:
    """The U-Net of ``config.model`` at its ``matmul_precision``; for ``evaluation`` (the NLL bound) at
    ``conv.EVALUATION_PRECISION``."""
    m = config.model
    precision = None if m.matmul_precision == "default" else m.matmul_precision
    precision = conv.EVALUATION_PRECISION if evaluation else precision
    return UNet(ch=m.ch, out_ch=out_channels(config), ch_mult=tuple(m.ch_mult),
                num_res_blocks=m.num_res_blocks, attn_resolutions=tuple(m.attn_resolutions),
                dropout=m.dropout, resamp_with_conv=m.resamp_with_conv, num_classes=m.num_classes,
                dtype=jnp.dtype(m.dtype), precision=precision)


def make_schedule(config) -> schedule.Schedule:
    """The schedule of ``config.diffusion`` (``schedule.make_schedule`` of its name, T and betas)."""
    d = config.diffusion
    return schedule.make_schedule(d.schedule, d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end)


def learning_rate(config):
    """Linear warmup from 0 over ``warmup_steps``, then constant (the DDPM code's schedule)."""
    o = config.optim
    return (optax.linear_schedule(0.0, o.lr, o.warmup_steps) if o.warmup_steps
            else optax.constant_schedule(o.lr))


def make_optimizer(config) -> optax.GradientTransformation:
    """Adam after clipping the global gradient norm at ``grad_clip``, as the DDPM code trains; with
    ``grad_clip`` 0, Adam alone, as improved DDPM's code trains (the optimizer state is the same
    pytree either way)."""
    o = config.optim
    clip = optax.clip_by_global_norm(o.grad_clip) if o.grad_clip else optax.identity()
    return optax.chain(clip, optax.adam(learning_rate(config), b1=o.beta1, b2=o.beta2, eps=o.eps))


def init_state(config, model: UNet, tx, rng) -> TrainState:
    """Step 0: the network's initial parameters (also the EMA's), Adam's zero moments, no loss history
    unless t is importance-sampled."""
    shape = (1, config.data.image_size, config.data.image_size, config.data.channels)
    y = jnp.zeros((1,), jnp.int32) if model.num_classes else None
    params = model.init(rng, jnp.zeros(shape), jnp.zeros((1,), jnp.int32), y)["params"]
    d = config.diffusion
    history = timestep_sampler.init_history(d.num_timesteps) if d.timestep_sampler != "uniform" else None
    return TrainState(jnp.zeros((), jnp.int32), params, params, tx.init(params), jnp.full((), -1, jnp.int32),
                      history)


def abstract_state(config, sharding) -> TrainState:
    """The shapes and dtypes of ``config``'s train state, placed by ``sharding`` (what a restore needs)."""
    shapes = jax.eval_shape(lambda rng: init_state(config, make_model(config), make_optimizer(config), rng),
                            jax.random.PRNGKey(0))
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def apply_fn(model: UNet):
    """The network as a function ``(params, x_t, t) -> output`` for inference (no dropout); a
    class-conditional network is given the "no class" label, so that its likelihood is p(x)."""
    if not model.num_classes:
        return lambda params, x_t, t: model.apply({"params": params}, x_t, t)
    return lambda params, x_t, t: model.apply({"params": params}, x_t, t,
                                              jnp.full(t.shape, model.null_label, jnp.int32))


def output_types(config) -> dict:
    """What the network's output means: ``mean_type`` and ``var_type`` (``schedule.MEAN_TYPES``,
    ``VAR_TYPES``)."""
    return dict(mean_type=config.diffusion.mean_type, var_type=config.diffusion.var_type)
