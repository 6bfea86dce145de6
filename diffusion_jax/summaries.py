"""A run's TensorBoard log, ``WORKDIR/tensorboard``: scalars, images and the hyperparameters.

The events are TensorBoard's own protos, made by TensorBoard's own summary functions where it
has TensorFlow-free ones (``scalar_pb``, ``hparams_pb``) and, for images, as the PNG image
summary that its image dashboard reads; they are written as TFRecord event files with
TensorBoard's ``RecordWriter`` through ``etils.epath``, like every other file of a run, so a
gs:// workdir works on any host with the credentials the checkpoints use. Two kept writers were
tried and not taken: tensorboardX imports PyTorch wherever it is installed (as on most GPU
hosts: +370 MB resident in every training process, measured with ``benchmarks.compare``), and
clu's writers import TensorFlow (~5 s of every start) and reach gs:// only through TF's
filesystem. Process 0 writes; on the other processes every call does nothing.

A resumed run writes a new file that starts with TensorBoard's restart mark, a ``SessionLog``
START event at the first step it will log (what tf.summary's and tensorboardX's ``purge_step``
write): TensorBoard then drops the events of earlier files from that step on, which a run
killed after its last checkpoint had logged, so that every step is shown once.
"""

from __future__ import annotations

import os
import socket
import time

import jax
import numpy as np
from etils import epath
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams.summary_v2 import hparams_pb
from tensorboard.plugins.scalar.summary_v2 import scalar_pb
from tensorboard.summary.writer.record_writer import RecordWriter

from diffusion_jax import image_io


class Writer:
    """An events file of its own in ``directory`` (one per start of the run; TensorBoard reads them all)
    whose events replace those of earlier files from step ``purge_step`` on."""

    def __init__(self, directory: epath.Path, purge_step: int):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            directory.mkdir(parents=True, exist_ok=True)
            name = f"events.out.tfevents.{time.time():010.0f}.{socket.gethostname()}.{os.getpid()}.v2"
            self._records = RecordWriter((directory / name).open("wb"))
            self._write(Event(file_version="brain.Event:2"))
            self._write(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))

    def _write(self, event: Event) -> None:
        event.wall_time = time.time()
        self._records.write(event.SerializeToString())
        self._records.flush()

    def _summary(self, step: int, values: list) -> None:
        self._write(Event(step=step, summary=Summary(value=values)))

    def scalars(self, step: int, values: dict) -> None:
        """``{name: number}`` at ``step``."""
        if self.enabled:
            self._summary(step, [v for name, value in values.items()
                                 for v in scalar_pb(name, float(value)).value])

    def images(self, step: int, images: dict) -> None:
        """``{name: uint8 [H, W, C] image}`` at ``step`` (C = 1 or 3), PNG-encoded."""
        if self.enabled:
            self._summary(step, [Summary.Value(tag=name, image=Summary.Image(
                height=image.shape[0], width=image.shape[1], colorspace=image.shape[2],
                encoded_image_string=image_io.png_bytes(np.asarray(image))))
                for name, image in images.items()])

    def hparams(self, hparams: dict) -> None:
        """The run's settings (``{key: number, string or bool}``; others as strings) for the HParams
        dashboard, which shows them beside the run's scalars."""
        if self.enabled:
            values = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
            self._write(Event(summary=hparams_pb(values)))

    def close(self) -> None:
        if self.enabled:
            self._records.close()
