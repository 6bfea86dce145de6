"""Sample a trained or converted model: python sample.py --workdir=DIR --out=OUT [options].

    python sample.py --workdir=out/quickstart --out=out/quickstart/ddim25 --num_samples=1000
    python sample.py --checkpoint=ddpm_cifar10 --out=OUT --sampler=ddpm --steps=1000 \\
        --num_samples=50000 --fid   # DDPM Table 1 (see REPRODUCING.md)

The model: --workdir (a training run, its latest checkpoint or --step; --params=ema|raw) or
--checkpoint (a training checkpoint WORKDIR/checkpoints/STEP, or convert.py's output). The
sampler: the config's ``sample`` settings (the run's, or --config's for converted
checkpoints), overridden by --sampler, --steps, --spacing, --eta, --order, --clip_x0, --threshold and
Karras et al.'s --rho, --S_churn, --S_tmin, --S_tmax, --S_noise (samplers euler, heun, heun_churn:
--steps=18 is their 35 network evaluations). The progress line and OUT/sampling.json give the
network evaluations of one sample.

A class-conditional model (model.num_classes > 0) samples --class_label=K (class K) or
--class_label=all (the classes in order, --num_samples / K of each; samples.png then has one row
per class), with classifier-free guidance of scale --guidance=W (default: the config's
sample.guidance; 0: the conditional model alone), in mode samples:

    python sample.py --workdir=out/quickstart_cond --out=OUT --class_label=all --guidance=1 \\
        --num_samples=1000

Modes (--mode):
  samples               --num_samples images in shards of --batch_size under OUT/shards/,
                        resumed after the last complete shard if interrupted; then
                        OUT/samples.npz (arr_0: uint8 NHWC) and OUT/samples.png; --fid adds
                        FID and IS against the training split's statistics.
  progressive           DDPM Fig. 6: x_t and the x_0 prediction along the chain (--num_samples rows).
  interpolate           DDIM section 5.3: decoding slerps between pairs of x_T (DDIM, eta 0).
  interpolate_diffused  DDPM section 4.4: pairs of test images diffused to --t, mixed, decoded.
  reconstruct           DDIM section 5.4: test images -> x_T by DDIM inversion -> back.
Sampling is sharded over all devices, and over processes with --distributed (as train.py):
each process computes and writes its share of every batch (OUT/shards/I-P-of-N.npz), and
process 0 assembles samples.npz after a barrier. OUT may be local or gs://; it must be shared
by all processes, which is checked before sampling.
"""

from diffusion_jax import interrupts

if __name__ == "__main__":
    interrupts.stop_at_once()  # a signal while JAX and the modules load: one line, exit by it

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax import launch, sampler_registry, xla_flags
from diffusion_jax.errors import ConfigError

MODES = ("samples", "progressive", "interpolate", "interpolate_diffused", "reconstruct")
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file for the diffusion and sampler settings "
                                "(default: the run's own; for converted checkpoints configs/cifar10.py's)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "a training workdir")
flags.DEFINE_string("checkpoint", None,
                    "a checkpoint directory: WORKDIR/checkpoints/STEP or convert.py's --out")
flags.DEFINE_integer("step", None, "the workdir's checkpoint to use (default: the latest)")
flags.DEFINE_enum("params", "ema", ["ema", "raw"], "EMA or raw parameters of a training checkpoint")
flags.DEFINE_string("out", None, "output directory (local, or gs:// shared by every host); held by one "
                    "sample.py at a time (OUT/run.lock)")
flags.DEFINE_bool("take_over_lock", False, "take over --out's lock of a sample.py on another host that "
                  "stopped refreshing it 30 minutes ago (a lost host); a lock of this host's live process is "
                  "never taken")
