"""The TensorBoard log of a short run, read back with TensorBoard's own event reader."""

import os
import time

import numpy as np
import pytest
import scripts
from etils import epath
from PIL import Image
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from diffusion_jax import summaries

TINY = os.path.join(scripts.ROOT, "tests", "tiny_config.py")


@pytest.mark.integration
def test_a_run_logs_scalars_loss_by_timestep_quarter_grids_as_images_hparams_and_a_profile(tmp_path):
    result = scripts.run("train.py", f"--config={TINY}", f"--workdir={tmp_path}",
                         "--config.train.num_steps=4", "--config.train.log_every=2",
                         "--config.sample.every=2", "--config.eval.num_samples=16",
                         "--config.train.profile_steps=10")  # more than the run has: it stops at the last
    assert f"profiled steps 2-4: {tmp_path / 'tensorboard'}" in result.stdout
    for step, share in ((2, "81%"), (4, "66%")):  # after each grid of the EMA: 0.9^step of it is the initial
        assert (f"note: after {step} steps the EMA parameters (optim.ema_decay = 0.9, without "
                f"optim.ema_warmup) still hold {share} of the random initial ones" in result.stdout)
    assert len(list((tmp_path / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))) == 1
    events = EventAccumulator(str(tmp_path / "tensorboard"),
                              size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()

    def scalars(tag):  # TensorBoard's scalar summaries are tensors of one value
        return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]

    quarters = ["loss_by_t/0-24", "loss_by_t/25-49", "loss_by_t/50-74", "loss_by_t/75-99"]  # T = 100
    assert (set(quarters + ["loss", "grad_norm", "lr", "swd/ema_model"])
            <= set(tags["tensors"])), tags["tensors"]
    for tag in quarters:
        steps, values = zip(*scalars(tag), strict=True)
        assert steps == (2, 4) and np.all(np.isfinite(values)) and min(values) > 0
    assert [step for step, _ in scalars("steps_per_sec")] == [2, 4]

    assert sorted(tags["images"]) == ["final", "samples"]
    grids = events.Images("samples")
    assert [e.step for e in grids] == [2, 4]
    on_disk = Image.open(tmp_path / "samples" / "step_00000004.png")
    assert (grids[-1].width, grids[-1].height) == on_disk.size == (104, 104)  # 8 16x16 digits, 3 columns, x2

    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    assert (start.hparams["optim.lr"].number_value == 1e-3
            and start.hparams["data.name"].string_value == "digits")


def test_a_resumed_run_replaces_the_steps_logged_after_its_checkpoint(tmp_path):
    """A run killed at step 7 after its checkpoint of step 5 logged 6 and 7; the resumed run logs them
    again, and TensorBoard shows each step once, with the resumed run's values."""
    first = summaries.Writer(epath.Path(tmp_path), purge_step=1)
    for step in range(1, 8):
        first.scalars(step, {"loss": step})
    first.close()
    time.sleep(1.1)  # the events file names order the files by their start, in seconds
    resumed = summaries.Writer(epath.Path(tmp_path), purge_step=6)
    for step in range(6, 10):
        resumed.scalars(step, {"loss": 10 * step})
    resumed.close()
    events = plugin_event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()  # the reader of TensorBoard's server (the legacy EventAccumulator purges no tensors)
    logged = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors("loss")]
    assert logged == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 60), (7, 70), (8, 80), (9, 90)]
