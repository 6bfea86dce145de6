"""Evaluate: FID and IS of a sample file, the NLL of a model, or the reference statistics of a dataset.

    python evaluate.py --mode=fid --samples=OUT/samples.npz [--dataset=cifar10 --split=train]
    python evaluate.py --mode=nll --workdir=DIR (or --checkpoint=PATH) --out=DIR [--num_images=N]
    python evaluate.py --mode=reference_stats --dataset=cifar10 --split=train
    python evaluate.py --mode=sliced_wasserstein --samples=OUT/samples.npz --dataset=digits --split=test
    python evaluate.py --mode=guidance_sweep --workdir=DIR --out=DIR --guidance_scales=0,0.3,1,2,4 \\
        [--num_samples=N]

Paths may be local or gs:// (any filesystem etils.epath opens). With --distributed (as
train.py) every process computes the Inception features or bounds of its share of the
images on its own devices and process 0 writes the results; the files must then be on
storage every process sees (gs:// or a shared filesystem), which is checked first.

FID and IS need pytorch-fid's Inception weights (a one-time download, see
diffusion_jax/evaluation/inception.py): --inception_weights=PATH, the environment variable
DIFFUSION_JAX_INCEPTION_WEIGHTS, or the file in ~/.cache/diffusion_jax/. The reference
statistics (all images of --split) are computed once and cached (--reference_stats, default
~/.cache/diffusion_jax/fid_stats/DATASET_SPLIT_SIZE.npz). Samples are an .npz whose arr_0
is uint8 NHWC, as sample.py writes and other FID tools read.

The sliced Wasserstein distance (pixel space) is the quickstart's figure, between the samples
and as many images of --dataset's --split (all of them, or --num_images); OUT/samples_swd.json
gets it beside the samples.

The NLL is the full bound (all T terms and the prior) in bits/dim of --num_images images
(default: all) of the config's eval split, with its standard error; OUT gets nll.json and the
rate-distortion data of DDPM section 4.3 (rate_distortion.npz, rate_distortion.png).

The guidance sweep samples a class-conditional model at each classifier-free guidance scale w
(every class in turn, equally many; the run's sampler settings) and measures FID and IS against
the statistics of its training data, as Ho & Salimans (2022) trade them off: OUT gets
guidance_sweep.json and .md (a table) and guidance_sweep.png (FID and IS against w), and the
samples of each w under OUT/w_W/ (samples.npz with their labels); an interrupted sweep resumes
after the last complete shard. FID and IS of one guided sample set: sample.py --guidance=W --fid.
"""

from diffusion_jax import interrupts

if __name__ == "__main__":
    interrupts.stop_at_once()  # a signal while JAX and the modules load: one line, exit by it

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax import launch, sampler_registry, xla_flags
from diffusion_jax.errors import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", None, ["fid", "nll", "reference_stats", "guidance_sweep", "sliced_wasserstein"],
                  "what to evaluate")
flags.DEFINE_string("samples", None, "modes fid, sliced_wasserstein: an .npz of samples (arr_0: uint8 NHWC)")
flags.DEFINE_string("dataset", "cifar10", "modes fid, reference_stats, sliced_wasserstein: the reference "
                    "dataset")
flags.DEFINE_string("split", "train", "modes fid, reference_stats, sliced_wasserstein: its split (all images "
                    "are used)")
flags.DEFINE_string("data_dir", None, "tfds data_dir of the reference dataset")
flags.DEFINE_integer("image_size", None, "mode reference_stats: the image side (default: 32 for cifar10, 16 "
                     "for digits; mode fid takes the samples')", lower_bound=1)
flags.DEFINE_string("reference_stats", None, "the reference statistics .npz (read, or written if missing)")
flags.DEFINE_string("inception_weights", None,
                    "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or its .npz)")
config_flags.DEFINE_config_file("config", None,
                                "mode nll: config for a converted checkpoint's diffusion settings",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "mode nll: a training workdir")
flags.DEFINE_string("checkpoint", None, "mode nll: WORKDIR/checkpoints/STEP or convert.py's --out")
flags.DEFINE_integer("step", None, "mode nll: the workdir's checkpoint (default: the latest)")
flags.DEFINE_enum("params", "ema", ["ema", "raw"], "mode nll: EMA or raw parameters")
flags.DEFINE_integer("num_images", 0, "mode nll: images of the eval split to evaluate; mode "
                     "sliced_wasserstein: samples and images compared (0: all)", lower_bound=0)
flags.DEFINE_list("guidance_scales", ["0", "0.3", "1", "2", "4"], "mode guidance_sweep: the scales w")
flags.DEFINE_integer("num_samples", 10_000, "mode guidance_sweep: samples at each scale", lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "images per batch over all devices", lower_bound=1)
flags.DEFINE_integer("seed", 0, "modes nll, guidance_sweep: seed of the noise")
flags.DEFINE_string("out", None, "modes nll, guidance_sweep: output directory")
launch.define_distributed_flags()
flags.adopt_module_key_flags(launch)  # the multi-process flags in --help, not only --helpfull
flags.mark_flags_as_required(["mode"])

