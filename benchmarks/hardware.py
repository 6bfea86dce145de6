"""Published peak figures of the accelerators the benchmarks relate their measurements to.

Peak FLOP/s are dense (no structured sparsity), per JAX device. A float32 matmul or
convolution at JAX's default precision runs on the tensor cores as TF32 on A100, H100 and
H200, and as one bfloat16 pass on TPUs (jax-ml/jax#18934), so float32's peak is TF32's on
those GPUs and bfloat16's on TPUs. On TPU v4 and v5p one JAX device is a chip (two
TensorCores as one "megacore").

Sources: NVIDIA's A100 (2021), H100 (2023) and H200 (2024) datasheets, whose tensor-core
figures are quoted "with sparsity" and halved here; Google Cloud's TPU v4, v5e, v5p and v6e
system-architecture pages (cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Peak:
    name: str
    bfloat16: float  # FLOP/s per device
    float32: float  # FLOP/s per device at JAX's default precision (see above)


# (substring of jax.Device.device_kind, lower case; the first that matches is taken)
PEAKS = (
    ("a100", Peak("NVIDIA A100", 312e12, 156e12)),
    ("h100 pcie", Peak("NVIDIA H100 PCIe", 756e12, 378e12)),
    ("h100 nvl", Peak("NVIDIA H100 NVL", 835e12, 418e12)),
    ("h100", Peak("NVIDIA H100 SXM", 989e12, 494e12)),
    ("h200", Peak("NVIDIA H200", 989e12, 494e12)),
    ("tpu v4", Peak("TPU v4", 275e12, 275e12)),
    ("tpu v5 lite", Peak("TPU v5e", 197e12, 197e12)),
    ("tpu v5e", Peak("TPU v5e", 197e12, 197e12)),
    ("tpu v5", Peak("TPU v5p", 459e12, 459e12)),  # "TPU v5" and "TPU v5p"
    ("tpu v6 lite", Peak("TPU v6e", 918e12, 918e12)),
    ("tpu v6e", Peak("TPU v6e", 918e12, 918e12)),
)


def peak(device_kind: str) -> Peak | None:
    """The peak of the device JAX calls ``device_kind`` ("NVIDIA H100 80GB HBM3", "TPU v5 lite"), or None."""
    kind = device_kind.lower()
    return next((p for key, p in PEAKS if key in kind), None)


@dataclasses.dataclass(frozen=True)
class Interconnect:
    """A system's links between devices, as an all-reduce over all of them uses them."""

    name: str
    device_kind: str  # as jax.Device.device_kind names it, for ``peak``
    devices: int
    bytes_per_s: float  # one direction, into (and out of) each device, along the all-reduce's ring
    source: str

    def all_reduce_seconds(self, nbytes: float) -> float:
        """Bandwidth time of a ring all-reduce of ``nbytes`` per device: each device sends and receives
        2 (n - 1) / n of the buffer (a reduce-scatter, then an all-gather). Latency is left out."""
        n = self.devices
        return 2 * (n - 1) / n * nbytes / self.bytes_per_s


SYSTEMS = (
    Interconnect("TPU v4-32 (16 chips, 4 hosts)", "TPU v4", 16, 2 * 45e9,
                 "ICI: 45 GB/s one way per link (How to Scale Your Model, part 2: "
                 "jax-ml.github.io/scaling-book/tpus); "
                 "a bidirectional ring over the 16 chips uses two links' worth; the 2x2x4 slice's other "
                 "axes can run rings at the same time, so this is the slow end"),
    Interconnect("8x H100 SXM (NVLink 4, NVSwitch)", "NVIDIA H100 80GB HBM3", 8, 450e9,
                 "NVLink 4: 900 GB/s per GPU both directions together (NVIDIA H100 datasheet), 450 GB/s one "
                 "way"),
)
