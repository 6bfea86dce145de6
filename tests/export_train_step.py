"""The train step as ``Trainer`` compiles it, exported for TPU and for CUDA GPUs from this host.

    python tests/export_train_step.py CONFIG_NAME   (with XLA_FLAGS giving the CPU devices)

``CONFIG_NAME`` is a module of configs/. Prints one JSON object: for each platform, the
partition specs of the exported module's inputs (the state's leaves, then the batch's images
and, for a class-conditional network, labels, then the rng) and outputs on the ``data`` mesh,
its device count, the number of donated inputs and its custom-call targets.
"""

import importlib
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for configs/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import export  # noqa: E402

from diffusion_jax import train_lib, xla_flags  # noqa: E402


def main(config_name):
    xla_flags.set_defaults()  # before JAX starts its backends
    config = importlib.import_module(f"configs.{config_name}").get_config()
    trainer = train_lib.Trainer(config)
    d = config.data
    batch = {"image": jax.ShapeDtypeStruct((config.train.batch_size, d.image_size, d.image_size, d.channels),
                                           jnp.float32, sharding=trainer.data_sharding)}
    if config.model.num_classes:
        batch["label"] = jax.ShapeDtypeStruct((config.train.batch_size,), jnp.int32,
                                              sharding=trainer.data_sharding)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=trainer.replicated)
    result = {}
    for platform in ("tpu", "cuda"):
        exported = export.export(trainer.step, platforms=(platform,))(trainer.abstract_state(), batch, rng)
        text = exported.mlir_module()
        result[platform] = dict(
            in_specs=[str(s.spec) for s in exported.in_shardings_jax(trainer.mesh)],
            out_specs=[str(s.spec) for s in exported.out_shardings_jax(trainer.mesh)],
            nr_devices=exported.nr_devices,
            donated=text.count("tf.aliasing_output") + text.count("jax.buffer_donor"),
            custom_calls=sorted(set(re.findall(r"custom_call @([\w.$-]+)", text))))
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
