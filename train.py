"""Train a diffusion model: python train.py --config=configs/cifar10.py --workdir=DIR [--config.a.b=v].

Multi-process runs: --distributed on TPU pods and Slurm (JAX finds the cluster), or
--distributed --coordinator_address=HOST:PORT --num_processes=N --process_id=I elsewhere
(e.g. a GPU cluster or several local CPU processes).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and samples; resumed if it holds a run")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-process runs)")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, where JAX cannot find the cluster")
flags.DEFINE_integer("num_processes", None, "number of processes, with --coordinator_address")
flags.DEFINE_integer("process_id", None, "this process's index, with --coordinator_address")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # progress goes to the console; libraries' INFO only on request
    import diffusion_jax  # noqa: F401  (sets XLA's CPU flags before JAX starts)
    import jax

    if FLAGS.distributed:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes; no effect elsewhere
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from diffusion_jax import input_pipeline, train_lib

    logging.info("%d processes, %d devices: %s", jax.process_count(), jax.device_count(), jax.devices())
    try:
        train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ValueError, input_pipeline.DatasetNotPreparedError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except train_lib.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    app.run(main)
