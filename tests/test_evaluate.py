"""evaluate.py, sample.py --fid and evaluation during training, end to end with a random-weight Inception."""

import json
import os

import numpy as np
import pytest
import scripts
from flax import traverse_util

from diffusion_jax import input_pipeline
from diffusion_jax.evaluation import inception
from diffusion_jax.evaluation.sliced_wasserstein import pixel_distance

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fid_files(tmp_path_factory):
    """Random Inception weights in the --convert format, and reference statistics of the digits' test
    split."""
    directory = tmp_path_factory.mktemp("fid")
    weights = str(directory / "inception.npz")
    flat = traverse_util.flatten_dict(inception.random_params())
    np.savez(weights, **{"/".join(k): np.asarray(v) for k, v in flat.items()})
    stats = str(directory / "digits_test.npz")
    result = scripts.run("evaluate.py", "--mode=reference_stats", "--dataset=digits", "--split=test",
                         f"--inception_weights={weights}", f"--reference_stats={stats}")
    assert "computing the FID statistics of digits/test" in result.stdout
    with np.load(stats) as f:
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048)
    return weights, stats


def test_sample_with_fid_then_evaluate_the_file(quickstart_workdir, fid_files, tmp_path):
    weights, stats = fid_files
    result = scripts.run("sample.py", f"--workdir={quickstart_workdir}", f"--out={tmp_path}",
                         "--num_samples=20", "--batch_size=10", "--steps=10", "--fid",
                         f"--inception_weights={weights}", f"--reference_stats={stats}")
    assert "FID " in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0 and metrics["num_samples"] == 20
    assert metrics["inception_score"] >= 1.0
    result = scripts.run("evaluate.py", "--mode=fid", f"--samples={tmp_path / 'samples.npz'}",
                         f"--inception_weights={weights}", f"--reference_stats={stats}")
    again = json.loads((tmp_path / "samples_metrics.json").read_text())
    assert again["fid"] == pytest.approx(metrics["fid"], rel=1e-9)


def test_nll_mode_writes_the_bound_and_the_rate_distortion_curve(quickstart_workdir, tmp_path):
    result = scripts.run("evaluate.py", "--mode=nll", f"--workdir={quickstart_workdir}", f"--out={tmp_path}",
                         "--num_images=8", "--batch_size=8")
    assert "bits/dim" in result.stdout
    values = json.loads((tmp_path / "nll.json").read_text())
    assert values["num_images"] == 8 and 0 < values["nll_bpd"] < 8
    with np.load(tmp_path / "rate_distortion.npz") as f:
        assert f["rate"].shape == f["distortion"].shape == (1000,)
        np.testing.assert_allclose(f["rate"][0], values["nll_bpd"], rtol=1e-5)
    assert (tmp_path / "rate_distortion.png").stat().st_size > 0


def test_training_evaluates_fid_and_nll_periodically(fid_files, tmp_path):
    weights, stats = fid_files
    result = scripts.run("train.py", f"--config={scripts.ROOT}/tests/tiny_config.py", f"--workdir={tmp_path}",
                         "--config.train.num_steps=4", "--config.eval.every=2",
                         "--config.eval.fid_samples=16", "--config.eval.nll_images=8",
                         "--config.eval.batch_size=8", f"--config.eval.inception_weights={weights}",
                         f"--config.eval.reference_stats={stats}")
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("step ") and " FID " in line] == ["2:", "4:"]
    assert [line.split()[1] for line in lines if line.startswith("step ") and " NLL " in line] == ["2:", "4:"]
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(os.path.join(tmp_path, "tensorboard")).Reload()
    assert {"eval/fid", "eval/inception_score", "eval/nll_bpd"} <= set(events.Tags()["tensors"])
    assert [e.step for e in events.Tensors("eval/fid")] == [2, 4]


@pytest.mark.parametrize("args, message, status", [
    (["--mode=fid"], "--mode=fid needs --samples", 2),
    (["--mode=nll", "--samples=x.npz", "--out=o"], "--samples applies to --mode=fid", 2),
    (["--mode=fid", "--samples=/nonexistent.npz"], "no sample file", 6),
    (["--mode=reference_stats", "--dataset=lsun_cat"], "needs --image_size", 2),
])
def test_bad_evaluate_input_is_a_clear_error(args, message, status):
    result = scripts.run("evaluate.py", *args, expect=status)
    assert message in result.stderr


def test_the_sliced_wasserstein_mode_scores_a_samples_file_against_a_dataset(tmp_path):
    test = input_pipeline.load("digits", "test", image_size=16, channels=1)
    train = input_pipeline.load("digits", "train", image_size=16, channels=1)
    samples = tmp_path / "samples.npz"
    np.savez(samples, test)
    # the README's command (all the images), then --num_images
    first_100 = pixel_distance(test[:100], train[:100])
    cases = (("test", [], 0.0, len(test)), ("train", ["--num_images=100"], first_100, 100))
    for split, num_images, expected, n in cases:
        result = scripts.run("evaluate.py", "--mode=sliced_wasserstein", f"--samples={samples}",
                             "--dataset=digits", f"--split={split}", *num_images)
        assert (f"sliced Wasserstein distance between {n} samples and {n} images of digits/{split} "
                f"(pixel space, lower is better): {expected:.4f}") in result.stdout, result.stdout
        saved = json.loads((tmp_path / "samples_swd.json").read_text())
        assert saved == {"sliced_wasserstein": pytest.approx(expected, abs=1e-12), "num_images": n,
                         "dataset": "digits", "split": split}
    assert expected > 0.05  # samples of the test digits are nearer their own images than the training ones
