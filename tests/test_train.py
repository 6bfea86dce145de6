"""train.py end to end in subprocesses: devices, processes, preemption, resume and bad input.

Runs use tests/tiny_config.py (digits, a tiny U-Net, batch 8) and compare the parameters of
the final checkpoints.
"""

import functools
import importlib.util
import os
import random
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import scripts
from scripts import ROOT, environment

from diffusion_jax import builders, checkpoints, input_pipeline, sample_lib, train_lib
from diffusion_jax import config as config_lib
from diffusion_jax.errors import ConfigError

CONFIG = os.path.join(ROOT, "tests", "tiny_config.py")


def arguments(workdir, *overrides, config=CONFIG):
    return [f"--config={config}", f"--workdir={workdir}", *[f"--config.{o}" for o in overrides]]


def command(workdir, *overrides, config=CONFIG):
    return scripts.command("train.py", *arguments(workdir, *overrides, config=config))


def train(workdir, *overrides, flags=(), devices=1, expect=0):
    return scripts.run("train.py", *arguments(workdir, *overrides), *flags, devices=devices, expect=expect,
                       timeout=600)


def tiny_config(*overrides):
    spec = importlib.util.spec_from_file_location("tiny_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for override in overrides:
        key, value = override.split("=")
        section, name = key.split(".")
        config[section][name] = value
    return config


@functools.cache
def abstract_state(*overrides):
    return train_lib.Trainer(tiny_config(*overrides)).abstract_state()


def checkpoint(workdir, *overrides):
    """(step, TrainState) of a run's latest checkpoint, restored onto this process's one device."""
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        step = manager.latest_step()
        if step is None:
            return None, None
        return step, checkpoints.restore_state(manager, step, abstract_state(*overrides))


def assert_same_params(expected, got):
    """Equal within float32 tolerance (sums over devices differ in order; see tiny_config.py on eps)."""
    assert len(expected) == len(got)
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def params_of(state):
    return [np.asarray(p) for p in jax.tree_util.tree_leaves(state.params)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Eight uninterrupted steps on one device."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    train(workdir, "train.num_steps=8")
    return params_of(checkpoint(workdir)[1])


@pytest.mark.parametrize("warmup", [False, True])
def test_the_emas_share_of_the_initial_parameters_is_what_its_updates_leave(warmup):
    optim = config_lib.base().optim
    optim.update(ema_decay=0.99, ema_warmup=warmup)
    ema = 1.0  # the initial parameter 1, then parameters 0: the EMA is the initial share
    for step in range(200):
        ema = float(optax.incremental_update(0.0, ema, 1.0 - builders.ema_decay(optim, step)))
    np.testing.assert_allclose(builders.ema_initial_share(optim, 200), ema, rtol=1e-5)
    assert builders.ema_initial_share(optim, 0) == 1.0
    assert (builders.ema_notice(optim, 200) is None) == warmup  # 0.99^200 = 13%; with warmup ~1e-8


def test_one_and_eight_devices_train_the_same_parameters(reference, tmp_path):
    result = train(str(tmp_path), "train.num_steps=8", devices=8)
    assert "step 8/8" in result.stdout
    step, state = checkpoint(str(tmp_path))
    assert step == 8 and int(state.step) == 8
    assert_same_params(reference, params_of(state))


def test_checkpoint_restores_onto_a_different_device_count(reference, tmp_path):
    train(str(tmp_path), "train.num_steps=4", devices=8)
    result = train(str(tmp_path), "train.num_steps=8", devices=1)
    assert "resumed from the checkpoint of step 4" in result.stdout
    assert_same_params(reference, params_of(checkpoint(str(tmp_path))[1]))
    for num_steps in (8, 6):  # the finished run, and a num_steps below its checkpoint: said, not silent
        result = train(str(tmp_path), f"train.num_steps={num_steps}", devices=1)
        assert (f"the run is complete: its checkpoint of step 8 is at or past train.num_steps = {num_steps}, "
                "so there is nothing to train" in result.stdout), result.stdout


def test_kill_9_then_resume_equals_the_uninterrupted_run(reference, tmp_path):
    """kill -9 at a random moment (saves every 2 steps, asynchronously), restart, compare bit for bit."""
    workdir = str(tmp_path)
    args = ("train.num_steps=8", "train.checkpoint_every=2")
    rng = random.Random(0)
    for _attempt in range(3):
        process = subprocess.Popen(command(workdir, *args), env=environment(), stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
        for line in process.stdout:  # wait until training runs, then kill within the next steps
            if line.startswith("step "):
                break
        time.sleep(rng.uniform(0.0, 1.5))
        process.kill()
        process.wait()
        if os.path.isdir(os.path.join(workdir, "checkpoints")) and checkpoint(workdir)[0] is not None:
            break
    killed_at = checkpoint(workdir)[0]
    result = train(workdir, *args)
    if killed_at is not None and killed_at < 8:
        assert f"resumed from the checkpoint of step {killed_at}" in result.stdout
    step, state = checkpoint(workdir)
    assert step == 8
    for a, b in zip(reference, params_of(state), strict=True):
        np.testing.assert_array_equal(a, b)




@pytest.mark.integration
def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    """... and a restart that would repeat it (same settings, same checkpoint) is refused at once with
    status 3, so that a scheduler restarting on failure does not loop; a changed setting goes on."""
    workdir = str(tmp_path)
    train(workdir, "train.num_steps=2", "train.checkpoint_every=2")
    diverging = ("train.num_steps=50", "train.checkpoint_every=2", "optim.lr=1e30", "optim.warmup_steps=0")
    result = train(workdir, *diverging, flags=["--allow_config_change"], expect=3)
    line = one_line(result)
    assert line.startswith("error: non-finite loss or gradient at step"), line
    bad = int(line.split("at step ")[1].split(";")[0])
    logged = [int(line.split()[1].split("/")[0]) for line in result.stdout.splitlines()
              if line.startswith("step ")]
    # counted as the console counts: the last step logged came before
    assert bad >= 3 and logged[-1] == bad - 1
    step, state = checkpoint(workdir)
    assert step < bad and line.endswith(f"(last good checkpoint: step {step}, verified)"), line
    assert all(np.isfinite(p).all() for p in params_of(state))

    again = one_line(train(workdir, *diverging, flags=["--allow_config_change"], expect=3))
    stopped = line.removeprefix("error: ")
    assert again.startswith(f"error: this run stopped before with: {stopped}. Restarted unchanged it would "
                            "stop the same way, so it did not start: do not retry as is."), again
    assert checkpoint(workdir)[0] == step
    changed = train(workdir, "train.num_steps=6", "train.checkpoint_every=2", "optim.warmup_steps=0",
                    flags=["--allow_config_change"])
    assert f"resumed from the checkpoint of step {step}" in changed.stdout
    assert checkpoint(workdir)[0] == 6
    assert not os.path.exists(os.path.join(workdir, train_lib.NON_FINITE_STOP))


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.mark.integration
def test_two_processes_train_like_one_process_on_the_same_global_batches(tmp_path):
    """2 processes x 2 devices over 127.0.0.1 == 1 process x 4 devices fed the two halves' batches."""
    workdir, port = str(tmp_path / "distributed"), scripts.free_port()
    processes = [
        subprocess.Popen(command(workdir) + ["--distributed", f"--coordinator_address=127.0.0.1:{port}",
                                             "--num_processes=2", f"--process_id={i}"],
                         env=environment(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_out, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    reference = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "distributed_reference.py"),
                                CONFIG, str(tmp_path / "reference.npz")],
                               env=environment(4), capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = np.load(tmp_path / "reference.npz")
    assert_same_params([expected[f"leaf_{i}"] for i in range(len(expected.files))],
                       params_of(checkpoint(workdir)[1]))


def test_each_process_reads_a_disjoint_share():
    halves = [input_pipeline.load("digits", "train", image_size=16, process_index=i, process_count=2)
              for i in range(2)]
    whole = input_pipeline.load("digits", "train", image_size=16)
    assert len(halves[0]) + len(halves[1]) == len(whole)
    np.testing.assert_array_equal(np.concatenate(halves), whole)


def test_input_order_after_resume_equals_the_uninterrupted_order():
    images = input_pipeline.load("digits", "train", image_size=16)
    kwargs = dict(batch_size=64, seed=3, randflip=True)
    straight = input_pipeline.Prefetcher(images, 0, **kwargs)
    first = [next(straight) for _ in range(40)]  # 40 * 64 > 1500: crosses an epoch
    straight.close()
    resumed = input_pipeline.Prefetcher(images, 25, **kwargs)
    for step in range(25, 40):
        batch = next(resumed)
        np.testing.assert_array_equal(batch["image"], first[step]["image"])
        np.testing.assert_array_equal(batch["label"], first[step]["label"])
    resumed.close()
    seen = np.concatenate([input_pipeline.batch_indices(1500, 64, s, seed=3) for s in range(24)])
    assert len(np.unique(seen[:1500])) == 1500  # each epoch is a permutation


def test_an_error_in_the_input_thread_reaches_the_consumer():
    images = np.zeros((10, 16, 16, 1), np.uint8)
    prefetch = input_pipeline.Prefetcher(images, 0, batch_size=20, seed=0, randflip=False)  # 20 > 10 examples
    raised = []

    def consume():  # in a thread of its own, so that a consumer left waiting fails the test, not hangs it
        try:
            next(prefetch)
        except ValueError as e:
            raised.append(str(e))

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(timeout=60)
    prefetch.close()
    assert raised and raised[0].startswith("a batch of 20 images a process is more than the 10 training "
                                           "examples")


class _Exiting:
    """Images whose reading raises ``SystemExit`` (a BaseException, not an Exception)."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        raise SystemExit(7)


def test_a_base_exception_in_the_input_thread_reaches_the_consumer_at_once():
    prefetch = input_pipeline.Prefetcher(_Exiting(), 0, batch_size=4, seed=0, randflip=False)
    raised = []

    def consume():  # in a thread of its own, so that a consumer left waiting fails the test, not hangs it
        try:
            next(prefetch)
        except SystemExit as e:
            raised.append(e.code)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(timeout=30)
    prefetch.close()
    assert raised == [7]


@pytest.mark.integration
def test_a_batch_larger_than_the_dataset_stops_before_anything_is_written(tmp_path):
    """The 1,500 training digits cannot fill a batch of 2048: one line, status 2, no workdir."""
    workdir = tmp_path / "run"
    result = train(str(workdir), "train.batch_size=2048", expect=2)
    assert result.stderr.strip().splitlines() == [
        "error: a batch of 2048 images a process is more than the 1500 training examples this process holds: "
        "lower train.batch_size (the global batch of all processes)"]
    assert not workdir.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.unknown_key=1"], "unknown_key"),
        (["train.batch_size=eight"], "batch_size"),
        (["data.name=mnist"], "config.data.name = 'mnist' is not allowed: one of digits, cifar10"),
        (["model.ch_mult=(1,2,2,2,2,2)"], "config.data.image_size = 16 is not allowed: a multiple of 2^"),
        (["train.batch_size=12"],
         "config.train.batch_size = 12 is not allowed: a positive multiple of the 8 devices"),
        (["data.name=cifar10", "data.image_size=32", "data.channels=3", "data.data_dir=/nonexistent"],
         "dataset 'cifar10' is not prepared in /nonexistent"),
    ],
    ids=["unknown-key", "wrong-type", "unknown-dataset", "image-size", "batch-vs-devices", "dataset-offline"],
)
@pytest.mark.integration
def test_bad_input_fails_before_compiling_and_writes_nothing(tmp_path, overrides, message):
    workdir = tmp_path / "run"
    start = time.perf_counter()
    result = subprocess.run(command(str(workdir), *overrides), env=environment(8), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert not workdir.exists()
    assert time.perf_counter() - start < 60


@pytest.mark.integration
def test_resuming_with_a_different_network_is_refused(tmp_path):
    workdir = str(tmp_path)
    train(workdir, "train.num_steps=1")
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    result = train(workdir, "train.num_steps=2", "model.ch=64", "diffusion.var_type=learned_range",
                   "diffusion.loss_type=hybrid", expect=5)
    assert "different network: model.ch (32 in the checkpoint, 64 now), diffusion.var_type" in result.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


@pytest.mark.integration
def test_importance_sampled_kl_training_keeps_its_loss_history_across_a_resume(tmp_path):
    """improved DDPM's L_vlb with t importance-sampled: the history fills, is checkpointed and resumed,
    and a resume with another timestep sampler is refused."""
    workdir = str(tmp_path)
    settings = ["diffusion.loss_type=kl", "diffusion.timestep_sampler=loss-second-moment"]
    train(workdir, *settings, "train.num_steps=3", "train.checkpoint_every=3")
    step, state = checkpoint(workdir, *settings)
    assert step == 3 and int(state.loss_history.counts.sum()) == 3 * 8  # T = 100 rows of 10: none full yet
    result = train(workdir, *settings, "train.num_steps=5")
    assert "resumed from the checkpoint of step 3" in result.stdout
    step, state = checkpoint(workdir, *settings)
    assert step == 5 and int(state.loss_history.counts.sum()) == 5 * 8
    assert float(np.abs(state.loss_history.losses).sum()) > 0
    result = train(workdir, "diffusion.loss_type=kl", "train.num_steps=6", expect=2)
    assert ("trained with diffusion.timestep_sampler 'loss-second-moment', the config has 'uniform'"
            in result.stderr)


@pytest.mark.slow
def test_the_init_compiled_for_a_quick_compile_draws_the_same_parameters():
    c = tiny_config()
    trainer = train_lib.Trainer(c)
    fully_optimized = jax.jit(functools.partial(builders.init_state, c, trainer.model, trainer.tx))
    ours, reference = trainer.init(jax.random.PRNGKey(3)), fully_optimized(jax.random.PRNGKey(3))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(a, b)


def test_cifar10_config_is_the_papers_run():
    sys.path.insert(0, ROOT)
    from configs import cifar10

    c = cifar10.get_config()
    config_lib.validate(c, num_devices=8, num_processes=1)
    model = builders.make_model(c)
    shapes = jax.eval_shape(lambda: builders.init_state(c, model, builders.make_optimizer(c),
                                                          jax.random.PRNGKey(0)))
    assert sum(x.size for x in jax.tree_util.tree_leaves(shapes.params)) == 35_746_307
    assert (c.data.name, c.data.train_split, c.data.image_size, c.data.randflip) == (
        "cifar10", "train", 32, True)
    assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks, tuple(c.model.attn_resolutions),
            c.model.dropout) == (128, (1, 2, 2, 2), 2, (16,), 0.1)
    assert (c.diffusion.schedule, c.diffusion.num_timesteps, c.diffusion.beta_start,
            c.diffusion.beta_end) == ("linear", 1000, 1e-4, 0.02)
    assert (c.diffusion.mean_type, c.diffusion.var_type, c.diffusion.loss_type) == (
        "eps", "fixed_large", "mse")
    assert (c.optim.lr, c.optim.warmup_steps, c.optim.grad_clip, c.optim.beta1, c.optim.beta2,
            c.optim.eps) == (2e-4, 5000, 1.0, 0.9, 0.999, 1e-8)
    assert (c.optim.ema_decay, c.optim.ema_warmup) == (0.9999, False)
    assert (c.train.batch_size, c.train.num_steps) == (128, 800_000)
    lr = builders.learning_rate(c)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose([float(lr(2500)), float(lr(5000)), float(lr(100_000))], [1e-4, 2e-4, 2e-4],
                               rtol=1e-6)


@pytest.mark.parametrize("key, value, allowed", [
    ("optim.lr", -1.0, "> 0"), ("optim.warmup_steps", -5, ">= 0"), ("optim.grad_clip", -1.0, ">= 0"),
    ("model.matmul_precision", "fastest", "'default', 'high' or 'highest'")])
def test_a_bad_setting_is_refused_naming_its_key_alone(key, value, allowed):
    from configs import cifar10

    c = cifar10.get_config()
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError) as refused:
        config_lib.validate(c, num_devices=8, num_processes=1)
    assert str(refused.value).startswith(f"config.{key} = {value!r} is not allowed: {allowed}"), refused.value


def test_improved_ddpm_config_is_their_cifar10_run():
    sys.path.insert(0, ROOT)
    from test_schedule import improved_ddpm_steps

    from configs import cifar10_improved

    for objective, schedule_name, var_type, loss_type, timestep_sampler in (
            ("hybrid", "cosine", "learned_range", "hybrid", "uniform"),
            ("vlb", "cosine", "learned_range", "rescaled_kl", "loss-second-moment"),
            ("simple_linear", "linear_scaled", "fixed_large", "mse", "uniform"),
            ("simple_cosine", "cosine", "fixed_large", "mse", "uniform"),
            ("hybrid_linear", "linear_scaled", "learned_range", "hybrid", "uniform")):
        c = cifar10_improved.get_config(objective)
        config_lib.validate(c, num_devices=8, num_processes=1)
        d = c.diffusion
        assert (d.schedule, d.num_timesteps, d.mean_type, d.var_type, d.loss_type, d.hybrid_lambda,
                d.timestep_sampler) == (schedule_name, 4000, "eps", var_type, loss_type, 1e-3,
                                        timestep_sampler)
        assert (c.model.ch, c.model.num_res_blocks, tuple(c.model.attn_resolutions), c.model.dropout) == (
            128, 3, (16, 8), 0.3)
        assert (c.optim.lr, c.optim.warmup_steps, c.optim.grad_clip, c.train.batch_size,
                c.train.num_steps) == (1e-4, 0, 0.0, 128, 500_000)
        if objective in ("hybrid", "vlb"):
            model = builders.make_model(c)
            shapes = jax.eval_shape(lambda c=c, model=model: builders.init_state(
                c, model, builders.make_optimizer(c), jax.random.PRNGKey(0)))  # this iteration's c and model
            assert model.out_ch == 6  # eps and the variance interpolation v, per channel
            history = None if shapes.loss_history is None else shapes.loss_history.losses.shape
            assert history == (None if objective == "hybrid" else (4000, 10))
    sched = builders.make_schedule(c)
    for steps in (25, 50, 100):  # their space_timesteps(4000, str(steps))
        c.sample.steps = steps
        assert sample_lib.sampler_timesteps(c, sched).tolist() == improved_ddpm_steps(4000, [steps])
    with pytest.raises(ValueError, match="unknown objective 'l2'; allowed: hybrid, vlb, simple_linear"):
        cifar10_improved.get_config("l2")


def test_grad_clip_zero_is_adam_alone():
    """Improved DDPM's code does not clip: with grad_clip 0 the first update of a gradient of norm 1e3 is
    plain Adam's, and the optimizer state has the same structure as with clipping."""
    c = config_lib.base()
    params = {"w": jax.numpy.zeros(3)}
    grads = {"w": jax.numpy.array([600.0, -800.0, 0.0])}
    c.optim.update(grad_clip=0.0, warmup_steps=0)
    tx = builders.make_optimizer(c)
    unclipped = tx.update(grads, tx.init(params), params)[0]
    adam = optax.adam(c.optim.lr, b1=c.optim.beta1, b2=c.optim.beta2, eps=c.optim.eps)
    np.testing.assert_allclose(unclipped["w"], adam.update(grads, adam.init(params), params)[0]["w"])
    c.optim.grad_clip = 1.0
    clipped_tx = builders.make_optimizer(c)
    assert (jax.tree_util.tree_structure(clipped_tx.init(params))
            == jax.tree_util.tree_structure(tx.init(params)))
    clipped = clipped_tx.update({"w": grads["w"] * 1e-3 / 2}, clipped_tx.init(params), params)[0]
    np.testing.assert_allclose(clipped["w"], unclipped["w"], rtol=1e-5)  # Adam is scale-invariant


def test_a_checkpoints_digests_change_with_any_element_and_not_with_the_placement():
    tree = {"w": np.arange(24, dtype=np.float32).reshape(4, 6) / 7, "step": np.int32(3),
            "half": np.ones(5, jax.numpy.bfloat16)}
    saved = checkpoints.digests(tree)
    assert set(saved) == {"['w']", "['step']", "['half']"}
    for index in [(0, 0), (2, 3), (3, 5)]:
        changed = {**tree, "w": tree["w"].copy()}
        changed["w"][index] = np.nextafter(changed["w"][index], np.float32(np.inf))  # one bit of one element
        assert checkpoints.digests(changed) == {**saved, "['w']": checkpoints.digests(changed)["['w']"]}
        assert checkpoints.digests(changed)["['w']"] != saved["['w']"]
    swapped = {**tree, "w": tree["w"][::-1].copy()}  # the same values elsewhere
    assert checkpoints.digests(swapped)["['w']"] != saved["['w']"]
    placed = jax.device_put(tree, jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.asarray(jax.devices()), ("data",)), jax.sharding.PartitionSpec()))
    assert checkpoints.digests(placed) == saved
