"""One process, all its devices, fed the global batches that two processes would build.

    python tests/distributed_reference.py CONFIG OUT.npz

The reference of test_train.py's two-process test: each step's global batch is process 0's
batch followed by process 1's, from their own halves of the data, as
jax.make_array_from_process_local_data assembles them; writes the final params.
"""

import importlib.util
import sys

import jax
import numpy as np

from diffusion_jax import input_pipeline, train_lib, xla_flags


def main(config_path, out):
    xla_flags.set_defaults()  # as train.py, whose run this is the reference of
    spec = importlib.util.spec_from_file_location("config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    d, t = config.data, config.train
    halves = [input_pipeline.load(d.name, d.train_split, image_size=d.image_size, process_index=i,
                                  process_count=2)
              for i in range(2)]
    trainer = train_lib.Trainer(config)
    init_rng, train_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    state = trainer.init(init_rng)
    for step in range(t.num_steps):
        batch = np.concatenate([input_pipeline.make_batch(h, step, batch_size=t.batch_size // 2,
                                                          seed=config.seed, randflip=d.randflip,
                                                          process_index=i)["image"]
                                for i, h in enumerate(halves)])
        state, _ = trainer.step(state, trainer.global_batch({"image": batch}), train_rng)
    leaves = jax.tree_util.tree_leaves(state.params)
    np.savez(out, **{f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})


if __name__ == "__main__":
    main(*sys.argv[1:])
