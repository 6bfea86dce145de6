"""The experiment schema: every key a config may set, with its default, and its validation.

Files in ``configs/`` start from :func:`base` (the DDPM CIFAR-10 run) and override. As every
key exists here with a fixed type, ``--config.a.b=value`` with an unknown key or a value of
the wrong type is refused by ml_collections when the flags are parsed; :func:`validate`
checks values against each other before anything compiles.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from diffusion_jax import input_pipeline, losses, sampler_registry, schedule, timestep_sampler
from diffusion_jax.errors import ConfigError


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # name: digits, cifar10, celeb_a_hq, lsun_church, lsun_bedroom, lsun_cat, tfds:NAME[/CONFIG][:SPLIT],
    # folder:PATH or prepared:DIR (see input_pipeline); images are converted to `channels`. The held-out
    # images (eval.num_samples, eval.nll_images) are eval_split of eval_name (default: name); a folder,
    # or a tfds name with its :SPLIT, is one set of images, held out only with an eval_name of its own
    c.data = dict(name="cifar10", train_split="train", eval_split="test", image_size=32, channels=3,
                  randflip=True, data_dir=config_dict.placeholder(str),
                  eval_name=config_dict.placeholder(str))
    # dtype: the network's compute dtype, 'float32' or 'bfloat16' (params, optimizer and EMA stay
    # float32; no loss scaling is needed, see models/unet.py). num_classes K > 0: a class-conditional
    # network (labels 0..K-1 of the data's classes, K for "no class"), 0: unconditional.
    # matmul_precision: of the network's float32 convolutions and products in training and sampling,
    # 'default' (JAX's setting: one bfloat16 pass on TPUs, TF32 on recent NVIDIA GPUs), 'high' or
    # 'highest' (float32); the NLL bound and the FID Inception always run at 'highest'
    c.model = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
                   resamp_with_conv=True, num_classes=0, dtype="float32", matmul_precision="default")
    # loss_type: 'mse' (L_simple), 'kl' (L_{t-1}), 'rescaled_kl' (improved DDPM's L_vlb = T L_{t-1}) or
    # 'hybrid' (L_simple + hybrid_lambda L_vlb), see losses.py. timestep_sampler: 'uniform' (DDPM) or
    # 'loss-second-moment' (improved DDPM's importance sampling of t, for the bound's losses).
    # cond_drop_prob: with model.num_classes, the probability that a training example's label is
    # replaced by "no class" (classifier-free guidance's p_uncond; 0.1 in its paper's best runs)
    c.diffusion = dict(schedule="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02, mean_type="eps",
                       var_type="fixed_large", loss_type="mse", hybrid_lambda=1e-3,
                       timestep_sampler="uniform", cond_drop_prob=0.0)
    # grad_clip: the global gradient norm is clipped to it (0: not clipped)
    c.optim = dict(lr=2e-4, warmup_steps=5000, grad_clip=1.0, beta1=0.9, beta2=0.999, eps=1e-8,
                   ema_decay=0.9999, ema_warmup=False)
    # batch_size is global (all devices of all processes); a checkpoint every checkpoint_every
    # steps, the last keep_checkpoints kept, and every keep_period-th kept for good (0: none);
    # profile_steps > 0: a jax.profiler trace of that many steps after the first, in WORKDIR/tensorboard
    c.train = dict(batch_size=128, num_steps=800_000, log_every=100, checkpoint_every=10_000,
                   keep_checkpoints=3, keep_period=0, profile_steps=0)
    # the sampler of grids during training and the default of sample.py, one of sampler_registry's:
    # 'ddpm' (ancestral), 'ddim' (eta 0: deterministic, 1: DDPM-like), 'dpm_solver++' (multistep of
    # `order` 2 or 3) or Karras et al.'s (below), on `steps` timesteps of `spacing` (each sampler's own,
    # see the registry); x_0 predictions clipped to [-1, 1] as in the DDPM code; dpm_solver++'s
    # `threshold`: dynamic thresholding at that percentile of |x_0| (0: off; 0.995 in DPM-Solver++, for
    # large guidance).
    # `guidance`: classifier-free guidance scale w of a class-conditional model (guidance.py; 0: none).
    # Karras et al. 2022's 'euler', 'heun' (Algorithm 1) and 'heun_churn' (Algorithm 2) take `steps` N >= 2
    # levels of their eq. 5 with `rho`; heun_churn adds noise by S_churn where S_tmin <= sigma <= S_tmax,
    # scaled by S_noise (their names and defaults; S_churn = 0: heun).
    # Grids of `num` EMA samples with fixed noise every `every` steps (0: never), of a
    # class-conditional model one class per column.
    c.sample = dict(every=10_000, num=64, sampler="ddim", steps=100, spacing="quad", eta=0.0, clip_x0=True,
                    order=2, threshold=0.0, guidance=0.0, rho=7.0, S_churn=0.0, S_tmin=0.0,
                    S_tmax=float("inf"), S_noise=1.0)
    # num_samples: at the end of training, the sliced Wasserstein distance in pixel space between
    # that many samples and held-out images (0: skip). Every `every` steps (0: never), FID of
    # fid_samples EMA samples against the statistics of data.train_split (cached at
    # reference_stats, default beside the Inception weights; needs those weights, see
    # diffusion_jax/evaluation/inception.py) and the NLL bound on nll_images images of
    # data.eval_split (0: skip either), both in batches of batch_size over all devices.
    c.eval = dict(num_samples=0, every=0, fid_samples=0, nll_images=0, batch_size=256,
                  reference_stats=config_dict.placeholder(str),
                  inception_weights=config_dict.placeholder(str))
    return c


def flatten(config, prefix: str = "") -> dict:
    """``{"section.key": value}`` of a config or of its saved dict; tuples as lists, as JSON keeps them."""
    flat = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, (list, tuple)) else value
    return flat


def validate(config, num_devices: int, num_processes: int) -> None:
    """Raise a ConfigError naming the first bad value and what is allowed."""

    def need(ok, key, value, allowed):
        if not ok:
            raise ConfigError(f"config.{key} = {value!r} is not allowed: {allowed}")

    for key in ("ch_mult", "attn_resolutions"):  # a command line can give them any text
        value = config.model[key]
        need(isinstance(value, (tuple, list)) and all(isinstance(k, int) for k in value), f"model.{key}",
             value, "a tuple of integers, such as --config.model.ch_mult='(1, 2, 2, 2)'")
    d, m, diff, t, o, s = (config.data, config.model, config.diffusion, config.train, config.optim,
                           config.sample)
    for key in ("name", "eval_name"):
        try:  # the source's kind; whether it holds images is checked before training
            if d[key] is not None:
                input_pipeline.parse(d[key])
        except ConfigError:
            need(False, f"data.{key}", d[key], input_pipeline.ALLOWED)
    need(d.channels in (1, 3), "data.channels", d.channels, "1 (grey) or 3 (colour)")
    levels = len(m.ch_mult)
    need(levels >= 1 and all(k >= 1 for k in m.ch_mult), "model.ch_mult", m.ch_mult, "positive integers")
    need(d.image_size > 0 and d.image_size % 2 ** (levels - 1) == 0, "data.image_size", d.image_size,
         f"a multiple of 2^(len(model.ch_mult) - 1) = {2 ** (levels - 1)}")
    need(m.ch > 0 and all(m.ch * k % 32 == 0 for k in m.ch_mult), "model.ch", m.ch,
         "channel counts ch * ch_mult[i] must be multiples of 32 (GroupNorm's 32 groups)")
    need(m.dtype in ("float32", "bfloat16"), "model.dtype", m.dtype, "'float32' or 'bfloat16'")
    need(m.matmul_precision in ("default", "high", "highest"), "model.matmul_precision", m.matmul_precision,
         "'default', 'high' or 'highest'")
    need(0 <= m.dropout < 1, "model.dropout", m.dropout, "in [0, 1)")
    need(m.num_classes >= 0, "model.num_classes", m.num_classes, ">= 0 (0: unconditional)")
    need(diff.schedule in schedule.SCHEDULES, "diffusion.schedule", diff.schedule,
         ", ".join(schedule.SCHEDULES))
    need(diff.num_timesteps >= 1, "diffusion.num_timesteps", diff.num_timesteps, ">= 1")
    need(diff.mean_type in schedule.MEAN_TYPES, "diffusion.mean_type", diff.mean_type,
         ", ".join(schedule.MEAN_TYPES))
    need(diff.var_type in schedule.VAR_TYPES, "diffusion.var_type", diff.var_type,
         ", ".join(schedule.VAR_TYPES))
    losses.check_loss_type(diff.loss_type, diff.var_type)
    need(0 <= diff.cond_drop_prob < 1, "diffusion.cond_drop_prob", diff.cond_drop_prob, "in [0, 1)")
    need(m.num_classes or diff.cond_drop_prob == 0, "diffusion.cond_drop_prob", diff.cond_drop_prob,
         "0 for an unconditional network (model.num_classes = 0)")
    need(diff.timestep_sampler in timestep_sampler.SAMPLERS, "diffusion.timestep_sampler",
         diff.timestep_sampler, ", ".join(timestep_sampler.SAMPLERS))
    schedule.get_beta_schedule(diff.schedule, diff.num_timesteps, diff.beta_start, diff.beta_end)
    need(t.batch_size > 0 and t.batch_size % num_devices == 0, "train.batch_size", t.batch_size,
         f"a positive multiple of the {num_devices} devices")
    need(t.batch_size % num_processes == 0, "train.batch_size", t.batch_size,
         f"a multiple of the {num_processes} processes")
    need(t.num_steps >= 1, "train.num_steps", t.num_steps, ">= 1")
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
        need(t[key] >= 1, f"train.{key}", t[key], ">= 1")
    need(t.keep_period >= 0, "train.keep_period", t.keep_period, ">= 0 (0: keep none for good)")
    need(o.lr > 0, "optim.lr", o.lr, "> 0")
    need(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0")
    need(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, ">= 0 (0: no clipping)")
    need(0 <= o.ema_decay < 1, "optim.ema_decay", o.ema_decay, "in [0, 1)")
    registered = sampler_registry.SAMPLERS
    need(s.sampler in registered, "sample.sampler", s.sampler, ", ".join(registered))
    sampler = registered[s.sampler]
    need(s.spacing in sampler.spacings, "sample.spacing", s.spacing,
         f"one of {', '.join(sampler.spacings)} with sampler {s.sampler!r}")
    for key, option in sampler.options.items():
        need(option.valid(s[key]), f"sample.{key}", s[key], option.allowed)
    for check in sampler.checks:
        need(check.valid({key: s[key] for key in sampler.options}), f"sample.{check.key}", s[check.key],
             check.allowed)
    for key, idle in sampler_registry.OPTIONS.items():
        need(key in sampler.options or idle is None or s[key] == idle, f"sample.{key}", s[key],
             f"{idle} with sampler {s.sampler!r} ({key} applies to {sampler_registry.option_help(key)})")
    fewest = sampler.min_steps
    need(fewest <= s.steps <= diff.num_timesteps, "sample.steps", s.steps,
         f"in [{fewest}, {diff.num_timesteps}]" + (f" with sampler {s.sampler!r}" if fewest > 1 else ""))
    need(s.every >= 0 and s.num >= 1, "sample", dict(s), "every >= 0 and num >= 1")
    need(s.guidance >= 0, "sample.guidance", s.guidance, ">= 0 (0: the conditional model alone)")
    need(m.num_classes or s.guidance == 0, "sample.guidance", s.guidance,
         "0 for an unconditional network (guidance needs model.num_classes > 0)")
    e = config.eval
    for key in ("num_samples", "every", "fid_samples", "nll_images"):
        need(e[key] >= 0, f"eval.{key}", e[key], ">= 0")
    need(e.batch_size >= 1 and e.batch_size % num_devices == 0, "eval.batch_size", e.batch_size,
         f"a positive multiple of the {num_devices} devices")
    need(e.every > 0 or not (e.fid_samples or e.nll_images), "eval.every", e.every,
         "> 0 when eval.fid_samples or eval.nll_images is set (how often to evaluate)")
    need(e.every == 0 or e.fid_samples or e.nll_images, "eval.every", e.every,
         "0 unless eval.fid_samples or eval.nll_images says what to evaluate")
