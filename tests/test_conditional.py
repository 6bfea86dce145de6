"""Class-conditional networks and classifier-free guidance from training to sample.py and evaluate.py.

The exact-denoiser tests of guidance itself are in test_guidance.py; here: the network's labels and
parameter counts, the label dropout of training, dynamic thresholding, the entry points on a tiny
conditional run, their errors, and the conditional quickstart judged by a classifier of real digits.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scripts
from PIL import Image

from diffusion_jax import builders, guidance, input_pipeline, sample_lib, samplers
from diffusion_jax import config as config_lib
from diffusion_jax.errors import ConfigError
from diffusion_jax.models.unet import PRESETS, UNet
from examples import digit_classes

TINY = f"--config={scripts.ROOT}/tests/tiny_config.py"
CONDITIONAL = ["--config.model.num_classes=10", "--config.diffusion.cond_drop_prob=0.1"]


def count(model, size):
    y = jnp.zeros((1,), jnp.int32) if model.num_classes else None
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                            jnp.zeros((1,), jnp.int32), y)
    return sum(x.size for x in jax.tree_util.tree_leaves(shapes))


def test_the_class_embedding_is_the_only_new_parameter():
    assert count(UNet(**PRESETS["ddpm_cifar10"]), 32) == 35_746_307  # the paper's network, unchanged
    # configs/cifar10_cond.py: an 11 x 512 label table (10 classes and "no class") added
    assert count(UNet(**PRESETS["ddpm_cifar10"], num_classes=10), 32) == 35_751_939 == 35_746_307 + 11 * 512


@pytest.mark.slow
def test_the_network_checks_its_labels():
    x, t = jnp.zeros((2, 8, 8, 3)), jnp.zeros((2,), jnp.int32)
    tiny = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
    with pytest.raises(ValueError, match="unconditional .* takes no labels"):
        jax.eval_shape(UNet(**tiny).init, jax.random.PRNGKey(0), x, t, t)
    conditional = UNet(**tiny, num_classes=3)
    with pytest.raises(ValueError, match="class-conditional .* give the labels y"):
        jax.eval_shape(conditional.init, jax.random.PRNGKey(0), x, t)
    with pytest.raises(ValueError, match=r"integers of shape \[B\] = \[2\]"):
        jax.eval_shape(conditional.init, jax.random.PRNGKey(0), x, t, jnp.zeros((2,)))
    params = conditional.init(jax.random.PRNGKey(0), x, t, t)["params"]
    assert params["label_emb"]["embedding"].shape == (4, 128)  # 3 classes and "no class"
    x = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # away from the near-zero output layer
    params["label_emb"]["embedding"] = jax.random.normal(jax.random.PRNGKey(2), (4, 128))
    outputs = [conditional.apply({"params": params}, x, t, jnp.full((2,), k)) for k in range(4)]
    scale = float(jnp.abs(outputs[0]).max())
    # each label its own output (differences ~100 float32 roundings of the output)
    assert all(float(jnp.abs(outputs[0] - o).max()) > 1e-5 * scale for o in outputs[1:])


def test_labels_are_dropped_with_the_configured_probability_and_seed():
    y = jnp.arange(100_000) % 10
    key = jax.random.PRNGKey(7)
    dropped = guidance.drop_labels(y, key, 0.1, 10)
    is_null = np.asarray(dropped == 10)
    # binomial(100000, 0.1): sd 95
    assert abs(is_null.sum() - 10_000) < 4 * 95, is_null.sum()
    np.testing.assert_array_equal(np.asarray(dropped)[~is_null], np.asarray(y)[~is_null])
    np.testing.assert_array_equal(dropped, guidance.drop_labels(y, key, 0.1, 10))  # stateless
    assert not np.array_equal(dropped, guidance.drop_labels(y, jax.random.PRNGKey(8), 0.1, 10))
    np.testing.assert_array_equal(guidance.drop_labels(y, key, 0.0, 10), y)


def test_dynamic_thresholding_is_the_quantile_rule():
    scales = np.array([0.3, 2.0, 5.0]).reshape(3, 1, 1, 1)
    x0 = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))) * scales
    ours = np.asarray(samplers.dynamic_threshold(jnp.asarray(x0), 0.9))
    for i in range(3):
        s = max(1.0, np.quantile(np.abs(x0[i]), 0.9))
        np.testing.assert_allclose(ours[i], np.clip(x0[i], -s, s) / s, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours[0], x0[0], rtol=1e-6)  # within [-1, 1] already: untouched
    assert np.abs(ours).max() <= 1.0 + 1e-6


def test_dpm_solver_with_dynamic_thresholding_keeps_each_x0_prediction_in_range():
    sched = builders.make_schedule(config_lib.base())
    x_T = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
    def model_fn(x, t):  # an eps whose x_0 is far outside [-1, 1], as under strong guidance
        return -3.0 * x

    steps = samplers.dpm_solver_timesteps(sched, 10, "logSNR")
    out = samplers.dpm_solver_sample(model_fn, sched, x_T, timesteps=steps, mean_type="eps",
                                     var_type="fixed_large", threshold=0.995, record=list(steps))
    predictions = np.asarray(out.pred_x0)
    assert np.abs(predictions).max() <= 1.0 + 1e-5 and np.abs(np.asarray(out.images)).max() <= 1.0 + 1e-5
    unclipped = samplers.dpm_solver_sample(model_fn, sched, x_T, timesteps=steps, mean_type="eps",
                                           var_type="fixed_large")
    assert np.abs(np.asarray(unclipped.images)).max() > 2
    with pytest.raises(ValueError, match="threshold must be in"):
        samplers.dpm_solver_sample(model_fn, sched, x_T, timesteps=steps, mean_type="eps",
                                   var_type="fixed_large", threshold=1.5)


def test_sampled_labels_are_checked_and_ordered():
    np.testing.assert_array_equal(sample_lib.in_order_labels(3, 6)(np.arange(6)), [0, 0, 1, 1, 2, 2])
    # a last batch past the total (20 samples in batches of 16) samples classes of the model
    np.testing.assert_array_equal(sample_lib.in_order_labels(10, 20)(np.arange(16, 32)),
                                  [8, 8, 9, 9, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    np.testing.assert_array_equal(sample_lib.cycle_labels(3)(np.arange(5)), [0, 1, 2, 0, 1])
    with pytest.raises(ConfigError, match="7 samples do not divide into equal numbers of the 3 classes"):
        sample_lib.in_order_labels(3, 7)
    with pytest.raises(ConfigError, match=r"class label 3 is outside the model's classes \[0, 3\)"):
        sample_lib.check_label(3, 3)
    with pytest.raises(ConfigError, match="unconditional"):
        sample_lib.check_label(0, 0)
    config = config_lib.base()
    config.model.num_classes = 3
    model = builders.make_model(config)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    generate = sample_lib.Generator(config, model, builders.make_schedule(config), mesh, labels=lambda j: j)
    with pytest.raises(ConfigError, match=r"class labels \[0, 1, 2, 3\] are outside"):
        generate.batch_labels(4, 0)
    with pytest.raises(ValueError, match="class-conditional .* give labels"):
        sample_lib.sample_images({}, jnp.zeros((1, 32, 32, 3)), None, model=model,
                                 sched=builders.make_schedule(config), config=config)


def test_a_conditional_network_needs_data_with_as_many_classes(tmp_path):
    input_pipeline.check_classes("digits", "train", 10)
    with pytest.raises(ConfigError, match="model.num_classes = 5, but 'digits' has 10 classes"):
        input_pipeline.check_classes("digits", "train", 5)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    with pytest.raises(ConfigError, match="has no classes .* one subfolder per class"):
        input_pipeline.check_classes(f"folder:{tmp_path}", "train", 2)


@pytest.mark.parametrize("overrides, message", [
    (["--config.sample.guidance=1.0"], "guidance needs model.num_classes > 0"),
    (["--config.diffusion.cond_drop_prob=0.1"], "0 for an unconditional network"),
    (["--config.model.num_classes=5"], "model.num_classes = 5, but 'digits' has 10 classes"),
    ([*CONDITIONAL, "--config.diffusion.cond_drop_prob=1.0"], "diffusion.cond_drop_prob"),
])
@pytest.mark.integration
def test_bad_conditional_settings_are_refused_before_training(tmp_path, overrides, message):
    result = scripts.run("train.py", TINY, f"--workdir={tmp_path}", *overrides, expect=2)
    assert message in result.stderr, result.stderr[-2000:]
    assert not os.listdir(tmp_path)  # nothing written


@pytest.fixture(scope="module")
def conditional_workdir(tmp_path_factory):
    """tests/tiny_config.py as a 10-class network, 5 steps, with a guided grid at the end."""
    workdir = tmp_path_factory.mktemp("conditional")
    scripts.run("train.py", TINY, f"--workdir={workdir}", *CONDITIONAL, "--config.sample.every=5",
                "--config.sample.num=20", "--config.sample.guidance=2.0")
    return workdir


def final_params(workdir, config) -> list[np.ndarray]:
    """The parameters of a run's latest checkpoint, restored onto this process's one device."""
    import orbax.checkpoint as ocp

    from diffusion_jax import checkpoints

    replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("data",)),
                                            jax.sharding.PartitionSpec())
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        state = checkpoints.restore_state(manager, manager.latest_step(),
                                          builders.abstract_state(config, replicated))
    return [np.asarray(p) for p in jax.tree_util.tree_leaves(state.params)]


@pytest.mark.integration
def test_one_and_eight_devices_train_the_same_conditional_parameters(tmp_path):
    """The labels are sharded with their images, and the dropped ones drawn from the step's key alone."""
    import importlib.util

    for devices in (1, 8):
        scripts.run("train.py", TINY, f"--workdir={tmp_path / str(devices)}", *CONDITIONAL,
                    "--config.train.num_steps=6", devices=devices)
    spec = importlib.util.spec_from_file_location("tiny_config", f"{scripts.ROOT}/tests/tiny_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.num_classes = 10
    one, eight = (final_params(tmp_path / str(devices), config) for devices in (1, 8))
    assert len(one) == len(eight)
    for a, b in zip(one, eight, strict=True):  # the tolerance of tests/test_train.py (see tiny_config.py)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_conditional_run_trains_and_draws_a_class_per_column(conditional_workdir):
    grid = np.asarray(Image.open(conditional_workdir / "samples" / "step_00000005.png"))
    # 20 images of 16x16 in 10 columns and 2 rows, 1-pixel gaps, enlarged twice
    assert grid.shape[:2] == (2 * (2 * 17 + 1), 2 * (10 * 17 + 1))
    saved = json.loads(next((conditional_workdir / "configs").iterdir()).read_text())
    assert saved["model"]["num_classes"] == 10 and saved["diffusion"]["cond_drop_prob"] == 0.1


def test_sample_py_draws_the_classes_asked_for(conditional_workdir, tmp_path):
    common = [f"--workdir={conditional_workdir}", "--steps=5"]
    # 30 samples in batches of 16: the last batch's two unused rows still take classes of the model
    result = scripts.run("sample.py", *common, f"--out={tmp_path / 'all'}", "--class_label=all",
                         "--guidance=1", "--num_samples=30", "--batch_size=16")
    # 0.9^5 of the EMA is still the initial network: said, with the way out
    assert ("note: after 5 steps the EMA parameters (optim.ema_decay = 0.9, without optim.ema_warmup) still "
            "hold 59% of the random initial ones, so their samples may look like noise; sample.py "
            "--params=raw samples the trained parameters" in result.stdout), result.stdout
    with np.load(tmp_path / "all" / "samples.npz") as f:
        assert f["arr_0"].shape == (30, 16, 16, 1)
        np.testing.assert_array_equal(f["labels"], np.repeat(np.arange(10), 3))
    grid = np.asarray(Image.open(tmp_path / "all" / "samples.png"))
    assert grid.shape[:2] == (2 * (10 * 17 + 1), 2 * (3 * 17 + 1))  # a row per class
    settings = json.loads((tmp_path / "all" / "sampling.json").read_text())
    assert settings["class_label"] == "all" and settings["guidance"] == 1.0
    scripts.run("sample.py", *common, f"--out={tmp_path / 'seven'}", "--class_label=7", "--num_samples=10",
                "--batch_size=10")
    with np.load(tmp_path / "seven" / "samples.npz") as f:
        np.testing.assert_array_equal(f["labels"], np.full(10, 7))


@pytest.mark.parametrize("args, message", [
    ([], "class-conditional (10 classes): give --class_label=K (0..9) or --class_label=all"),
    (["--class_label=10"], "class label 10 is outside the model's classes [0, 10)"),
    (["--class_label=-1"], "class label -1 is outside"),
    (["--class_label=seven"], "--class_label=seven is neither a class number nor 'all'"),
    (["--class_label=all", "--num_samples=15"], "15 samples do not divide into equal numbers of the 10"),
    (["--mode=progressive"], "samples in --mode=samples with --class_label, not in --mode=progressive"),
    (["--class_label=1", "--guidance=-1"], "--guidance"),
])
def test_bad_class_input_is_a_clear_error(conditional_workdir, tmp_path, args, message):
    result = scripts.run("sample.py", f"--workdir={conditional_workdir}", f"--out={tmp_path}", *args,
                         expect=2)
    assert message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "samples.npz").exists()


