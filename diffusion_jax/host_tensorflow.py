"""TensorFlow and tfds for the host's work (reading datasets, original TF checkpoints), imported on first use.

TensorFlow logs from C++ while its libraries load, before absl's logging is initialised, and
such lines reach stderr whatever ``TF_CPP_MIN_LOG_LEVEL`` says: "All log messages before
absl::InitializeLog() is called are written to STDERR" and, on CPUs where its oneDNN
operations are on by default (AVX-512 VNNI or BF16, AMX) or with ``TF_ENABLE_ONEDNN_OPTS=1``,
"oneDNN custom operations are on ...", twice. They would turn a one-line error of an entry
point into five lines on some CPUs and not on others. :func:`tensorflow` therefore imports
TensorFlow with the process's stderr (file descriptor 2, where C++ writes) sent to a
temporary file; the lines are passed to absl's logging at DEBUG level (``--verbosity=1``
shows them), or written back to stderr whole if the import fails. TensorFlow is then hidden
from the GPUs (it runs on the host only and must not take accelerator memory).

tfds imports TensorFlow lazily, at whichever call first needs it: :func:`tfds` imports
TensorFlow first, so that every tfds call runs after the quiet import.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

from absl import logging


@contextlib.contextmanager
def stderr_to_log(what: str):
    """Everything written to file descriptor 2 inside the block, by Python or native code, goes to
    absl's DEBUG log as ``what: <line>``; if the block raises, it goes to stderr as it was written."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read()
            if failed:
                os.write(2, text)
        for line in text.decode(errors="replace").splitlines():
            logging.debug("%s: %s", what, line)


def tensorflow():
    """The ``tensorflow`` module, imported quietly (see the module docstring) and kept off the GPUs."""
    if "tensorflow" not in sys.modules:
        with stderr_to_log("importing TensorFlow"):
            import tensorflow  # noqa: F401
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    return tf


def tfds():
    """The ``tensorflow_datasets`` module, after :func:`tensorflow`."""
    tensorflow()
    import tensorflow_datasets

    return tensorflow_datasets
