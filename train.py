"""Train a diffusion model: python train.py --config=configs/cifar10.py --workdir=DIR [--config.a.b=v].

Multi-process runs: --distributed on TPU pods and Slurm (JAX finds the cluster), or
--distributed --coordinator_address=HOST:PORT --num_processes=N --process_id=I elsewhere
(e.g. a GPU cluster or several local CPU processes).
"""

from diffusion_jax import interrupts

if __name__ == "__main__":
    interrupts.stop_at_once()  # a signal while JAX and the modules load: one line, exit by it

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
launch.define_distributed_flags()
flags.adopt_module_key_flags(launch)  # the multi-process flags in --help, not only --helpfull
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    xla_flags.set_defaults()  # before launch.start starts JAX's backends
    if not FLAGS["verbosity"].present:
        # progress goes to the console; libraries' INFO only on request
        logging.set_verbosity(logging.WARNING)
    launch.start(FLAGS)
    from diffusion_jax import train_lib

    with launch.one_line_errors():
        if FLAGS.dry_run:
            return train_lib.dry_run(launch.config(FLAGS), FLAGS.workdir)
        train_lib.train_and_evaluate(launch.config(FLAGS), FLAGS.workdir, take_over_lock=FLAGS.take_over_lock,
                                     allow_config_change=FLAGS.allow_config_change)


if __name__ == "__main__":
    app.run(main, flags_parser=launch.parse_flags)