MODEL = ("nll", "guidance_sweep")  # the modes that evaluate a model
DATA = ("fid", "reference_stats", "sliced_wasserstein")  # the modes that read a dataset
MODE_FLAGS = {"samples": ("fid", "sliced_wasserstein"), "dataset": DATA, "split": DATA, "data_dir": DATA,
              "image_size": ("reference_stats",),
              "reference_stats": ("fid", "reference_stats", "guidance_sweep"),
              "inception_weights": ("fid", "reference_stats", "guidance_sweep"), "config": MODEL,
              "workdir": MODEL, "checkpoint": MODEL, "step": MODEL, "params": MODEL,
              "num_images": ("nll", "sliced_wasserstein"),
              "seed": MODEL, "out": MODEL, "guidance_scales": ("guidance_sweep",),
              "num_samples": ("guidance_sweep",)}


def check_flags():
    for name, modes in MODE_FLAGS.items():
        if FLAGS[name].present and FLAGS.mode not in modes:
            raise ConfigError(f"--{name} applies to --mode={' or '.join(modes)}, not --mode={FLAGS.mode}")
    required = {"fid": ["samples"], "nll": ["out"], "reference_stats": [], "guidance_sweep": ["out"],
                "sliced_wasserstein": ["samples"]}[FLAGS.mode]
    missing = [f"--{name}" for name in required if FLAGS[name].value is None]
    if missing:
        raise ConfigError(f"--mode={FLAGS.mode} needs {', '.join(missing)}")


def reference_data(image_size: int):
    import ml_collections

    return ml_collections.ConfigDict(dict(name=FLAGS.dataset, train_split=FLAGS.split, image_size=image_size,
                                          data_dir=FLAGS.data_dir))


def fid_mode():
    from diffusion_jax import storage
    from diffusion_jax.evaluation import fid, report

    samples = storage.path(FLAGS.samples, what="--samples")
    storage.check_shared(samples.parent)
    images = fid.load_samples(samples)  # checked before the network loads
    evaluator = report.InceptionScorer(reference_data(images.shape[1]), reference_stats=FLAGS.reference_stats,
                                       inception_weights=FLAGS.inception_weights)
    values = evaluator.fid_and_is(images)
    report.print_fid(values)
    report.write_json(samples.with_name(samples.stem + "_metrics.json"), values)


def sliced_wasserstein_mode():
    from diffusion_jax import input_pipeline, storage
    from diffusion_jax.evaluation import fid, report
    from diffusion_jax.evaluation.sliced_wasserstein import pixel_distance
    from diffusion_jax.progress import console

    samples = storage.path(FLAGS.samples, what="--samples")
    images = fid.load_samples(samples)
    reference = input_pipeline.load(FLAGS.dataset, FLAGS.split, image_size=images.shape[1],
                                    channels=images.shape[3], data_dir=FLAGS.data_dir)
    n = min(len(images), len(reference), FLAGS.num_images or len(images))
    distance = pixel_distance(images[:n], reference[:n])
    console(f"sliced Wasserstein distance between {n} samples and {n} images of "
            f"{FLAGS.dataset}/{FLAGS.split} (pixel space, lower is better): {distance:.4f}")
    report.write_json(samples.with_name(samples.stem + "_swd.json"),
                      {"sliced_wasserstein": distance, "num_images": n, "dataset": FLAGS.dataset,
                       "split": FLAGS.split})


def reference_stats_mode():
    from diffusion_jax import input_pipeline, storage
    from diffusion_jax.evaluation import report
    from diffusion_jax.progress import console

    input_pipeline.parse(FLAGS.dataset)  # a ConfigError naming what is allowed
    size = FLAGS.image_size or {"cifar10": 32, "digits": 16}.get(FLAGS.dataset)
    if size is None:
        raise ConfigError(f"--dataset={FLAGS.dataset} needs --image_size (the size the model samples at)")
    evaluator = report.InceptionScorer(reference_data(size), reference_stats=FLAGS.reference_stats,
                                       inception_weights=FLAGS.inception_weights)
    storage.check_shared(storage.path(evaluator.reference_path).parent)
    stats = evaluator.reference
    console(f"statistics of {FLAGS.dataset}/{FLAGS.split} ({stats.mu.shape[0]} features) in "
                             f"{evaluator.reference_path}")


def output_and_model(jax):
    """The modes that evaluate a model: --out (checked reachable, writable and shared by every process)
    and the model of --workdir or --checkpoint, ``(out, config, params)``, its config validated."""
    from diffusion_jax import checkpoints, storage
    from diffusion_jax import config as config_lib

    out = storage.path(FLAGS.out, what="--out")
    storage.check_reachable(out, what="--out")
    storage.check_writable(out, what="--out")
    storage.check_shared(out)
    config, params, _ = checkpoints.load(workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint, step=FLAGS.step,
                                         which=FLAGS.params, config=launch.config(FLAGS))
    config_lib.validate(config, jax.device_count(), jax.process_count())
    return out, config, params