flags.DEFINE_enum("mode", "samples", MODES, "what to produce")
flags.DEFINE_enum("sampler", None, list(sampler_registry.SAMPLERS), "override config.sample.sampler")
flags.DEFINE_integer("steps", None, "override config.sample.steps", lower_bound=1)
flags.DEFINE_string("spacing", None, f"override config.sample.spacing ({sampler_registry.spacing_help()})")
flags.DEFINE_float("eta", None, f"override config.sample.eta ({sampler_registry.option_help('eta')})")
flags.DEFINE_integer("order", None, f"override config.sample.order ({sampler_registry.option_help('order')})")
flags.DEFINE_bool("clip_x0", None, "override config.sample.clip_x0")
flags.DEFINE_float("threshold", None,
                   f"override config.sample.threshold ({sampler_registry.option_help('threshold')})")
for _name in ("rho", "S_churn", "S_tmin", "S_tmax", "S_noise"):  # Karras et al.'s samplers
    flags.DEFINE_float(_name, None, f"override config.sample.{_name} ({sampler_registry.option_help(_name)})")
flags.DEFINE_string("class_label", None, "a class-conditional model's class to sample, 0..K-1, or 'all'")
flags.DEFINE_float("guidance", None, "override config.sample.guidance, the classifier-free guidance scale w "
                   "of a class-conditional model (0: none)", lower_bound=0)
flags.DEFINE_integer("num_samples", 64, "images (mode samples) or rows (other modes)", lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "images per batch over all devices; a shard of mode samples",
                     lower_bound=1)
flags.DEFINE_integer("seed", 0, "random seed; batch i uses fold_in(seed, i), so the samples of a seed "
                     "depend on --batch_size too")
flags.DEFINE_integer("num_interp", 11, "interpolation points per row (interpolation modes)", lower_bound=2)
flags.DEFINE_integer("t", None, "timestep to diffuse to (mode interpolate_diffused; default T / 2, 500 in "
                     "DDPM Fig. 8)", lower_bound=0)
flags.DEFINE_bool("fid", False, "mode samples: FID and IS of the samples (see evaluate.py for the options)")
flags.DEFINE_string("reference_stats", None, "with --fid: statistics .npz of the reference images (default: "
                    "computed once from config.data.train_split and cached)")
flags.DEFINE_string("inception_weights", None,
                    "with --fid: pytorch-fid's Inception weights (see evaluate.py)")
launch.define_distributed_flags()
flags.adopt_module_key_flags(launch)  # the multi-process flags in --help, not only --helpfull
flags.mark_flags_as_required(["out"])

# flags that apply only to some modes or samplers
MODE_FLAGS = {"num_interp": ("interpolate", "interpolate_diffused"), "t": ("interpolate_diffused",),
              "fid": ("samples",), "reference_stats": ("samples",), "inception_weights": ("samples",),
              "class_label": ("samples",), "guidance": ("samples",)}


def check_mode_flags():
    """ConfigError for a flag that does not apply to the mode (before anything loads)."""
    for name, modes in MODE_FLAGS.items():
        if FLAGS[name].present and FLAGS.mode not in modes:
            raise ConfigError(f"--{name} applies to --mode={' or '.join(modes)}, not --mode={FLAGS.mode}")
    if (FLAGS.reference_stats or FLAGS.inception_weights) and not FLAGS.fid:
        raise ConfigError("--reference_stats and --inception_weights apply with --fid")


def check_sampler_flags(config):
    """ConfigError for a sampler setting that does not apply to the mode."""
    s = config.sample
    if FLAGS.mode in ("interpolate", "reconstruct") and (s.sampler != "ddim" or s.eta != 0):
        raise ConfigError(f"--mode={FLAGS.mode} needs the deterministic DDIM sampler (--sampler=ddim, "
                          f"eta 0), not sampler {s.sampler!r} with eta {s.eta}")
    if FLAGS.mode == "interpolate_diffused":
        for name in ("sampler", "steps", "spacing", *sampler_registry.OPTIONS):
            if FLAGS[name].present:
                raise ConfigError(f"--{name} does not apply to --mode=interpolate_diffused, which decodes "
                                  "with the full DDPM chain from --t (DDPM section 4.4)")
        if FLAGS.t is not None and FLAGS.t >= config.diffusion.num_timesteps:
            raise ConfigError(f"--t={FLAGS.t} must be below the {config.diffusion.num_timesteps} timesteps")


