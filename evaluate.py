"""Evaluate: FID and IS of a sample file, the NLL of a model, or the reference statistics of a dataset.

    python evaluate.py --mode=fid --samples=OUT/samples.npz [--dataset=cifar10 --split=train]
    python evaluate.py --mode=nll --workdir=DIR (or --checkpoint=PATH) --out=DIR [--num_images=N]
    python evaluate.py --mode=reference_stats --dataset=cifar10 --split=train

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

The NLL is the full bound (all T terms and the prior) in bits/dim of --num_images images
(default: all) of the config's eval split, with its standard error; OUT gets nll.json and the
rate-distortion data of DDPM section 4.3 (rate_distortion.npz, rate_distortion.png).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax import launch, xla_flags
from diffusion_jax.errors import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", None, ["fid", "nll", "reference_stats"], "what to evaluate")
flags.DEFINE_string("samples", None, "mode fid: an .npz of samples (arr_0: uint8 NHWC)")
flags.DEFINE_string("dataset", "cifar10", "modes fid, reference_stats: the reference dataset")
flags.DEFINE_string("split", "train", "modes fid, reference_stats: its split (all images are used)")
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
flags.DEFINE_integer("num_images", 0, "mode nll: images of the eval split to evaluate (0: all)",
                     lower_bound=0)
flags.DEFINE_integer("batch_size", 64, "images per batch over all devices", lower_bound=1)
flags.DEFINE_integer("seed", 0, "mode nll: seed of the noise")
flags.DEFINE_string("out", None, "mode nll: output directory")
launch.define_distributed_flags()
flags.mark_flags_as_required(["mode"])

MODE_FLAGS = {"samples": ("fid",), "dataset": ("fid", "reference_stats"), "split": ("fid", "reference_stats"),
              "data_dir": ("fid", "reference_stats"), "image_size": ("reference_stats",),
              "reference_stats": ("fid", "reference_stats"),
              "inception_weights": ("fid", "reference_stats"), "config": ("nll",), "workdir": ("nll",),
              "checkpoint": ("nll",), "step": ("nll",), "params": ("nll",), "num_images": ("nll",),
              "seed": ("nll",), "out": ("nll",)}


def check_flags():
    for name, modes in MODE_FLAGS.items():
        if FLAGS[name].present and FLAGS.mode not in modes:
            raise ConfigError(f"--{name} applies to --mode={' or '.join(modes)}, not --mode={FLAGS.mode}")
    required = {"fid": ["samples"], "nll": ["out"], "reference_stats": []}[FLAGS.mode]
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
    evaluator = report.Evaluator(reference_data(images.shape[1]), reference_stats=FLAGS.reference_stats,
                                 inception_weights=FLAGS.inception_weights)
    values = evaluator.fid_and_is(images)
    report.print_fid(values)
    report.write_json(samples.with_name(samples.stem + "_metrics.json"), values)


def reference_stats_mode():
    from diffusion_jax import input_pipeline, storage
    from diffusion_jax.evaluation import report
    from diffusion_jax.progress import console

    input_pipeline.parse(FLAGS.dataset)  # a ConfigError naming what is allowed
    size = FLAGS.image_size or {"cifar10": 32, "digits": 16}.get(FLAGS.dataset)
    if size is None:
        raise ConfigError(f"--dataset={FLAGS.dataset} needs --image_size (the size the model samples at)")
    evaluator = report.Evaluator(reference_data(size), reference_stats=FLAGS.reference_stats,
                                 inception_weights=FLAGS.inception_weights)
    storage.check_shared(storage.path(evaluator.reference_path).parent)
    stats = evaluator.reference
    console(f"statistics of {FLAGS.dataset}/{FLAGS.split} ({stats.mu.shape[0]} features) in "
                             f"{evaluator.reference_path}")


def nll_mode(jax):
    import numpy as np

    from diffusion_jax import builders, checkpoints, input_pipeline, storage
    from diffusion_jax import config as config_lib
    from diffusion_jax.evaluation import likelihood, report
    from diffusion_jax.progress import Progress, console

    out = storage.path(FLAGS.out, what="--out")
    storage.check_reachable(out, what="--out")
    storage.check_writable(out, what="--out")
    storage.check_shared(out)
    config, params, _ = checkpoints.load(workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint, step=FLAGS.step,
                                         which=FLAGS.params, config=launch.config(FLAGS))
    config_lib.validate(config, jax.device_count(), jax.process_count())
    d = config.data
    images = input_pipeline.load(d.name, d.eval_split, image_size=d.image_size, channels=d.channels,
                                 data_dir=d.data_dir)
    if FLAGS.num_images:
        images = images[:FLAGS.num_images]
    bound = likelihood.Evaluator(builders.apply_fn(builders.make_model(config)),
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
        else:
            nll_mode(jax)


if __name__ == "__main__":
    app.run(main, flags_parser=launch.parse_flags)