def test_the_guidance_sweep_writes_a_table_and_a_plot(conditional_workdir, tmp_path):
    """With a random-weight Inception and made-up reference statistics: the files and their rows."""
    from flax import traverse_util

    from diffusion_jax.evaluation import fid, inception

    weights = tmp_path / "inception.npz"
    flat = traverse_util.flatten_dict(inception.random_params())
    np.savez(weights, **{"/".join(k): np.asarray(v) for k, v in flat.items()})
    stats = tmp_path / "stats.npz"
    fid.save_statistics(str(stats), fid.Statistics(np.zeros(2048), np.eye(2048)))
    out = tmp_path / "sweep"
    result = scripts.run("evaluate.py", "--mode=guidance_sweep", f"--workdir={conditional_workdir}",
                         f"--out={out}", "--guidance_scales=0,2", "--num_samples=10", "--batch_size=10",
                         f"--inception_weights={weights}", f"--reference_stats={stats}")
    assert "w = 2: FID" in result.stdout
    table = json.loads((out / "guidance_sweep.json").read_text())
    assert [row["guidance"] for row in table["rows"]] == [0.0, 2.0]
    assert all(np.isfinite(row["fid"]) and row["num_samples"] == 10 for row in table["rows"])
    assert (out / "guidance_sweep.md").read_text().count("\n") == 4  # a header, a rule and two rows
    assert (out / "guidance_sweep.png").stat().st_size > 0
    with np.load(out / "w_2" / "samples.npz") as f:
        np.testing.assert_array_equal(f["labels"], np.arange(10))  # every class in turn
    result = scripts.run("evaluate.py", "--mode=guidance_sweep", f"--workdir={conditional_workdir}",
                         f"--out={tmp_path / 'x'}", "--guidance_scales=0,-1", expect=2)
    assert "--guidance_scales=0,-1 must be numbers >= 0" in result.stderr