def check_class_flags(config):
    """ConfigError for class flags that do not fit the model: labels of an unconditional model, or none
    for a conditional one (which samples only in mode samples)."""
    num_classes = config.model.num_classes
    if not num_classes:
        for name in ("class_label", "guidance"):
            if FLAGS[name].present:
                raise ConfigError(f"--{name} needs a class-conditional model; this one is unconditional "
                                  "(model.num_classes = 0)")
        return
    if FLAGS.mode != "samples":
        raise ConfigError(f"this model is class-conditional ({num_classes} classes): it samples in "
                          f"--mode=samples with --class_label, not in --mode={FLAGS.mode}")
    if FLAGS.class_label is None:
        raise ConfigError(f"this model is class-conditional ({num_classes} classes): give "
                          f"--class_label=K (0..{num_classes - 1}) or --class_label=all")
    from diffusion_jax import sample_lib

    if FLAGS.class_label == "all":
        sample_lib.in_order_labels(num_classes, FLAGS.num_samples)  # a ConfigError unless K divides them
    else:
        if not FLAGS.class_label.lstrip("-").isdigit():
            raise ConfigError(f"--class_label={FLAGS.class_label} is neither a class number nor 'all'")
        sample_lib.check_label(int(FLAGS.class_label), num_classes)


def class_labels(config):
    """The labels of the samples, as ``sample_lib.Generator`` takes them (None: unconditional)."""
    import numpy as np

    from diffusion_jax import sample_lib

    num_classes = config.model.num_classes
    if not num_classes:
        return None
    if FLAGS.class_label == "all":
        return sample_lib.in_order_labels(num_classes, FLAGS.num_samples)
    label = int(FLAGS.class_label)
    return lambda j: np.full(len(j), label, np.int32)


def sampler_config(config):
    for name in ("sampler", "steps", "spacing", "clip_x0", "guidance", *sampler_registry.OPTIONS):
        if FLAGS[name].value is not None:
            config.sample[name] = FLAGS[name].value
    if FLAGS.sampler is not None:  # the sampler's own steps and spacing unless told otherwise
        sampler = sampler_registry.get(FLAGS.sampler)
        if sampler.all_steps_by_default and FLAGS.steps is None:
            config.sample.steps = config.diffusion.num_timesteps
        if sampler.default_spacing is not None and FLAGS.spacing is None:
            config.sample.spacing = sampler.default_spacing
    return config


DERIVED = ("network_evaluations",)  # recorded in sampling.json, but a function of the settings compared


def check_run_settings(out, settings: dict) -> None:
    """Record the settings of OUT's samples (from process 0); refuse to add to samples of other settings."""
    import jax

    from diffusion_jax import storage

    path = out / "sampling.json"
    if path.exists():
        saved = storage.read_json(path)
        differing = [f"{k} ({saved.get(k)!r} there, {settings[k]!r} now)"
                     for k in settings if k not in DERIVED and saved.get(k) != settings[k]]
        if differing:
            raise ConfigError(f"{out} holds samples made with other settings: {', '.join(differing)}; "
                              "use a new --out to sample with these")
    elif jax.process_index() == 0:
        storage.write_json(path, settings)


def main(argv):
    del argv
    xla_flags.set_defaults()  # before launch.start starts JAX's backends
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    launch.start(FLAGS)
    import jax

    with launch.one_line_errors():
        run(jax)


