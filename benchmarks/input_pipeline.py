"""The training input's rate per host core, and its memory against the dataset's size.

    python -m benchmarks.input_pipeline [--quick]

Sources made in a temporary directory (nothing is downloaded): prepared records (``records``,
as ``prepare_data`` writes them) of 32x32 and 256x256 images, a folder of 512x384 JPEGs read as
256x256 (decoded, cropped and resized at every read), and CIFAR-shaped images in host memory.
Each is read as training reads it (``input_pipeline.open_share`` and the batches of steps 0,
1, ...: shuffle, decode, flip, batch) by one thread, so the rate is what one host core gives;
``batches`` runs grain's threads on top.

Against the rate a host must feed: the DDPM CIFAR-10 run on a TPU v3-8 (one host) took 21
steps/s at batch 128 (the paper's appendix), ~2,700 images/s; for 256x256, the train step's
FLOPs per image (XLA's cost analysis of the step of configs/ddpm256.py) and a host's peak
FLOP/s (benchmarks/hardware.py) at an assumed 40% model FLOP utilization.

Memory: peak RSS of a process reading 200 batches of 128 from prepared 64x64 sources of 2,000
and 40,000 images (its RSS after the imports subtracted); it must not grow with the dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

CIFAR_HOST_RATE = 21 * 128  # DDPM appendix B: 21 steps/s at batch 128 on a TPU v3-8 (one host)
ASSUMED_MFU = 0.4
HOSTS = (("TPU v4 host (4 chips)", "tpu v4", 4), ("8 x H100 SXM", "h100", 8))


def write_records(directory: str, count: int, size: int, channels: int = 3, seed: int = 0) -> str:
    """``count`` smooth random images with labels as a prepared split ``train`` in ``directory``."""
    from array_record.python import array_record_module

    from diffusion_jax import records, storage

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(64, size // 8, size // 8, channels), dtype=np.uint8)
    name = records.shard_name("train", 0, 1)
    writer = array_record_module.ArrayRecordWriter(os.path.join(directory, name), records.WRITER_OPTIONS)
    for i in range(count):
        image = base[i % 64].repeat(8, axis=0).repeat(8, axis=1) ^ np.uint8(i % 251)
        writer.write(records.encode_example(image, i % 10))
    writer.close()
    storage.write_json(storage.path(directory) / "train.json",
                       dict(format=records.FORMAT, source="benchmark", split="train", image_size=size,
                            channels=channels, num_examples=count, classes=[str(k) for k in range(10)],
                            shards=[name], num_skipped=0, skipped=[], preprocessing="none"))
    return directory


def write_jpegs(directory: str, count: int, seed: int = 0) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        image = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8).repeat(8, axis=0).repeat(8, axis=1)
        Image.fromarray(image).save(os.path.join(directory, f"{i:05d}.jpg"), quality=90)
    return directory


def rate(share, batch_size: int, batches: int) -> float:
    """Images/s of one thread computing the batches of steps 0, 1, ... of ``share``."""
    from diffusion_jax import input_pipeline

    kwargs = dict(batch_size=batch_size, seed=0, randflip=True)
    if isinstance(share, input_pipeline.Streamed):
        dataset = share.dataset(**kwargs)
        dataset[0]  # opens the files
        start = time.perf_counter()
        for step in range(1, batches + 1):
            dataset[step]
    else:
        start = time.perf_counter()
        for step in range(1, batches + 1):
            input_pipeline.make_batch(share, step, **kwargs)
    return batches * batch_size / (time.perf_counter() - start)


def threaded_rate(share, batch_size: int, batches: int) -> float:
    """Images/s of ``input_pipeline.batches`` (grain's threads or the in-memory prefetcher)."""
    from diffusion_jax import input_pipeline

    iterator = input_pipeline.batches(share, 0, batch_size=batch_size, seed=0, randflip=True)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    iterator.close()
    return batches * batch_size / elapsed


def train_flops_per_image_256() -> float:
    """FLOPs of one image's train step of configs/ddpm256.py (XLA's cost analysis before optimization,
    with XLA's convolutions, whose FLOPs it counts), from the step at batch 1."""
    os.environ["DIFFUSION_JAX_ONEDNN"] = "0"
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, ".")
    from configs import ddpm256
    from diffusion_jax import builders, losses

    config = ddpm256.get_config()
    model, sched = builders.make_model(config), builders.make_schedule(config)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 256, 256, 3)),
                                               jnp.zeros((1,), jnp.int32))["params"])
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)

    def loss(params, x, rng):
        def model_fn(x_t, t):
            return model.apply({"params": params}, x_t, t, train=True, rngs={"dropout": rng})

        return losses.training_losses(model_fn, sched, x, rng, loss_type="mse", mean_type="eps",
                                      var_type="fixed_large").mean()

    lowered = jax.jit(jax.grad(loss)).lower(params, x, jax.ShapeDtypeStruct((2,), jnp.uint32))
    return float(lowered.cost_analysis()["flops"])


