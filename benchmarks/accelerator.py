"""What users care about on a GPU or TPU, measured on whatever backend JAX finds.

    python -m benchmarks.accelerator [--reps 5] [--only WORKLOAD ...] [--json benchmarks/accelerator.json]

Workloads, each in a process of its own (its peak device memory is its own, and only one
process at a time holds a TPU):

- ``train_cifar10_float32``, ``train_cifar10_bfloat16``: the CIFAR-10 train step
  (configs/cifar10.py, ``model.dtype`` float32 or bfloat16) as ``Trainer`` compiles it, global
  batch 128 over all local devices;
- ``train_256``: configs/ddpm256.py's network (113.7M parameters), global batch 64, halved
  while it does not fit in device memory (the table says which batch ran);
- ``ddim50``: DDIM-50 sampling of 1,000 CIFAR-10 images end to end, as sample.py runs it
  (``Trainer.generate``, 5 batches of 200, to uint8 images on the host);
- ``fid_features``: Inception pool features of 10,000 32x32 images (``inception.Extractor``,
  random weights: the same work as the released ones).

Each is compiled (timed), run once to warm up, then timed ``--reps`` times; the figure is the
median. For the train steps: FLOPs per device by XLA's cost analysis of the compiled step,
model FLOP utilization (MFU) against the device's peak (``hardware.PEAKS``; float32 at JAX's
default precision, which is TF32 on NVIDIA's tensor cores and bfloat16 passes on TPUs), and
the projected time of the config's run (800k steps for CIFAR-10). Peak device memory is
``Device.memory_stats()['peak_bytes_in_use']``, the largest over the local devices; the CPU
keeps no such count. Where PyTorch with CUDA is importable, diffusers' ``UNet2DModel`` forward
and train step at batch 128 are timed on GPU 0 alternately with ours (``benchmarks.compare``'s
workers; its README says what each side runs).

On a CPU, or with ``--tiny``, every workload runs a tiny configuration instead (a one-level
32-channel U-Net at 16x16, a few images, DDIM-5): a check that the command works, in under a minute,
which a test runs. Its figures say nothing about accelerators.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock

import numpy as np

from benchmarks import compare, hardware, workers

WORKLOADS = ("train_cifar10_float32", "train_cifar10_bfloat16", "train_256", "ddim50", "fid_features")
FULL = dict(cifar10_batch=128, batch_256=64, ddim_images=1000, ddim_batch=200, ddim_steps=50,
            fid_images=10_000)
TINY = dict(cifar10_batch=8, batch_256=4, ddim_images=16, ddim_batch=8, ddim_steps=5, fid_images=8)


def _shrink(config) -> None:
    """The tiny configuration: a one-level 32-channel U-Net at 16x16."""
    config.data.image_size = 16
    config.model.update(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(16,))


def _configs(tiny: bool):
    """(the CIFAR-10 config with DDIM-50 as the sampler, the 256x256 config)."""
    sys.path.insert(0, os.getcwd())
    from configs import cifar10, ddpm256

    cifar = cifar10.get_config()
    cifar.sample.update(sampler="ddim", steps=(TINY if tiny else FULL)["ddim_steps"], spacing="uniform",
                        eta=0.0, clip_x0=True)
    big = ddpm256.get_config()
    if tiny:
        _shrink(cifar)
        _shrink(big)
    return cifar, big


def _peak_memory(jax) -> int | None:
    stats = [d.memory_stats() for d in jax.local_devices()]
    return (max(s["peak_bytes_in_use"] for s in stats) if all(s and "peak_bytes_in_use" in s for s in stats)
            else None)


def _flops_per_device(jax, compiled, lower_again) -> float:
    """FLOPs of one call per device, by XLA's cost analysis of the compiled program.

    XLA counts no FLOPs in a custom call: where the convolutions are oneDNN's (one CPU device,
    diffusion_jax/models/onednn.py), ``lower_again()`` lowers the same program afresh, traced with
    XLA's convolutions, and that is counted, before optimization.
    """
    from diffusion_jax.models import onednn

    if jax.default_backend() == "cpu" and onednn.uses_onednn():
        with mock.patch.dict(os.environ, DIFFUSION_JAX_ONEDNN="0"):
            return float(lower_again().cost_analysis()["flops"])
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def _timed(run, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def run_workload(name: str, reps: int, tiny: bool, batch: int | None = None) -> dict:
    """Measure ``name`` in this process; ``batch`` overrides a train step's global batch."""
    from diffusion_jax import xla_flags

    xla_flags.set_defaults()  # before JAX starts its backends
    import jax
    import jax.numpy as jnp

    from diffusion_jax import train_lib
    from diffusion_jax.evaluation import inception

    sizes = TINY if tiny else FULL
    workers.use_compilation_cache(jax)  # so that a program compiled ahead of time is loaded by its first call
    cifar, big = _configs(tiny)
    result = dict(workload=name, device_kind=jax.local_devices()[0].device_kind)
    if name.startswith("train"):
        config = big if name == "train_256" else cifar
        config.train.batch_size = batch or (sizes["batch_256"] if name == "train_256"
                                            else sizes["cifar10_batch"])
        config.model.dtype = "bfloat16" if name.endswith("bfloat16") else "float32"
        trainer = train_lib.Trainer(config)
        box = [trainer.init(jax.random.PRNGKey(0))]
        d = config.data
        images = np.random.default_rng(0).uniform(-1, 1, (config.train.batch_size, d.image_size, d.image_size,
                                                            d.channels)).astype(np.float32)
        x, rng = trainer.global_batch({"image": images}), jax.random.PRNGKey(1)
        start = time.perf_counter()
        step = trainer.step.lower(box[0], x, rng).compile()
        compile_s = time.perf_counter() - start
        flops = _flops_per_device(jax, step, lambda: train_lib.Trainer(config).step.lower(box[0], x, rng))

        def run():
            box[0], metrics = step(box[0], x, rng)
            jax.block_until_ready(metrics)

        run()
        times = _timed(run, reps)
        seconds = statistics.median(times)
        peak = hardware.peak(result["device_kind"])
        peak_flops = getattr(peak, config.model.dtype) if peak else None
        result.update(batch=config.train.batch_size, dtype=config.model.dtype, images=config.train.batch_size,
                      flops_per_device=flops, mfu=flops / seconds / peak_flops if peak_flops else None,
                      peak_flops_per_device=peak_flops, num_steps=config.train.num_steps,
                      projected_run_s=seconds * config.train.num_steps)
    elif name == "ddim50":
        trainer = train_lib.Trainer(cifar)
        params = trainer.init(jax.random.PRNGKey(0)).params
        rng, n = jax.random.PRNGKey(2), sizes["ddim_batch"]
        start = time.perf_counter()
        labels = trainer.generate.batch_labels(n, 0)  # None: the CIFAR-10 network is unconditional
        trainer.generate.compiled(n).lower(params, rng, np.int32(0), labels).compile()
        compile_s = time.perf_counter() - start

        def run():
            for index in range(sizes["ddim_images"] // n):
                trainer.generate(params, n, rng, index)

        trainer.generate(params, n, rng, 0)  # loaded from the compilation cache
        times = _timed(run, reps)
        result.update(images=sizes["ddim_images"], steps=cifar.sample.steps, batch=n)
    elif name == "fid_features":
        params = inception.random_params()
        extractor = inception.Extractor(params)
        images = np.random.default_rng(0).integers(0, 256, (sizes["fid_images"], 32, 32, 3), dtype=np.uint8)
        batch = jnp.asarray(images[:min(extractor.batch_size, len(images))])
        start = time.perf_counter()
        extractor.apply.lower({"params": params}, batch).compile()
        compile_s = time.perf_counter() - start
        extractor(images[:len(batch)])  # loaded from the compilation cache
        times = _timed(lambda: extractor(images), reps)
        result.update(images=sizes["fid_images"], batch=len(batch))
    else:
        raise ValueError(f"unknown workload {name!r}; one of {WORKLOADS}")
    seconds = statistics.median(times)
    result.update(compile_s=compile_s, times=times, median_s=seconds, images_per_s=result["images"] / seconds,
                  peak_memory_bytes=_peak_memory(jax))
    return result


def _in_process(name: str, args, batch: int | None = None) -> dict:
    """``run_workload`` in a new process; an error comes back as {"error": ...}."""
    command = [sys.executable, "-m", "benchmarks.accelerator", "--worker", name, "--reps", str(args.reps)]
    command += ["--tiny"] * args.tiny + (["--batch", str(batch)] if batch else [])
    done = subprocess.run(command, capture_output=True, text=True,
                          env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=args.cache,
                                   TF_CPP_MIN_LOG_LEVEL="3"))
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return dict(workload=name,
                    error=(done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1],
                    out_of_memory="RESOURCE_EXHAUSTED" in done.stderr)
    return json.loads(lines[-1])


