"""Training on the user's own images: train.py through ``folder:`` and ``prepared:``, and the errors a
bad source gives before anything is compiled or written."""

import json
import os
import subprocess

import numpy as np
import pytest
import scripts
from PIL import Image
from test_errors import one_line_error

from diffusion_jax import prepare_data

pytestmark = pytest.mark.integration

TINY = os.path.join(scripts.ROOT, "tests", "tiny_config.py")


def write_mixed_folder(root, count=300):
    """``count`` images of mixed sizes and modes in 3 class subfolders (PNG, JPEG, WebP)."""
    rng = np.random.default_rng(0)
    classes = ("circles", "lines", "squares")
    for i in range(count):
        h, w = rng.integers(12, 48, size=2)
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        mode, suffix = [("RGB", "png"), ("L", "jpg"), ("RGBA", "webp"), ("P", "png")][i % 4]
        image = image.convert(mode)
        directory = root / classes[i % 3]
        directory.mkdir(parents=True, exist_ok=True)
        image.save(directory / f"{i:04d}.{suffix}")


def train(workdir, *overrides, expect=0):
    return scripts.run("train.py", f"--config={TINY}", f"--workdir={workdir}",
                       *[f"--config.{o}" for o in overrides], expect=expect, timeout=600)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_mixed_folder(root)
    return root


def test_a_folder_trains_directly_and_once_prepared(images, tmp_path):
    prepared = tmp_path / "prepared"
    assert prepare_data.main([f"--source=folder:{images}", "--image_size=16", f"--out={prepared}",
                              "--images_per_shard=128"]) == 0
    metadata = json.loads((prepared / "train.json").read_text())
    assert (metadata["num_examples"], metadata["classes"]) == (300, ["circles", "lines", "squares"])
    warning = (f"warning: data.name = 'folder:{images}' is one set of images, so the held-out figures "
               "(eval.num_samples, eval.nll_images) are computed on training images; name other images with "
               "--config.data.eval_name=folder:PATH")
    # the folder's "held-out" figure is said to be of its training images; prepared records are held out
    # against another source, data.eval_name (the folder here: they hold no test split)
    for name, held_out in ((f"folder:{images}", []),
                           (f"prepared:{prepared}", [f"data.eval_name=folder:{images}"])):
        workdir = tmp_path / name.split(":")[0]
        result = train(workdir, f"data.name={name}", "data.channels=3", "train.num_steps=20",
                       "train.log_every=10", "eval.num_samples=16", *held_out)
        assert "step 20/20" in result.stdout, result.stdout[-2000:]
        assert (workdir / "checkpoints" / "20").is_dir()
        assert "sliced Wasserstein distance to 16 held-out images" in result.stdout, result.stdout[-2000:]
        assert (warning in result.stderr) == (not held_out), result.stderr[-2000:]


@pytest.mark.parametrize("make, message", [
    (lambda d: d.mkdir(), "no images"),
    (lambda d: (d.mkdir(), (d / "notes.txt").write_text("x\n")), "no images"),
    (lambda d: None, "no such directory"),
])
def test_a_bad_folder_stops_before_anything_is_written(tmp_path, make, message):
    make(tmp_path / "data")
    result = train(tmp_path / "run", f"data.name=folder:{tmp_path / 'data'}", "data.channels=3", expect=6)
    line = one_line_error(result, 6)
    assert message in line and str(tmp_path / "data") in line, line
    assert not (tmp_path / "run").exists()


def test_an_unknown_tfds_name_and_a_missing_prepared_split_stop_before_anything_is_written(tmp_path):
    for name, message in (("tfds:no_such_images_here", "tfds has no dataset 'no_such_images_here'"),
                          (f"prepared:{tmp_path}", "holds no prepared split 'train'")):
        result = train(tmp_path / "run", f"data.name={name}", "data.channels=3", expect=6)
        assert message in one_line_error(result, 6)
        assert not (tmp_path / "run").exists()
    result = subprocess.run(scripts.command("train.py", f"--config={TINY}", f"--workdir={tmp_path / 'run'}",
                                            "--config.data.name=ftp:images"),
                            env=scripts.environment(1), capture_output=True, text=True, timeout=300)
    assert "config.data.name = 'ftp:images' is not allowed: one of digits" in one_line_error(result, 2)
