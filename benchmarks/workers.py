"""One workload of benchmarks/compare.py in one process: diffusion-jax's or its peer's (diffusers,
pytorch-fid).

    python -m benchmarks.workers {jax,torch} WORKLOAD

Protocol on stdin/stdout, one JSON object a line: after set-up (imports, model, data, tracing,
the FLOP count) the worker prints {"set_up": true} and waits; on "compile" it compiles and
makes a warm-up call, then prints {"ready": ..., "compile_s": ..., "flops": ...} (or
{"error": ...} and exits); each "run" line runs the workload once and prints {"seconds": ...};
"exit" prints {"peak_rss_mb": ...} and exits. compare.py lets the two frameworks' workers set up at the
same time (tracing and imports, one thread each), and then compiles, warms up and times them one at a time.
The peak resident memory is that of the warm-up and the runs: the peak is reset after set-up
(imports, model, compiling), so it counts what stays resident (libraries, weights, state)
and what a run adds, not the compiler's own peak. After set-up and after each run the worker
hands glibc's free memory back to the system (malloc_trim), outside the timed region: an idle
peer that kept ~1.3 GB of freed heap made the other framework's next train step 25-35% slower
on this machine (JAX 3.9 s alone, 5.3 s after a diffusers step; 3.9 s with the trim).

The long workloads warm up on less work (DDIM: one step; FID: 20 images); JAX's DDIM loop and
Inception are compiled ahead of time into a persistent compilation cache, from which their first
run loads them. compare.py gives all JAX workers of a run one throw-away cache
(JAX_COMPILATION_CACHE_DIR), so that the U-Net's initialization (~10 s of compiling, not a
figure) is compiled once a run; run alone, a worker makes its own.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from unittest import mock

import numpy as np

# images per run of each workload (benchmarks/compare.py reads it too)
IMAGES = {"forward64": 64, "forward64_compiled": 64, "train16": 16, "train32": 32, "ddim50": 64,
          "fid1000": 1000, "forward128": 128, "train128": 128}  # the last two for benchmarks/accelerator.py
WORKLOADS = (*IMAGES, "matmul")


def _cifar10_config():
    sys.path.insert(0, ".")
    from configs import cifar10

    config = cifar10.get_config()
    config.sample.update(sampler="ddim", steps=50, spacing="uniform", eta=0.0, clip_x0=True)
    return config


def _images(n, size=32):
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _reset_peak_rss() -> None:
    """Restart the kernel's count of peak resident memory (VmHWM) from the current size (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _release_free_memory() -> None:
    """Hand the allocator's free memory back to the system (glibc), outside the timed region."""
    ctypes.CDLL(None).malloc_trim(0)


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def use_compilation_cache(jax) -> None:
    """Cache every compiled program in $JAX_COMPILATION_CACHE_DIR, or else in a directory of this process."""
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        cache = tempfile.mkdtemp(prefix="benchmark-cache-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def jax_workload(name):
    """Set up ``name``: (FLOPs of one run by XLA's cost analysis, ``build``).

    ``build()`` compiles and gives (run, warm-up or None for ``run``, compile seconds).
    """
    from diffusion_jax import xla_flags

    xla_flags.set_defaults()  # before JAX starts its backends
    import jax
    import jax.numpy as jnp

    from diffusion_jax import train_lib
    from diffusion_jax.evaluation import inception
    from diffusion_jax.models import onednn

    def compiled(jitted, *args, twin=None):
        """(FLOPs by XLA's cost analysis, ``compile`` giving the executable and its compile seconds).

        XLA counts no FLOPs in a custom call, so for a program with oneDNN's convolutions
        (diffusion_jax/models/onednn.py) ``twin`` makes the same program afresh, which is traced
        with XLA's convolutions. Either is counted before optimization.
        """
        lowered = jitted.lower(*args)
        counted = lowered
        if twin is not None and onednn.uses_onednn():
            with mock.patch.dict(os.environ, DIFFUSION_JAX_ONEDNN="0"):
                counted = twin().lower(*args)

        def compile_():
            start = time.perf_counter()
            exe = lowered.compile()
            return exe, time.perf_counter() - start

        return float(counted.cost_analysis().get("flops", 0.0)), compile_

    if name == "matmul":
        a = jnp.asarray(np.random.default_rng(0).normal(size=(2048, 2048)), jnp.float32)
        flops, compile_ = compiled(jax.jit(jnp.matmul), a, a)

        def build():
            exe, seconds = compile_()
            return (lambda: exe(a, a).block_until_ready()), None, seconds

        return flops, build
    use_compilation_cache(jax)
    config = _cifar10_config()
    if name == "fid1000":  # random weights, as the peer's are: the work is the same
        params = inception.random_params()
        extractor, images = inception.Extractor(params), _images(IMAGES[name])
        batch = jnp.asarray(images[:extractor.batch_size])
        flops, compile_ = compiled(extractor.apply, {"params": params}, batch,
                                   twin=lambda: inception.Extractor(params).apply)

        def build():  # into the compilation cache, from which the first run loads it
            return (lambda: extractor(images)), (lambda: None), compile_()[1]

        return flops * IMAGES[name] / extractor.batch_size, build  # counted for one batch
    trainer = train_lib.Trainer(config)
    if name.startswith("forward"):
        params = trainer.init(jax.random.PRNGKey(0)).params
        n = IMAGES[name]
        x = jnp.asarray(np.random.default_rng(0).normal(size=(n, 32, 32, 3)), jnp.float32)
        t = jnp.arange(n) * 15 % 1000  # timesteps spread over [0, T)
        def forward():
            return jax.jit(lambda p, x, t: trainer.model.apply({"params": p}, x, t))

        flops, compile_ = compiled(forward(), params, x, t, twin=forward)

        def build():
            exe, seconds = compile_()
            return (lambda: exe(params, x, t).block_until_ready()), None, seconds

        return flops, build
    if name.startswith("train"):
        batch_size = IMAGES[name]
        config.train.batch_size = batch_size
        trainer = train_lib.Trainer(config)
        box = [trainer.init(jax.random.PRNGKey(0))]
        batch = trainer.global_batch({"image": _images(batch_size).astype(np.float32) / 127.5 - 1})
        rng = jax.random.PRNGKey(1)
        flops, compile_ = compiled(trainer.step, box[0], batch, rng,
                                   twin=lambda: train_lib.Trainer(config).step)

        def build():
            exe, seconds = compile_()

            def run():
                box[0], metrics = exe(box[0], batch, rng)
                jax.block_until_ready(metrics)

            return run, None, seconds

        return flops, build
    if name == "ddim50":
        params = trainer.init(jax.random.PRNGKey(0)).params
        rng = jax.random.PRNGKey(2)
        flops, compile_ = compiled(trainer.generate.compiled(IMAGES[name]), params, rng, np.int32(0),
                                   trainer.generate.batch_labels(IMAGES[name], 0),
                                   twin=lambda: train_lib.Trainer(config).generate.compiled(IMAGES[name]))

        def build():  # into the compilation cache, from which the first run loads it
            return (lambda: trainer.generate(params, IMAGES[name], rng, 0)), (lambda: None), compile_()[1]

        return flops * config.sample.steps, build  # XLA counts a loop's body once
    raise ValueError(f"unknown workload {name!r}; one of {WORKLOADS}")


def torch_workload(name):
    """The same work in PyTorch: diffusers' UNet2DModel (google/ddpm-cifar10-32's config) or pytorch-fid.

    As ``jax_workload``: (0 FLOPs, uncounted; ``build``); only torch.compile has a compile time.
    The forward and the train step run on $BENCHMARK_TORCH_DEVICE (default "cpu"), the rest on the CPU.
    """
    import torch

    torch.set_num_threads(2)
    device = os.environ.get("BENCHMARK_TORCH_DEVICE", "cpu")  # benchmarks/accelerator.py sets "cuda"
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if name == "matmul":
        a = torch.randn(2048, 2048)
        return 2 * 2048 ** 3, lambda: ((lambda: torch.matmul(a, a)), None, 0.0)
    if name == "fid1000":
        from pytorch_fid import inception as pytorch_fid_inception

        state = pytorch_fid_inception._inception_v3(num_classes=1008, aux_logits=False,
                                                    weights=None).state_dict()
        pytorch_fid_inception.load_state_dict_from_url = lambda *a, **k: state  # random weights, same work
        model = pytorch_fid_inception.InceptionV3([3]).eval()
        images = torch.from_numpy(_images(IMAGES[name])).permute(0, 3, 1, 2).float() / 255

        def extract(num=IMAGES[name]):
            with torch.no_grad():
                for start in range(0, num, 200):  # pytorch-fid's default batch is 50; 200 as ours
                    model(images[start:min(start + 200, num)])

        return 0.0, lambda: (extract, (lambda: extract(20)), 0.0)
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    from diffusion_jax.models.peer_configs import DIFFUSERS_CIFAR10

    torch.manual_seed(0)
    model = UNet2DModel(**DIFFUSERS_CIFAR10, dropout=0.1).to(device)
    if name.startswith("forward"):
        model.eval()
        x = torch.randn(IMAGES[name], 3, 32, 32, device=device)
        t = torch.arange(IMAGES[name], device=device) * 15 % 1000  # as the JAX worker's

        def build():
            forward, seconds = model, 0.0
            if name == "forward64_compiled":
                # its "No CUDA runtime is found" warning (a CPU build looks for one) would break the table
                logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
                forward, start = torch.compile(model), time.perf_counter()
                with torch.no_grad():
                    forward(x, t)
                seconds = time.perf_counter() - start

            def run():
                with torch.no_grad():
                    forward(x, t)
                synchronize()

            return run, None, seconds

        return 0.0, build
    if name.startswith("train"):
        batch_size = IMAGES[name]
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        model.train()
        scheduler = DDPMScheduler(num_train_timesteps=1000)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
        ema = EMAModel(model.parameters(), decay=0.9999)
        x0 = (torch.from_numpy(_images(batch_size)).permute(0, 3, 1, 2).float() / 127.5 - 1).to(device)

        def step():
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (batch_size,), device=device)
            loss = torch.nn.functional.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            ema.step(model.parameters())
            synchronize()

        return 0.0, lambda: (step, None, 0.0)
    if name == "ddim50":
        model.eval()
        pipeline = DDIMPipeline(model, DDIMScheduler(num_train_timesteps=1000, clip_sample=True))
        pipeline.set_progress_bar_config(disable=True)

        def sample(steps=50):
            pipeline(batch_size=IMAGES[name], num_inference_steps=steps, eta=0.0, output_type="np")

        return 0.0, lambda: (sample, (lambda: sample(1)), 0.0)
    raise ValueError(f"unknown workload {name!r}; one of {WORKLOADS}")


def main():
    framework, name = sys.argv[1:3]
    flops, build = (jax_workload if framework == "jax" else torch_workload)(name)
    print(json.dumps({"set_up": True}), flush=True)
    if sys.stdin.readline().strip() != "compile":
        return
    try:  # a failure is reported for compare.py to name (torch.compile where it does not run, say)
        run, warmup, compile_s = build()
        _release_free_memory()
        _reset_peak_rss()
        start = time.perf_counter()
        (warmup or run)()
        warmup = time.perf_counter() - start
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return
    print(json.dumps({"ready": True, "compile_s": compile_s, "warmup_s": warmup, "flops": flops}), flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
            _release_free_memory()
            print(json.dumps({"seconds": seconds}), flush=True)
        else:
            break
    print(json.dumps({"peak_rss_mb": _peak_rss_mb()}), flush=True)


if __name__ == "__main__":
    main()