@pytest.fixture(scope="module")
def digit_classifier():
    """examples/digit_classes.py's judge, and its accuracy on the held-out digits (95%)."""
    return digit_classes.digit_classifier()


def recognised(classifier, out) -> float:
    return digit_classes.recognised(classifier, out / "samples.npz")


@pytest.mark.integration
def test_the_conditional_quickstart_draws_the_digit_asked_for(digit_classifier, tmp_path):
    """configs/quickstart_cond.py trained as the README runs it (its grids and figure left out): at w = 1
    at least 80% of 100 samples per digit are recognised as that digit by a classifier of real digits;
    fewer at w = 0 and about a tenth of the untrained network's (20 samples per digit each: the
    README's 85.6% and 10.0%, with a standard error of ~2.5 points at 200 samples)."""
    classifier, accuracy = digit_classifier
    assert accuracy > 0.93  # the judge itself
    workdir = tmp_path / "run"
    scripts.run("train.py", f"--config={scripts.ROOT}/configs/quickstart_cond.py", f"--workdir={workdir}",
                "--config.sample.every=0", "--config.eval.num_samples=0", timeout=1200)
    # w = 1: the README's command as written (its default --batch_size, 64, does not divide 1000)
    scripts.run("sample.py", f"--workdir={workdir}", f"--out={tmp_path / 'w=1'}", "--class_label=all",
                "--guidance=1", "--num_samples=1000")
    scripts.run("sample.py", f"--workdir={workdir}", f"--out={tmp_path / 'w=0'}", "--class_label=all",
                "--num_samples=200", "--batch_size=200", "--guidance=0")
    fractions = {name: recognised(classifier, tmp_path / name) for name in ("w=1", "w=0")}
    # the untrained network: a one-step run, whose only step has learning rate 0 (warmup from 0)
    scripts.run("train.py", f"--config={scripts.ROOT}/configs/quickstart_cond.py",
                f"--workdir={tmp_path / 'untrained'}", "--config.train.num_steps=1",
                "--config.sample.every=0", "--config.eval.num_samples=0")
    scripts.run("sample.py", f"--workdir={tmp_path / 'untrained'}", f"--out={tmp_path / 'untrained_samples'}",
                "--class_label=all", "--num_samples=200", "--batch_size=200", "--guidance=1")
    fractions["untrained"] = recognised(classifier, tmp_path / "untrained_samples")
    assert fractions["w=1"] >= 0.8 and fractions["w=0"] < fractions["w=1"], fractions
    assert fractions["untrained"] < 0.3, fractions  # chance is 0.1: the check can tell
    # the README's command for the figure
    figure = [sys.executable, "examples/digit_classes.py", str(tmp_path / "w=1" / "samples.npz")]
    shown = subprocess.run(figure, cwd=scripts.ROOT, capture_output=True, text=True, check=True).stdout
    assert shown.startswith(f"{fractions['w=1']:.1%} of the samples are recognised as the digit they were "
                            f"drawn as (an SVM on the real training digits, {accuracy:.1%} right"), shown
