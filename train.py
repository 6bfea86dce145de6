"""Train a diffusion model: python train.py --config=configs/cifar10.py --workdir=DIR [--config.a.b=v].

Multi-process runs: --distributed on TPU pods and Slurm (JAX finds the cluster), or
--distributed --coordinator_address=HOST:PORT --num_processes=N --process_id=I elsewhere
(e.g. a GPU cluster or several local CPU processes).
"""

from diffusion_jax import interrupts

if __name__ == "__main__":
    interrupts.stop_at_once()  # a signal while JAX and the modules load: one line, exit by it

import os

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax import launch, xla_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and samples (local, or gs:// shared by "
                    "every host); resumed if it holds a run")
flags.DEFINE_bool("take_over_lock", False, "take over the workdir's lock of a run on another host that "
                  "stopped refreshing it 30 minutes ago (a lost host); a lock of this host's live process is "
                  "never taken")
flags.DEFINE_bool("allow_config_change", False, "resume a checkpoint trained with other settings (the run "
                  "lists them); the network must stay the same")
flags.DEFINE_bool("dry_run", False, "check the run and exit: join the processes, print each one's devices, "
                  "the resolved config (every key), the data with its size and classes, the workdir's state "
                  "(writable and shared by every process; its checkpoints) and the parameter count; nothing "
                  "is trained or saved")
flags.DEFINE_string("compile_for", None, "compile the config's train step for this TPU slice, e.g. "
                    "v3:2x2, v4:2x2x1, v5e:2x4 or v6e:4x4 (GENERATION:TOPOLOGY), on any host with libtpu "
                    "(pip install 'jax[tpu]'), no TPU needed; print per device the memory against its HBM, "
                    "the FLOPs per step and projected step times, then exit; --workdir is not needed")
flags.DEFINE_bool("find_batch", False, "with --compile_for: find the largest global batch that fits, by "
                  "compiling at doubling, then bisected, batch sizes")
flags.DEFINE_bool("compile_evaluation", False, "with --compile_for: also compile a batch of eval.batch_size "
                  "samples by the config's sampler (sample.sampler, sample.steps) and the FID extractor on "
                  "as many images, and print the same figures for each")
launch.define_distributed_flags()
flags.adopt_module_key_flags(launch)  # the multi-process flags in --help, not only --helpfull
flags.mark_flags_as_required(["config"])
flags.register_multi_flags_validator(
    ["compile_for", "find_batch", "compile_evaluation"],
    lambda given: given["compile_for"] or not (given["find_batch"] or given["compile_evaluation"]),
    "--find_batch and --compile_evaluation apply to --compile_for")
flags.register_multi_flags_validator(["workdir", "compile_for"],
                                     lambda given: given["workdir"] or given["compile_for"],
                                     "--workdir is required (except with --compile_for)")


def main(argv):
    del argv
    xla_flags.set_defaults()  # before launch.start starts JAX's backends
    if not FLAGS["verbosity"].present:
        # progress goes to the console; libraries' INFO only on request
        logging.set_verbosity(logging.WARNING)
    if FLAGS.compile_for:  # the slice's devices come from libtpu; this host's accelerators are left alone,
        import jax  # and libtpu's one-process lock too (a run may be training on them)

        jax.config.update("jax_platforms", "cpu")
        os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    launch.start(FLAGS)
    from diffusion_jax import train_lib

    with launch.one_line_errors():
        if FLAGS.compile_for:
            return compile_for(train_lib)
        if FLAGS.dry_run:
            return train_lib.dry_run(launch.config(FLAGS), FLAGS.workdir)
        train_lib.train_and_evaluate(launch.config(FLAGS), FLAGS.workdir, take_over_lock=FLAGS.take_over_lock,
                                     allow_config_change=FLAGS.allow_config_change)


def compile_for(train_lib):
    """--compile_for: the fit of the train step on a TPU slice, or with --find_batch the largest batch;
    with --compile_evaluation, the fit of the sampling and FID programs too."""
    config = launch.config(FLAGS)
    devices = train_lib.tpu_devices(FLAGS.compile_for)
    if not FLAGS.find_batch:
        train_lib.print_tpu_compile(train_lib.compile_for_tpu(config, FLAGS.compile_for, devices))
    else:
        def fits(batch_size: int) -> bool:
            compiled = train_lib.compile_for_tpu(config, FLAGS.compile_for, devices, batch_size)
            train_lib.print_tpu_compile(compiled)
            return compiled.fits

        largest = train_lib.largest_batch(fits, config.train.batch_size, len(devices))
        print(f"largest global batch that fits {FLAGS.compile_for}: "
              + (f"{largest}" if largest else "none (one image per device does not fit)"))
    if FLAGS.compile_evaluation:
        for compiled in train_lib.compile_evaluation_for_tpu(config, FLAGS.compile_for, devices):
            train_lib.print_tpu_compile(compiled)


if __name__ == "__main__":
    app.run(main, flags_parser=launch.parse_flags)