def nll_mode(jax):
    import numpy as np

    from diffusion_jax import builders, input_pipeline, storage
    from diffusion_jax.evaluation import likelihood, report
    from diffusion_jax.progress import Progress, console

    out, config, params = output_and_model(jax)
    d = config.data
    images = input_pipeline.load(d.name, d.eval_split, image_size=d.image_size, channels=d.channels,
                                 data_dir=d.data_dir)
    if FLAGS.num_images:
        images = images[:FLAGS.num_images]
    bound = likelihood.Bound(builders.apply_fn(builders.make_model(config, evaluation=True)),
                             builders.make_schedule(config), batch_size=FLAGS.batch_size,
                             **builders.output_types(config))
    result = bound(params, images, jax.random.PRNGKey(FLAGS.seed), progress=Progress("NLL"))
    report.print_nll(result, d.eval_split)
    report.write_json(out / "nll.json", {
        "nll_bpd": result.mean, "stderr": result.stderr, "num_images": len(result.bpd), "split": d.eval_split,
        "prior_bpd": result.prior, "decoder_bpd": float(result.terms[0])})
    if jax.process_index() == 0:
        storage.save_npz(out / "rate_distortion.npz", t=np.arange(len(result.terms)), rate=result.rate(),
                         distortion=result.rmse, terms=result.terms, bpd=result.bpd)
        likelihood.plot_rate_distortion(result, out / "rate_distortion.png")
        console(f"wrote nll.json, rate_distortion.npz and rate_distortion.png to {out}")


def guidance_scales() -> list[float]:
    """--guidance_scales as numbers, each >= 0 (a ConfigError otherwise)."""
    try:
        scales = [float(w) for w in FLAGS.guidance_scales]
    except ValueError as e:
        raise ConfigError(f"--guidance_scales={','.join(FLAGS.guidance_scales)} must be numbers >= 0, "
                          "such as 0,0.3,1,2,4") from e
    if not scales or min(scales) < 0:
        raise ConfigError(f"--guidance_scales={','.join(FLAGS.guidance_scales)} must be numbers >= 0")
    return scales


def guidance_sweep_mode(jax):
    from diffusion_jax import builders, progress, sample_lib
    from diffusion_jax.evaluation import report
    from diffusion_jax.mesh import data_mesh

    scales = guidance_scales()
    out, config, params = output_and_model(jax)
    if not config.model.num_classes:
        raise ConfigError("--mode=guidance_sweep needs a class-conditional model; this one is unconditional "
                          "(model.num_classes = 0)")
    if FLAGS.batch_size % jax.device_count():
        raise ConfigError(f"--batch_size={FLAGS.batch_size} must be a multiple of the {jax.device_count()} "
                          "devices")
    scorer = report.InceptionScorer(config.data, reference_stats=FLAGS.reference_stats,
                                    inception_weights=FLAGS.inception_weights)
    model, sched = builders.make_model(config), builders.make_schedule(config)
    mesh = data_mesh()
    rows = []
    for w in scales:
        config.sample.guidance = w
        directory = out / f"w_{w:g}"
        generate = sample_lib.Generator(config, model, sched, mesh)
        images = sample_lib.sample_to_file(generate, params, jax.random.PRNGKey(FLAGS.seed), directory,
                                           FLAGS.num_samples, FLAGS.batch_size,
                                           progress=progress.Progress(f"samples at w = {w:g}"))
        values = scorer.fid_and_is(sample_lib.on_every_process(images, directory))
        report.print_fid(values, prefix=f"w = {w:g}: ")
        rows.append(dict(guidance=w, **values))
        report.write_guidance_sweep(rows, out, dict(sampler=sampler_registry.settings(config.sample),
                                                    seed=FLAGS.seed, model=FLAGS.workdir or FLAGS.checkpoint))
    progress.console(f"wrote guidance_sweep.json, guidance_sweep.md and guidance_sweep.png to {out}")


def main(argv):
    del argv
    xla_flags.set_defaults()  # before launch.start starts JAX's backends
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    launch.start(FLAGS)
    import jax

    with launch.one_line_errors():
        check_flags()
        if FLAGS.mode == "fid":
            fid_mode()
        elif FLAGS.mode == "reference_stats":
            reference_stats_mode()
        elif FLAGS.mode == "guidance_sweep":
            guidance_sweep_mode(jax)
        elif FLAGS.mode == "sliced_wasserstein":
            sliced_wasserstein_mode()
        else:
            nll_mode(jax)


if __name__ == "__main__":
    app.run(main, flags_parser=launch.parse_flags)
