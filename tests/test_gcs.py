"""train.py, resume, sample.py and evaluate.py with every file on gs://, and none on the local disk.

The bucket is the emulator's of ``gcs_emulator`` (the ``bucket`` fixture). The working directory,
HOME and TMPDIR are empty directories that must stay empty. (JAX's compilation cache of the
test session is a local directory the tests choose.)
"""

import io
import json
import os

import gcs_emulator
import numpy as np
import pytest
import scripts
from flax import traverse_util
from gcs_emulator import download, objects, upload

from diffusion_jax.evaluation import inception

pytestmark = pytest.mark.integration

TINY = os.path.join(scripts.ROOT, "tests", "tiny_config.py")


def test_train_resume_sample_and_evaluate_on_gs_write_nothing_locally(bucket, tmp_path):
    cwd, home, tmp = (tmp_path / name for name in ("cwd", "home", "tmp"))
    for directory in (cwd, home, tmp):
        directory.mkdir()
    env = gcs_emulator.environment(bucket, HOME=str(home), TMPDIR=str(tmp))

    def run(script, *args):
        return scripts.run(script, *args, cwd=cwd, timeout=600, **env)

    train = [f"--config={TINY}", "--workdir=gs://bucket/run", "--config.train.checkpoint_every=2",
             "--config.sample.every=2"]
    run("train.py", *train, "--config.train.num_steps=2")
    result = run("train.py", *train, "--config.train.num_steps=4")
    assert "resumed from the checkpoint of step 2 in gs://bucket/run" in result.stdout
    written = objects(bucket)
    for step in (2, 4):
        assert f"run/checkpoints/{step}/commit_success.txt" in written
        assert f"run/samples/step_{step:08d}.png" in written
    assert sum(name.startswith("run/tensorboard/events.out.tfevents") for name in written) == 2

    run("sample.py", "--workdir=gs://bucket/run", "--out=gs://bucket/out", "--num_samples=16",
        "--batch_size=8", "--steps=4", "--seed=1")
    with np.load(io.BytesIO(download(bucket, "out/samples.npz"))) as f:
        samples = f["arr_0"]
    assert samples.shape == (16, 16, 16, 1) and samples.dtype == np.uint8

    weights = io.BytesIO()
    np.savez(weights, **{"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(
        inception.random_params()).items()})
    upload(bucket, "inception.npz", weights.getvalue())
    run("evaluate.py", "--mode=fid", "--dataset=digits", "--split=test", "--inception_weights=gs://bucket/inception.npz",
        "--reference_stats=gs://bucket/digits_test.npz", "--samples=gs://bucket/out/samples.npz")
    metrics = json.loads(download(bucket, "out/samples_metrics.json"))
    assert np.isfinite(metrics["fid"]) and "digits_test.npz" in objects(bucket)

    assert scripts.local_files(cwd, home, tmp) == []
