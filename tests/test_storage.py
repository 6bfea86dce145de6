"""Paths of every filesystem: URLs kept as they are, local paths made absolute, and the paths that cannot be
opened refused before anything is written.
"""

import os

import pytest
import scripts

from diffusion_jax import storage

TINY = os.path.join(scripts.ROOT, "tests", "tiny_config.py")


@pytest.mark.parametrize("script, args, message", [
    ("train.py", [f"--config={TINY}", "--workdir=ftp://host/run"], "ftp:// is not a filesystem"),
    ("train.py", [f"--config={TINY}", "--workdir=s3://bucket/run"], "Orbax checkpoints are written"),
    ("sample.py", ["--workdir=memory://run", "--out=out"], "memory:// is not a filesystem"),
    ("evaluate.py", ["--mode=fid", "--samples=ftp://host/samples.npz"], "ftp:// is not a filesystem"),
])
@pytest.mark.integration
def test_a_scheme_that_cannot_be_opened_is_an_error_before_writing(tmp_path, script, args, message):
    result = scripts.run(script, *args, expect=4, cwd=tmp_path)
    assert message in result.stderr, result.stderr[-2000:]
    assert scripts.local_files(tmp_path) == []


@pytest.mark.integration
def test_a_workdir_that_is_a_file_is_an_error(tmp_path):
    (tmp_path / "run").write_text("")
    result = scripts.run("train.py", f"--config={TINY}", f"--workdir={tmp_path / 'run'}", expect=4)
    assert "is a file, not a directory" in result.stderr, result.stderr[-2000:]


def test_local_paths_are_absolute_and_urls_kept():
    assert str(storage.path("gs://bucket/a/b")) == "gs://bucket/a/b"
    assert str(storage.path("relative/dir")) == os.path.join(os.getcwd(), "relative", "dir")
    assert str(storage.path("~/x")) == os.path.join(os.path.expanduser("~"), "x")