def _devices() -> dict:
    """The backend, device kind and count of the local devices, asked in a process of its own (this one
    leaves the devices to the workers: a TPU is held by one process at a time)."""
    probe = subprocess.run([sys.executable, "-c", "import json, jax; d = jax.local_devices(); "
                            "print(json.dumps(dict(backend=jax.default_backend(), "
                            "device_kind=d[0].device_kind, devices=len(d))))"],
                           capture_output=True, text=True, check=True)
    return json.loads(probe.stdout.strip().splitlines()[-1])


def measure_256(args) -> dict:
    """The 256x256 train step at the largest batch of 64, 32, ... that fits in device memory."""
    batch = (TINY if args.tiny else FULL)["batch_256"]
    while True:
        result = _in_process("train_256", args, batch)
        if not result.get("out_of_memory") or batch == 1:
            return result
        print(f"  the 256x256 train step does not fit at global batch {batch}; trying {batch // 2}",
              flush=True)
        batch //= 2


def torch_on_cuda() -> bool:
    probe = subprocess.run([sys.executable, "-c",
                            "import torch, diffusers; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    return probe.stdout.strip() == "True"


def compare_with_diffusers(reps: int, cache: str) -> dict:
    """diffusers' forward and train step at batch 128 against ours, alternated, both on GPU 0."""
    # for the workers: one GPU, shared (JAX would otherwise take 75% of its memory at start)
    os.environ.update(CUDA_VISIBLE_DEVICES="0", XLA_PYTHON_CLIENT_PREALLOCATE="false",
                      BENCHMARK_TORCH_DEVICE="cuda")
    results = {}
    for workload in ("forward128", "train128"):
        m = compare.measure(compare.pair(workload), reps, cache)
        images = workers.IMAGES[workload]
        results[workload] = dict(jax_images_per_s=images / m["jax"]["median_s"],
                                 torch_images_per_s=images / m["torch"]["median_s"],
                                 ratio=m["torch"]["median_s"] / m["jax"]["median_s"])
    return results


def _table(results: list[dict]) -> None:
    print(f"{'workload':24} {'batch':>5} {'img/s':>9} {'median s':>9} {'compile s':>9} {'MFU':>6} "
          f"{'peak mem GB':>11}  projected run")
    for r in results:
        if "error" in r:
            print(f"{r['workload']:24} failed: {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else f"{'-':>6}"
        memory = (f"{r['peak_memory_bytes'] / 1e9:11.2f}" if r["peak_memory_bytes"] is not None
                  else f"{'-':>11}")
        run = (f"{r['num_steps']:,} steps: {r['projected_run_s'] / 86400:.1f} days"
               if "projected_run_s" in r else "")
        print(f"{r['workload']:24} {r['batch']:5d} {r['images_per_s']:9.2f} {r['median_s']:9.4f} "
              f"{r['compile_s']:9.1f} {mfu} {memory}  {run}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of each workload")
    parser.add_argument("--only", nargs="*", choices=WORKLOADS, default=None,
                        help="a subset of the workloads")
    parser.add_argument("--tiny", action="store_true", help="the tiny configuration (the default on a CPU)")
    parser.add_argument("--json", default="benchmarks/accelerator.json", help="where to write the figures")
    # one workload, in this process
    parser.add_argument("--worker", choices=WORKLOADS, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_workload(args.worker, args.reps, args.tiny, args.batch)))
        return
    started = time.perf_counter()
    # the run's own compilation cache, shared by its workers (a program two of them compile is compiled once)
    args.cache = tempfile.mkdtemp(prefix="benchmark-cache-")
    atexit.register(shutil.rmtree, args.cache, ignore_errors=True)
    machine = _devices()
    args.tiny = args.tiny or machine["backend"] == "cpu"
    print(f"{datetime.date.today()}, {machine['devices']} x {machine['device_kind']} ({machine['backend']})"
          f"{': the tiny configuration' if args.tiny else ''}", flush=True)
    results = []
    for name in args.only or WORKLOADS:
        result = measure_256(args) if name == "train_256" else _in_process(name, args)
        results.append(result)
        print(f"  {name}: " + (f"failed: {result['error']}" if "error" in result else
                               f"{result['images_per_s']:.2f} img/s"), flush=True)
    _table(results)
    report = dict(date=datetime.date.today().isoformat(), **machine, tiny=args.tiny, workloads=results)
    if machine["backend"] == "gpu" and torch_on_cuda():
        report["diffusers"] = compare_with_diffusers(args.reps, args.cache)
        for workload, r in report["diffusers"].items():
            print(f"{workload}: diffusion-jax {r['jax_images_per_s']:.1f} img/s, diffusers "
                  f"{r['torch_images_per_s']:.1f} img/s: {r['ratio']:.2f}x")
    report["wall_s"] = time.perf_counter() - started
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{report['wall_s']:.0f} s; figures in {args.json}")
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
