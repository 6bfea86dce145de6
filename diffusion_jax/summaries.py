"""A run's TensorBoard log, ``WORKDIR/tensorboard``: scalars, images and the hyperparameters.

The summaries are built by tensorboardX (``tensorboardX.summary``: the protos that TensorBoard's
scalar, image and hparams dashboards read, images PNG-encoded) and written as TFRecord event
files through ``etils.epath``, like every other file of a run, so that a gs:// workdir works on
any host with the credentials the checkpoints use. (tensorboardX's own writer opens gs:// with
another client and uploads the whole file again at each flush; clu's writers import TensorFlow,
~5 s of every start, and reach gs:// through TF's filesystem only.) Process 0 writes; on the
other processes every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time

import jax
import numpy as np
from etils import epath
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboardX import summary
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary


class Writer:
    """An events file of its own in ``directory`` (one per start of the run; TensorBoard reads them all)."""

    def __init__(self, directory: epath.Path):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            directory.mkdir(parents=True, exist_ok=True)
            name = f"events.out.tfevents.{time.time():010.0f}.{socket.gethostname()}.{os.getpid()}.v2"
            self._records = RecordWriter((directory / name).open("wb"))
            self._write(Event(file_version="brain.Event:2"))

    def _write(self, event: Event) -> None:
        event.wall_time = time.time()
        self._records.write(event.SerializeToString())
        self._records.flush()

    def _summary(self, step: int, values) -> None:
        self._write(Event(step=step, summary=Summary(value=[v for s in values for v in s.value])))

    def scalars(self, step: int, values: dict) -> None:
        """``{name: number}`` at ``step``."""
        if self.enabled:
            self._summary(step, [summary.scalar(name, float(value)) for name, value in values.items()])

    def images(self, step: int, images: dict) -> None:
        """``{name: uint8 [H, W, C] image}`` at ``step`` (C = 1 or 3)."""
        if self.enabled:
            self._summary(step, [summary.image(name, np.asarray(image), dataformats="HWC")
                                 for name, image in images.items()])

    def hparams(self, hparams: dict, metrics: tuple[str, ...]) -> None:
        """The run's settings (``{key: number, string or bool}``) for the HParams dashboard, which shows
        them beside the last values of the scalars ``metrics``."""
        if self.enabled:
            values = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
            for proto in summary.hparams(values, {name: 0.0 for name in metrics}):
                self._write(Event(summary=proto))

    def close(self) -> None:
        if self.enabled:
            self._records.close()
