"""Train loop overhead: train_and_evaluate's images/s against the bare compiled train step.

    python -m benchmarks.train_loop [--batch 16] [--steps 24]

The CIFAR-10 network (configs/cifar10.py) at a small batch, on CIFAR-shaped data held in
memory (random uint8 images: CIFAR-10 cannot be downloaded here, and the loop does not
look at pixel values). The loop logs every 4 steps and saves an asynchronous checkpoint
every 12, more often than the quickstart does. The first logging interval (compiling) is
left out of the loop's figure; the bare step is timed after one warm-up call.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import tempfile
import time

import jax
import numpy as np

from diffusion_jax import input_pipeline, train_lib, xla_flags

sys.path.insert(0, ".")
from configs import cifar10  # noqa: E402


def main():
    xla_flags.set_defaults()  # before JAX starts its backends
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    config = cifar10.get_config()
    config.train.update(batch_size=args.batch, num_steps=args.steps, log_every=4, checkpoint_every=12)
    config.sample.every = 0
    images = np.random.default_rng(0).integers(0, 256, size=(50_000, 32, 32, 3), dtype=np.uint8)
    # a CIFAR-10 stand-in, in host memory as the real one
    input_pipeline.check = lambda *a, **k: None
    labels = np.zeros(len(images), np.int32)
    input_pipeline.open_share = lambda *a, **k: input_pipeline.Examples(images, labels)

    trainer = train_lib.Trainer(config)
    state = trainer.init(jax.random.PRNGKey(0))
    rng = jax.random.PRNGKey(1)
    batches = [trainer.global_batch(input_pipeline.make_batch(images, s, batch_size=args.batch, seed=0,
                                                              randflip=True)) for s in range(2)]
    state, metrics = trainer.step(state, batches[0], rng)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(args.steps - 4):
        state, metrics = trainer.step(state, batches[i % 2], rng)
    jax.block_until_ready(metrics)
    bare = (args.steps - 4) * args.batch / (time.perf_counter() - start)
    del state

    console = io.StringIO()
    with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(console):
        train_lib.train_and_evaluate(config, workdir)
    rates = [float(r) for r in re.findall(r"([\d.]+) img/s", console.getvalue())]
    loop = float(np.mean(rates[1:]))  # intervals after the first, which holds compiling

    print(f"CIFAR-10 network, batch {args.batch}, {jax.device_count()} CPU device(s)")
    print(f"bare compiled train step: {bare:.3f} img/s")
    print(f"train_and_evaluate loop:  {loop:.3f} img/s  ({loop / bare:.1%} of the bare step; "
          f"intervals {', '.join(f'{r:.2f}' for r in rates[1:])})")


if __name__ == "__main__":
    main()
