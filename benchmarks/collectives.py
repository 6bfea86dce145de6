r"""The train step's collectives over a data mesh, read from its compiled HLO, and their cost on paper.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m benchmarks.collectives --config=configs/cifar10.py

Compiles ``Trainer.step`` (the program train.py runs) for the mesh of all devices, here 8
simulated CPU devices, and lists every collective of the compiled module: its kind, how
many arrays it carries and their bytes per device. Data parallelism should need one
all-reduce of the gradients a step (XLA combines the per-parameter all-reduces into one or a
few) and nothing else. From those bytes and the interconnects of ``hardware.SYSTEMS`` it
projects the all-reduce's bandwidth time on a TPU v4-32 and on 8 H100s, beside the step's
compute time at the device's peak (its FLOPs by XLA's cost analysis of the compiled module,
per device, scaled to the system's share of the global batch). ``--json`` prints the
figures as one JSON object instead.

The accelerators' compilers combine and schedule collectives by their own thresholds, so
the count there may differ; the bytes are those of the gradients whatever the grouping.
"""

from __future__ import annotations

import json
import math
import re

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from benchmarks import hardware
from diffusion_jax import train_lib, xla_flags

config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)", lock_config=True)
flags.DEFINE_bool("json", False, "print one JSON object rather than the table")
flags.mark_flags_as_required(["config"])

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
         "collective-broadcast")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}
_INSTRUCTION = re.compile(rf"^\s*(?:ROOT )?%?[\w.-]+ = (.+?) ({'|'.join(KINDS)})\(", re.MULTILINE)
_ARRAY = re.compile(rf"\b({'|'.join(_BYTES)})\[([\d,]*)\]")


def collectives(hlo_text: str) -> list[dict]:
    """The collectives of a compiled HLO module: kind, number of arrays, bytes per device."""
    found = []
    for result_type, kind in _INSTRUCTION.findall(hlo_text):
        arrays = _ARRAY.findall(result_type)
        nbytes = sum(_BYTES[dtype] * math.prod(int(n) for n in dims.split(",") if n)
                     for dtype, dims in arrays)
        found.append(dict(kind=kind, arrays=len(arrays), bytes=nbytes))
    return found


def analyze(config) -> dict:
    """Compile the train step of ``config`` over all devices: its collectives and FLOPs per device."""
    trainer = train_lib.Trainer(config)
    d = config.data
    batch = {"image": jax.ShapeDtypeStruct((config.train.batch_size, d.image_size, d.image_size, d.channels),
                                           jnp.float32, sharding=trainer.data_sharding)}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=trainer.replicated)
    state = trainer.abstract_state()
    compiled = trainer.step.lower(state, batch, rng).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    return dict(devices=jax.device_count(), batch_size=config.train.batch_size, parameters=params,
                collectives=collectives(compiled.as_text()), flops_per_device=float(cost["flops"]))


def project(analysis: dict) -> list[dict]:
    """Per system of ``hardware.SYSTEMS``, at the analysed global batch: all-reduce and compute seconds."""
    nbytes = sum(c["bytes"] for c in analysis["collectives"])
    flops_per_image = analysis["flops_per_device"] * analysis["devices"] / analysis["batch_size"]
    rows = []
    for system in hardware.SYSTEMS:
        peak = hardware.peak(system.device_kind)
        compute = flops_per_image * analysis["batch_size"] / system.devices
        rows.append(dict(system=system.name, devices=system.devices, bytes_per_s=system.bytes_per_s,
                         source=system.source, communication_s=system.all_reduce_seconds(nbytes),
                         compute_at_peak_s={"float32": compute / peak.float32,
                                            "bfloat16": compute / peak.bfloat16}))
    return rows


def main(argv):
    del argv
    xla_flags.set_defaults()  # before JAX starts its backends
    config = flags.FLAGS.config
    if jax.device_count() < 2:
        raise app.UsageError("one device has no collectives to show: run with "
                             "XLA_FLAGS=--xla_force_host_platform_device_count=8 (or on several "
                             "accelerators)")
    analysis = analyze(config)
    analysis["projection"] = project(analysis)
    if flags.FLAGS.json:
        print(json.dumps(analysis))
        return
    total = sum(c["bytes"] for c in analysis["collectives"])
    print(f"train step, global batch {analysis['batch_size']}, {analysis['devices']} {jax.default_backend()} "
          f"devices, {analysis['parameters']:,} parameters "
          f"({4 * analysis['parameters'] / 1e6:.1f} MB in float32)")
    print(f"{'collective':14} {'arrays':>6} {'MB per device':>14}")
    for c in analysis["collectives"]:
        print(f"{c['kind']:14} {c['arrays']:6d} {c['bytes'] / 1e6:14.2f}")
    print(f"{len(analysis['collectives'])} collective(s) a step, {total / 1e6:.2f} MB per device; "
          f"{analysis['flops_per_device'] / 1e9:.1f} GFLOP per device")
    print(f"\nat global batch {analysis['batch_size']}: all-reduce bandwidth time | compute at peak, "
          "float32 / bfloat16")
    for row in analysis["projection"]:
        at_peak = row["compute_at_peak_s"]
        print(f"{row['system']:36} {1e3 * row['communication_s']:7.2f} ms | "
              f"{1e3 * at_peak['float32']:6.2f} / {1e3 * at_peak['bfloat16']:6.2f} ms")
        print(f"  {row['source']}")


if __name__ == "__main__":
    app.run(main)
