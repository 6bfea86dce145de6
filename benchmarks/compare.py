"""diffusion-jax against its PyTorch peers on this machine, measured alternately in one run.

    python -m benchmarks.compare [--reps 5] [--long-reps 1] [--no-torch-compile]
                                 [--json benchmarks/results.json]

For the DDPM CIFAR-10 network (35.7M parameters): forward at batch 64; a full training step
(forward, backward, clipping, Adam, EMA) at batch 16 and 32; DDIM-50 sampling of 64 images end
to end (sample.py's path against diffusers' DDIMPipeline); Inception features of 1,000 32x32
images (the Flax port against pytorch-fid); beside the forward, diffusers' under torch.compile
(--no-torch-compile leaves it out). Each workload runs in a process of its own per framework
(so that its peak resident memory is its own). The two set up (imports, model,
tracing) at the same time; then each compiles and warms up alone, and they are timed
alternately: jax, torch, jax, torch, ...; the figure is the median. torch uses 2
threads, as XLA's CPU backend does on this 2-core machine. The two long workloads (DDIM-50,
FID features) take --long-reps repetitions and warm up on less work (see workers.py). GFLOP/s
come from XLA's cost analysis of the program (before optimization), as a fraction of the
machine's fp32 matmul peak as this run measures it: the faster of JAX's and torch's 2048^3
matmul. Peak resident memory (RSS) is each worker's peak over its warm-up and runs, after
set-up and compiling.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.workers import IMAGES

# (workload, label); the images per run are workers.IMAGES
WORKLOADS = [
    ("forward64", "forward, batch 64"),
    ("train16", "train step, batch 16"),
    ("train32", "train step, batch 32"),
    ("ddim50", "DDIM-50, 64 images, end to end"),
    ("fid1000", "FID features, 1000 images 32x32"),
]
LONG = ("ddim50", "fid1000")


class Worker:
    """A process of benchmarks/workers.py, started to set up; see there for the protocol."""

    def __init__(self, framework: str, workload: str, cache: str):
        # the run's own compilation caches: a fresh machine has none (torch.compile's would save ~50 s)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_COMPILATION_CACHE_DIR=cache,
                   TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "torchinductor"))
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.workers", framework, workload],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker {self.process.args[3:]} died (exit {self.process.wait()})")
        return json.loads(line)

    def _send(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def set_up(self) -> None:
        self._read()

    def compile(self) -> dict:
        return self._send("compile")

    def run(self) -> float:
        return self._send("run")["seconds"]

    def close(self) -> float:
        peak = self._send("exit")["peak_rss_mb"]
        self.process.wait()
        return peak


def measure(workers: dict, reps: int, cache: str, optional=()) -> dict:
    """Workers {name: (framework, workload)} set up at once, then compile, warm up and run one at a time.

    Runs alternate in the order of ``workers``. A worker named in ``optional`` that fails to
    compile (torch.compile where it does not run) is left out, its error in its place.
    """
    started = {name: Worker(framework, workload, cache) for name, (framework, workload) in workers.items()}
    for worker in started.values():
        worker.set_up()
    ready, results = {}, {}
    for name, worker in started.items():
        ready[name] = worker.compile()
        if "error" in ready[name]:
            if name not in optional:
                raise RuntimeError(f"benchmark worker {name} {workers[name]}: {ready[name]['error']}")
            results[name] = ready.pop(name)
            worker.process.wait()
    times = {name: [] for name in ready}
    for _ in range(reps):
        for name in ready:
            times[name].append(started[name].run())
    for name in ready:
        results[name] = dict(ready[name], times=times[name], median_s=statistics.median(times[name]),
                             peak_rss_mb=started[name].close())
    return results


def pair(workload: str) -> dict:
    """diffusion-jax's and its peer's worker of ``workload``, for ``measure``."""
    return {"jax": ("jax", workload), "torch": ("torch", workload)}


def _cpu_name() -> str:
    """The CPU as /proc/cpuinfo names it (Linux): model, family and model number, AVX-512 or not."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]
    except OSError:
        return platform.processor() or platform.machine()
    info = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    vector = "AVX-512" if "avx512f" in info.get("flags", "").split() else "no AVX-512"
    return (f"{info.get('model name', platform.machine())} ({platform.machine()}, "
            f"family {info.get('cpu family')} model {info.get('model')}, {vector})")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of the short workloads")
    parser.add_argument("--long-reps", type=int, default=1,
                        help="timed repetitions of DDIM-50 and FID features")
    parser.add_argument("--no-torch-compile", action="store_true",
                        help="leave out diffusers' forward under torch.compile (its compiling takes ~1 min)")
    parser.add_argument("--only", nargs="*", default=None, help="a subset of the workloads")
    parser.add_argument("--json", default="benchmarks/results.json", help="where to write the figures")
    args = parser.parse_args()
    started = time.perf_counter()
    cache = tempfile.mkdtemp(prefix="benchmark-cache-")  # the run's compilation caches (see Worker)
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    peak = measure(pair("matmul"), args.reps, cache)
    matmul_gflops = {f: peak[f]["flops"] / peak[f]["median_s"] / 1e9 for f in peak}
    peak_gflops = max(matmul_gflops.values())
    results = {"date": datetime.date.today().isoformat(), "machine": f"{_cpu_name()}, {os.cpu_count()} cores",
               "matmul_gflops": matmul_gflops, "peak_gflops": peak_gflops, "workloads": {}}
    print(f"{results['date']}, {results['machine']}", flush=True)
    print(f"fp32 matmul 2048^3: JAX {matmul_gflops['jax']:.1f} GFLOP/s, "
          f"torch {matmul_gflops['torch']:.1f} GFLOP/s", flush=True)
    header = (f"{'workload':34} {'diffusion-jax':>13} {'peer':>9} {'ratio':>6} {'compile s':>9} "
              f"{'GFLOP/s':>8} {'% peak':>6} {'RSS MB jax/peer':>16}")
    print(header, flush=True)
    for workload, label in WORKLOADS:
        if args.only and workload not in args.only:
            continue
        start = time.perf_counter()
        workers = pair(workload)
        if workload == "forward64" and not args.no_torch_compile:
            workers["torch.compile"] = ("torch", "forward64_compiled")
        reps = args.long_reps if workload in LONG else args.reps
        m = measure(workers, reps, cache, optional=("torch.compile",))
        images = IMAGES[workload]
        jax_rate, torch_rate = images / m["jax"]["median_s"], images / m["torch"]["median_s"]
        gflops = m["jax"]["flops"] / m["jax"]["median_s"] / 1e9 if m["jax"]["flops"] else None
        results["workloads"][workload] = dict(m, label=label,
                                              images_per_s={"jax": jax_rate, "torch": torch_rate},
                                              ratio=jax_rate / torch_rate, gflops=gflops,
                                              wall_s=time.perf_counter() - start)
        print(f"{label:34} {jax_rate:9.2f} img/s {torch_rate:6.2f} {jax_rate / torch_rate:6.2f} "
              f"{m['jax']['compile_s']:9.1f} {gflops or float('nan'):8.1f} "
              f"{100 * gflops / peak_gflops if gflops else float('nan'):6.1f} "
              f"{m['jax']['peak_rss_mb']:7.0f}/{m['torch']['peak_rss_mb']:<7.0f}", flush=True)
        compiled = m.get("torch.compile")  # beside the eager peer, measured in the same alternation
        if compiled and "error" in compiled:
            reason = compiled["error"].splitlines()[0]
            print(f"  diffusers under torch.compile does not run here: {reason}", flush=True)
        elif compiled:
            rate = images / compiled["median_s"]
            print(f"{'  diffusers under torch.compile':34} {'':>13} {rate:6.2f} {jax_rate / rate:6.2f} "
                  f"{compiled['compile_s']:9.1f} {'':>15} {'':>8}/{compiled['peak_rss_mb']:<7.0f}",
                  flush=True)
            results["workloads"][workload].update(torch_compile_images_per_s=rate,
                                                  torch_compile_ratio=jax_rate / rate)
    results["wall_s"] = time.perf_counter() - started
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"{results['wall_s'] / 60:.1f} min; figures in {args.json}")


if __name__ == "__main__":
    main()