RSS_SCRIPT = """
import resource, sys
from diffusion_jax import input_pipeline
share = input_pipeline.open_share("prepared:" + sys.argv[1], "train", image_size=64, channels=3)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
iterator = input_pipeline.batches(share, 0, batch_size=128, seed=0, randflip=True)
for _ in range(200):
    next(iterator)
iterator.close()
print(base / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_rss(directory: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, directory], capture_output=True, text=True,
                         check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")).stdout.split()
    return float(out[-2]), float(out[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sources and few batches (a smoke test)")
    parser.add_argument("--json", default="benchmarks/input_pipeline.json", help="where to write the figures")
    args = parser.parse_args()
    from benchmarks.hardware import peak
    from diffusion_jax import input_pipeline

    q = args.quick
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        def sub(name):
            path = os.path.join(tmp, name)
            os.makedirs(path)
            return path

        small = write_records(sub("r32"), 500 if q else 20_000, 32)
        large = write_records(sub("r256"), 40 if q else 600, 256)
        jpegs = write_jpegs(sub("jpeg"), 40 if q else 300)
        count = 5_000 if q else 50_000
        memory = input_pipeline.Examples(
            np.random.default_rng(0).integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8),
            np.zeros(count, np.int32))
        batches = 4 if q else 40
        cases = [("prepared 32x32", small, 32, 128), ("prepared 256x256", large, 256, 16),
                 ("JPEG folder -> 256x256", jpegs, 256, 16)]
        for label, path, size, batch in cases:
            kind = "folder" if "JPEG" in label else "prepared"
            share = input_pipeline.open_share(f"{kind}:{path}", "train", image_size=size, channels=3)
            results[label] = dict(per_core=rate(share, batch, batches),
                                  threaded=threaded_rate(share, batch, batches))
        results["in memory 32x32"] = dict(per_core=rate(memory, 128, batches * 4),
                                          threaded=threaded_rate(memory, 128, batches * 4))
        sizes = (200, 400) if q else (2_000, 40_000)
        rss = {}
        for count in sizes:
            rss[count] = peak_rss(write_records(sub(f"r64_{count}"), count, 64))
    flops = train_flops_per_image_256()
    needs = {"CIFAR-10, TPU v3-8 host (21 steps/s x 128)": (CIFAR_HOST_RATE, "prepared 32x32")}
    for name, kind, devices in HOSTS:
        needs[f"256x256, {name} at {ASSUMED_MFU:.0%} MFU"] = (
            devices * peak(kind).bfloat16 * ASSUMED_MFU / flops, "prepared 256x256")
    print(f"{'source':28s} {'img/s one core':>15s} {'img/s batches()':>16s}")
    for label, r in results.items():
        print(f"{label:28s} {r['per_core']:15.0f} {r['threaded']:16.0f}")
    print(f"train step of configs/ddpm256.py: {flops / 1e9:.1f} GFLOP an image")
    for need, (value, source) in needs.items():
        cores = value / results[source]["per_core"]
        print(f"{need}: {value:,.0f} img/s = {cores:.2f} cores of '{source}'")
    for count, (base, top) in rss.items():
        print(f"peak RSS reading {count:,} prepared 64x64 images: {top:.0f} MB ({top - base:+.0f} MB over "
              "the imports)")
    with open(args.json, "w") as f:
        json.dump(dict(rates=results, needs={k: v[0] for k, v in needs.items()}, flops_256=flops,
                       rss_mb={str(k): v for k, v in rss.items()}), f, indent=1)


if __name__ == "__main__":
    main()