def samples(jax, loaded, out, lock):
    """Mode samples: each process's shards, then samples.npz (with ``labels`` for a class-conditional
    model) and a grid of the first 64 (of --class_label=all: a row per class) from process 0; FID and
    IS with --fid."""
    import numpy as np

    from diffusion_jax import builders, image_io, progress, run_lock, sample_lib
    from diffusion_jax.mesh import data_mesh

    config, params = loaded.config, loaded.params
    settings = dict(model=loaded.source, seed=FLAGS.seed, batch_size=FLAGS.batch_size,
                    sample=sampler_registry.settings(config.sample))
    if config.model.num_classes:  # what the samples are of, for a resume to match
        settings.update(class_label=FLAGS.class_label, guidance=config.sample.guidance,
                        num_samples=FLAGS.num_samples)
    sched = builders.make_schedule(config)
    # what one sample costs (derived from the settings above, so not compared on resume)
    settings["network_evaluations"] = sampler_registry.evaluations(config.sample, sched)
    evaluator = None
    if FLAGS.fid:  # the Inception weights before anything is written: a missing file stops the run at once
        from diffusion_jax.evaluation import report

        evaluator = report.InceptionScorer(config.data, reference_stats=FLAGS.reference_stats,
                                           inception_weights=FLAGS.inception_weights)
    check_run_settings(out, settings)
    mesh = data_mesh()
    generate = sample_lib.Generator(config, builders.make_model(config), sched, mesh,
                                    labels=class_labels(config))
    guided = config.model.num_classes and config.sample.guidance  # both passes in one doubled batch
    shown = progress.Progress(f"samples, {settings['network_evaluations']} network evaluations each"
                              + (" (of a doubled batch: guided)" if guided else ""))

    def after_batch(done: int, total: int) -> None:
        if lock is not None:
            lock.refresh(every=run_lock.REFRESH_SECONDS)  # still this run's --out
        shown(done, total)

    images = sample_lib.sample_to_file(generate, params, jax.random.PRNGKey(FLAGS.seed), out,
                                       FLAGS.num_samples, FLAGS.batch_size, progress=after_batch)
    if jax.process_index() == 0:
        if FLAGS.class_label == "all":  # one row per class: its first samples
            per_class = FLAGS.num_samples // config.model.num_classes
            columns = min(per_class, 10)
            rows = [images[k * per_class:k * per_class + columns] for k in range(config.model.num_classes)]
            image_io.save_grid(np.concatenate(rows), out / "samples.png", columns=columns, scale=2)
        else:
            image_io.save_grid(images[:64], out / "samples.png", scale=2)
        progress.console(f"wrote {len(images)} samples to {out / 'samples.npz'} and samples.png")
    if evaluator is not None:
        values = evaluator.fid_and_is(sample_lib.on_every_process(images, out))
        report.print_fid(values)
        report.write_json(out / "metrics.json", values)


def run(jax):
    from diffusion_jax import checkpoints, figures, run_lock, storage
    from diffusion_jax import config as config_lib
    from diffusion_jax.progress import console

    check_mode_flags()
    loaded = checkpoints.load(workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint, step=FLAGS.step,
                              which=FLAGS.params, config=launch.config(FLAGS))
    config = sampler_config(loaded.config)
    check_class_flags(config)  # before validate: its message names the flags, not the config keys
    config_lib.validate(config, jax.device_count(), jax.process_count())
    check_sampler_flags(config)
    if FLAGS.batch_size % jax.device_count():
        raise ConfigError(f"--batch_size={FLAGS.batch_size} must be a multiple of the {jax.device_count()} "
                          "devices")
    out = storage.path(FLAGS.out, what="--out")
    storage.check_reachable(out, what="--out")
    storage.check_writable(out, what="--out")
    storage.check_shared(out)
    lock = run_lock.take(out, take_over=FLAGS.take_over_lock, flag="--out")  # a second run stops here
    try:
        if FLAGS.mode == "samples":
            return samples(jax, loaded, out, lock)
        m, rng = figures.Model(config, loaded.params), jax.random.PRNGKey(FLAGS.seed)
        if FLAGS.mode == "progressive":
            written = figures.progressive(m, rng, out, FLAGS.num_samples)
        elif FLAGS.mode == "interpolate":
            written = figures.interpolate(m, rng, out, FLAGS.num_samples, FLAGS.num_interp)
        elif FLAGS.mode == "interpolate_diffused":
            t = config.diffusion.num_timesteps // 2 if FLAGS.t is None else FLAGS.t
            written = figures.interpolate_diffused(m, rng, out, FLAGS.num_samples, FLAGS.num_interp, t)
        else:
            written = figures.reconstruct(m, out, FLAGS.num_samples)
        console("wrote " + ", ".join(written))
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    app.run(main, flags_parser=launch.parse_flags)
