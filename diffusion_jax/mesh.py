"""The project's one device layout: a one-axis mesh ``data`` over the devices, on which batches are
sharded and parameters replicated (data parallelism over every device of every process)."""

import jax
import numpy as np
from jax.sharding import Mesh


def data_mesh(devices=None) -> Mesh:
    """``Mesh(devices, ('data',))`` over ``devices`` in their order (default: every device of every
    process, ``jax.devices()``)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))
