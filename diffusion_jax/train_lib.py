"""Training: the train state, the pure train step, and the loop around it.

One program for one CPU, eight GPUs or a TPU pod: a one-axis ``Mesh('data')`` over every
device of every process; the global batch is sharded on ``data``, the state replicated and
donated. Randomness is stateless: step s draws from ``fold_in(key, s)``, and the data of
step s is a function of (seed, step) (see ``input_pipeline``), so a resumed run continues
exactly the interrupted one.

Checkpoints (Orbax, async) hold step, params, EMA params and optimizer state (and the loss
history when t is importance-sampled), with the config beside them; a run with the same
``workdir`` resumes from the latest complete one, onto any number of devices. SIGTERM saves
the current step and exits cleanly. A non-finite loss or gradient leaves the parameters
untouched and stops the run at the next check (every ``log_every`` steps and before each
save), naming the step.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.scalar.summary_v2 import scalar_pb
from tensorboard.summary.writer.record_writer import RecordWriter

from diffusion_jax import config as config_lib
from diffusion_jax import (
    errors,
    image_io,
    input_pipeline,
    losses,
    run_lock,
    sample_lib,
    schedule,
    storage,
    timestep_sampler,
)
from diffusion_jax.errors import CheckpointError, ConfigError, NonFiniteError, StorageError
from diffusion_jax.evaluation.sliced_wasserstein import sliced_wasserstein
from diffusion_jax.models.unet import UNet

# the keys of a config that fix the shapes of the parameters
NETWORK_KEYS = ("model.ch", "model.ch_mult", "model.num_res_blocks", "model.attn_resolutions",
                "model.resamp_with_conv", "data.channels", "diffusion.var_type")


class TrainState(NamedTuple):
    step: jnp.ndarray  # int32 []
    params: Any
    ema_params: Any
    opt_state: Any
    bad_step: jnp.ndarray  # int32 [], the first step with a non-finite loss or gradient, -1 if none
    loss_history: Any = None  # timestep_sampler.LossHistory with diffusion.timestep_sampler 'loss-second-moment'


def make_model(config) -> UNet:
    m = config.model
    return UNet(ch=m.ch, out_ch=config_lib.out_channels(config), ch_mult=tuple(m.ch_mult),
                num_res_blocks=m.num_res_blocks, attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
                resamp_with_conv=m.resamp_with_conv, dtype=jnp.dtype(m.dtype))


def make_schedule(config) -> schedule.Schedule:
    d = config.diffusion
    return schedule.make_schedule(d.schedule, d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end)


def learning_rate(config):
    """Linear warmup from 0 over ``warmup_steps``, then constant (the DDPM code's schedule)."""
    o = config.optim
    return optax.linear_schedule(0.0, o.lr, o.warmup_steps) if o.warmup_steps else optax.constant_schedule(o.lr)


def make_optimizer(config) -> optax.GradientTransformation:
    o = config.optim
    return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                       optax.adam(learning_rate(config), b1=o.beta1, b2=o.beta2, eps=o.eps))


def init_state(config, model: UNet, tx, rng) -> TrainState:
    shape = (1, config.data.image_size, config.data.image_size, config.data.channels)
    params = model.init(rng, jnp.zeros(shape), jnp.zeros((1,), jnp.int32))["params"]
    d = config.diffusion
    history = timestep_sampler.init_history(d.num_timesteps) if d.timestep_sampler != "uniform" else None
    return TrainState(jnp.zeros((), jnp.int32), params, params, tx.init(params), jnp.full((), -1, jnp.int32),
                      history)


def train_step(state: TrainState, batch, rng, *, model: UNet, sched: schedule.Schedule, tx, config):
    """One step of DDPM Algorithm 1 with Adam, clipping and the parameter EMA.

    With ``diffusion.timestep_sampler = 'loss-second-moment'`` t is importance-sampled from the
    loss history and each example's loss weighted by 1 / (T p_t) (improved DDPM section 3.3).
    """
    dropout_rng, diffusion_rng = jax.random.split(jax.random.fold_in(rng, state.step))
    d = config.diffusion
    lr = learning_rate(config)(state.step)
    t_rng, noise_rng = jax.random.split(diffusion_rng)
    if state.loss_history is None:
        t = jax.random.randint(t_rng, (batch.shape[0],), 0, sched.num_timesteps)
        weights = jnp.ones((batch.shape[0],))
    else:
        t, weights = timestep_sampler.sample(state.loss_history, t_rng, batch.shape[0])
    noise = jax.random.normal(noise_rng, batch.shape, batch.dtype)

    def loss_fn(params):
        def model_fn(x, t):
            return model.apply({"params": params}, x, t, train=True, rngs={"dropout": dropout_rng})

        per_example = losses.losses_at(model_fn, sched, batch, t, noise, loss_type=d.loss_type,
                                       mean_type=d.mean_type, var_type=d.var_type, hybrid_lambda=d.hybrid_lambda)
        return jnp.mean(weights * per_example), per_example

    (loss, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)

    def update(state: TrainState) -> TrainState:
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = config.optim.ema_decay
        if config.optim.ema_warmup:  # (1 + n) / (10 + n), as in tf.train.ExponentialMovingAverage's num_updates
            decay = jnp.minimum(decay, (1.0 + state.step) / (10.0 + state.step))
        return state._replace(
            params=params, ema_params=optax.incremental_update(params, state.ema_params, 1.0 - decay),
            opt_state=opt_state, loss_history=None if state.loss_history is None else timestep_sampler.update(
                state.loss_history, t, per_example))

    # one branch, not a select per leaf of the state: less to compile (~1-2 s of the CIFAR-10 step's 20)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    state = jax.lax.cond(finite, update, lambda state: state, state)
    state = state._replace(step=state.step + 1,
                           bad_step=jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step))
    return state, dict(loss=loss, grad_norm=grad_norm, lr=lr)


class Trainer:
    """The compiled pieces of a run on a mesh: state init, train step and sampling."""

    def __init__(self, config):
        self.config = config
        self.model = make_model(config)
        self.sched = make_schedule(config)
        self.tx = make_optimizer(config)
        self.mesh = Mesh(np.array(jax.devices()), ("data",))
        self.replicated = NamedSharding(self.mesh, P())
        self.data_sharding = NamedSharding(self.mesh, P("data"))
        # runs once: XLA's backend optimizes the random draws less; the same values, ~3 s of 10 sooner
        self.init = jax.jit(functools.partial(init_state, config, self.model, self.tx),
                            out_shardings=self.replicated,
                            compiler_options={"xla_backend_optimization_level": 1})
        self.step = jax.jit(
            functools.partial(train_step, model=self.model, sched=self.sched, tx=self.tx, config=config),
            in_shardings=(self.replicated, self.data_sharding, self.replicated),
            out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))
        self.generate = sample_lib.Generator(config, self.model, self.sched, self.mesh)

    def abstract_state(self):
        shapes = jax.eval_shape(self.init, jax.random.PRNGKey(0))
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated), shapes)

    def global_batch(self, local_batch: np.ndarray):
        return jax.make_array_from_process_local_data(self.data_sharding, local_batch)


# what a resumed run may change without --allow_config_change: how long it runs; how often it logs,
# saves, samples and evaluates; where its data is. Any other difference changes the run itself.
RESUMABLE_CHANGES = ("train.num_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.keep_period", "data.data_dir", "sample.", "eval.")


def check_resume_settings(config, saved_config: dict, allow_config_change: bool) -> list[str]:
    """The settings in which ``config`` differs from the checkpoint's (beyond ``RESUMABLE_CHANGES``);
    a ConfigError listing them unless ``allow_config_change``."""
    ours, theirs = config_lib.flatten(config), config_lib.flatten(saved_config)
    differing = [f"{k} ({theirs[k]!r} in the checkpoint, {ours[k]!r} now)" for k in ours
                 if k in theirs and ours[k] != theirs[k] and not k.startswith(RESUMABLE_CHANGES)]
    if differing and not allow_config_change:
        raise ConfigError("the workdir's checkpoint was trained with other settings: " + ", ".join(differing)
                          + "; resume with the checkpoint's settings, or add --allow_config_change to go on with these")
    return differing


def check_resume_compatible(config, saved_config: dict) -> None:
    """Refuse to resume a checkpoint whose network differs from the config's."""
    ours, theirs = config_lib.flatten(config), config_lib.flatten(saved_config)
    differing = [f"{k} ({theirs[k]!r} in the checkpoint, {ours[k]!r} now)" for k in NETWORK_KEYS if ours[k] != theirs[k]]
    if differing:
        raise ConfigError("the workdir's checkpoint was made with a different network: " + ", ".join(differing)
                          + "; use a new --workdir or the checkpoint's settings")
    theirs = saved_config["diffusion"].get("timestep_sampler", "uniform")  # runs older than the key were uniform
    if config.diffusion.timestep_sampler != theirs:
        raise ConfigError(f"the workdir's checkpoint was trained with diffusion.timestep_sampler {theirs!r}, the config "
                          f"has {config.diffusion.timestep_sampler!r}; use a new --workdir or the checkpoint's setting")


def restore_state(manager: ocp.CheckpointManager, step: int, abstract: TrainState) -> TrainState:
    """The train state saved at ``step``, shaped and sharded as ``abstract`` (see :func:`saved_tree`)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(saved_tree(abstract)))
    return TrainState(**manager.restore(step, args=args)["state"])


def saved_tree(state: TrainState) -> dict:
    """What a checkpoint holds of ``state``: its fields without those the run does not use (None),
    so that checkpoints of runs without a loss history read as before the field existed."""
    return {k: v for k, v in state._asdict().items() if v is not None}


def checkpoint_manager(workdir: epath.Path, config, create: bool) -> ocp.CheckpointManager:
    """The run's checkpoints, ``workdir/checkpoints`` (``workdir``: a ``storage.checkpoint_path``)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.train.keep_checkpoints, keep_period=config.train.keep_period or None,
        create=create, cleanup_tmp_directories=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(workdir / "checkpoints", options=options)


def _restore_config(manager, step) -> dict:
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def _on_any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.bool_(flag))))


def _set_aside(manager: ocp.CheckpointManager, workdir: epath.Path, step: int, error: Exception) -> None:
    """Move the unreadable checkpoint of ``step`` to ``WORKDIR/unreadable_checkpoints/`` (never delete it)."""
    reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
    target = workdir / "unreadable_checkpoints" / f"{step}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        (workdir / "checkpoints" / str(step)).rename(target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"train_lib._set_aside: step {step}")
    manager.reload()
    console(f"the checkpoint of step {step} cannot be read ({reason}); moved it to {target}")


def latest_readable(manager: ocp.CheckpointManager, workdir: epath.Path, read):
    """``(step, read(step))`` of the latest checkpoint that ``read`` can read, or ``(None, None)`` if
    there is none. Each that cannot be read (on any process) is set aside and the one before it
    tried; a CheckpointError if checkpoints exist but none can be read."""
    tried = sorted(manager.all_steps(), reverse=True)
    for step in tried:
        value, error = None, None
        try:
            value = read(step)
        except errors.Error:  # the project's own verdicts (a config that does not fit) are not damage
            raise
        except Exception as e:  # noqa: BLE001  (Orbax and TensorStore raise many kinds for damaged files)
            error = e
        if not _on_any_process(error is not None):
            return step, value
        _set_aside(manager, workdir, step, error or RuntimeError("unreadable on another process"))
    if tried:
        raise CheckpointError(f"none of the checkpoints of steps {sorted(tried)} in {workdir / 'checkpoints'} can be "
                              f"read; they were moved to {workdir / 'unreadable_checkpoints'}. Start a new --workdir, "
                              "or restore them from a copy")
    return None, None


class _Saves:
    """The run's asynchronous checkpoint saves. Orbax hands the error of a save that failed in the
    background (a full disk, a lost bucket) to the next call on the manager; here it becomes a
    StorageError naming that save's step and directory, seen after the next step (``check``), at
    the next save or at the end. The save fails whole: the checkpoints before it stay intact."""

    def __init__(self, manager: ocp.CheckpointManager):
        self.manager, self.in_flight = manager, None

    def _guard(self, call, step: int | None = None):
        try:
            return call()
        except Exception as e:  # noqa: BLE001  (whatever a failed write raised, in Orbax's words)
            failed = self.in_flight if self.in_flight is not None else step
            if failed is None:
                raise
            self.in_flight = None
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise StorageError(f"saving the checkpoint of step {failed} in {self.manager.directory} failed: {reason}; "
                               "the checkpoints before it are intact") from e

    def save(self, step: int, args) -> None:
        self._guard(lambda: self.manager.save(step, args=args, force=True), step)
        self.in_flight = step

    def check(self) -> None:
        if self.in_flight is not None:
            self._guard(self.manager.check_for_errors)

    def finish(self) -> None:
        self._guard(self.manager.wait_until_finished)
        self.in_flight = None


class _Preemption:
    """SIGTERM (or, across processes, JAX's preemption sync point) asks for a save and exit."""

    def __init__(self, manager):
        self.manager, self.requested = manager, False
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def __call__(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self.manager.reached_preemption(step)
        return self.requested

    def close(self):
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._previous)


def console(message: str) -> None:
    """A progress line on the console, from process 0."""
    if jax.process_index() == 0:
        print(message, flush=True)


def _check_finite(state: TrainState, last_good: int | None) -> None:
    bad = int(state.bad_step)  # the index of the step, from 0; the console counts the steps done, from 1
    if bad >= 0:
        raise NonFiniteError(f"non-finite loss or gradient at step {bad + 1}; parameters were not updated from then "
                             f"on and nothing after it was saved (last good checkpoint: step {last_good})")


class _Writer:
    """TensorBoard scalars (process 0 only), in the events file format of ``tf.summary.scalar``.

    It writes Event records with TensorBoard's own ``RecordWriter`` and ``scalar_pb`` and so
    does not import TensorFlow (~5 s of every train.py start for ``tf.summary``); ``epath``
    opens local and gs:// workdirs alike.
    """

    def __init__(self, workdir: epath.Path):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            directory = workdir / "tensorboard"
            directory.mkdir(parents=True, exist_ok=True)
            name = f"events.out.tfevents.{time.time():010.0f}.{socket.gethostname()}.{os.getpid()}.v2"
            self._records = RecordWriter((directory / name).open("wb"))
            self._write(Event(file_version="brain.Event:2"))

    def _write(self, event) -> None:
        event.wall_time = time.time()
        self._records.write(event.SerializeToString())
        self._records.flush()

    def scalars(self, step: int, values: dict) -> None:
        if self.enabled:
            scalars = [v for name, value in values.items() for v in scalar_pb(name, value).value]
            self._write(Event(step=step, summary=Summary(value=scalars)))

    def close(self) -> None:
        if self.enabled:
            self._records.close()


def _take_lock(workdir: epath.Path, take_over: bool) -> run_lock.RunLock | None:
    """Process 0 takes the workdir's lock (``run_lock``); every process stops if it cannot."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = run_lock.RunLock(workdir, take_over=take_over)
        except StorageError as e:
            error = e
    if jax.process_count() > 1 and not multihost_utils.broadcast_one_to_all(np.int32(error is None)):
        error = error or StorageError(f"process 0 could not take the lock of {workdir} (its message says why)")
    if error is not None:
        raise error
    return lock


def _record_start(workdir: epath.Path, config, lock: run_lock.RunLock) -> None:
    """The config of this start of the run, as ``WORKDIR/configs/START-RUNID.json``: never overwritten."""
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(lock.owner["started"]))
    storage.write_json(workdir / "configs" / f"{started}-{lock.owner['run_id']}.json", config.to_dict())


def train_and_evaluate(config, workdir: str, *, take_over_lock: bool = False,
                       allow_config_change: bool = False) -> TrainState:
    """Train (or resume) the run of ``config`` in ``workdir`` (local or gs://); returns the final state.

    ``take_over_lock``: take over a stale lock of another run (``run_lock``); ``allow_config_change``:
    resume a checkpoint trained with other settings (``check_resume_settings``)."""
    config_lib.validate(config, jax.device_count(), jax.process_count())
    workdir = storage.checkpoint_path(workdir)
    storage.check_reachable(workdir, what="workdir")
    d, t = config.data, config.train
    process, processes = jax.process_index(), jax.process_count()
    input_pipeline.check_batch_size(input_pipeline.num_examples(d.name, d.train_split, data_dir=d.data_dir,
                                                                process_index=process, process_count=processes),
                                    t.batch_size // processes)  # before anything is written
    storage.check_writable(workdir, what="workdir")
    lock = _take_lock(workdir, take_over_lock)  # before anything else: a second run stops here
    try:
        if (workdir / "checkpoints").is_dir():
            with checkpoint_manager(workdir, config, create=False) as manager:
                _, saved = latest_readable(manager, workdir, lambda step: _restore_config(manager, step))
                if saved is not None:
                    check_resume_compatible(config, saved)
                    changed = check_resume_settings(config, saved, allow_config_change)
                    if changed:
                        console("going on with changed settings: " + ", ".join(changed))
        if lock is not None:
            _record_start(workdir, config, lock)
        images = input_pipeline.load(d.name, d.train_split, image_size=d.image_size, data_dir=d.data_dir,
                                     process_index=process, process_count=processes)
        heldout = None
        if config.eval.num_samples or config.eval.nll_images:
            heldout = input_pipeline.load(d.name, d.eval_split, image_size=d.image_size, data_dir=d.data_dir)

        trainer = Trainer(config)
        periodic_eval = None
        if config.eval.every:  # the Inception network and its weights are loaded only when asked for
            from diffusion_jax.evaluation import report

            periodic_eval = report.PeriodicEval(config, trainer.generate, heldout)
        init_rng, train_rng, sample_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
        storage.check_shared(workdir)
        manager = checkpoint_manager(workdir, config, create=True)
        state = trainer.init(init_rng)
        abstract = trainer.abstract_state()
        last_good, restored = latest_readable(manager, workdir, lambda step: restore_state(manager, step, abstract))
        if last_good is not None:
            state = restored
            console(f"resumed from the checkpoint of step {last_good} in {workdir}")
        start = int(state.step)
        writer = _Writer(workdir)
        preemption, saves = _Preemption(manager), _Saves(manager)
        prefetch = input_pipeline.Prefetcher(images, start, batch_size=t.batch_size // processes, seed=config.seed,
                                             randflip=d.randflip, process_index=process)
        pending, tick, tick_step = [], time.perf_counter(), start
        try:
            for step in range(start, t.num_steps):
                state, metrics = trainer.step(state, trainer.global_batch(next(prefetch)), train_rng)
                pending.append(metrics)
                saves.check()
                if lock is not None:
                    lock.refresh(every=run_lock.REFRESH_SECONDS)
                done = step + 1
                preempted = preemption(done)
                if done % t.log_every == 0 or done == t.num_steps or preempted:
                    _check_finite(state, last_good)
                    fetched = jax.device_get(pending)  # one transfer for the interval's metrics
                    means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                    now = time.perf_counter()
                    rate = (done - tick_step) / (now - tick)
                    means.update(steps_per_sec=rate, images_per_sec=rate * t.batch_size)
                    writer.scalars(done, means)
                    eta = (t.num_steps - done) / rate
                    console(f"step {done}/{t.num_steps}  loss {means['loss']:.4f}  grad norm {means['grad_norm']:.3f}  "
                            f"lr {means['lr']:.2e}  {rate:.2f} steps/s  {rate * t.batch_size:.1f} img/s  "
                            f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")
                    pending, tick, tick_step = [], now, done
                if done % t.checkpoint_every == 0 or done == t.num_steps or preempted:
                    _check_finite(state, last_good)
                    if lock is not None:
                        lock.refresh()  # still this run's workdir: another may have taken over its lock
                    saves.save(done, ocp.args.Composite(
                        state=ocp.args.StandardSave(saved_tree(state)), config=ocp.args.JsonSave(config.to_dict())))
                    last_good = done
                if preempted:
                    console(f"preempted: saved step {done}, exiting")
                    return state
                if config.sample.every and (done % config.sample.every == 0 or done == t.num_steps):
                    grid = trainer.generate(state.ema_params, config.sample.num, sample_rng)
                    if process == 0:
                        image_io.save_grid(grid, workdir / "samples" / f"step_{done:08d}.png", scale=2)
                if periodic_eval is not None and (done % config.eval.every == 0 or done == t.num_steps):
                    values = periodic_eval(state.ema_params, sample_rng)
                    writer.scalars(done, values)
                    console(f"step {done} evaluation: " + "  ".join(f"{k[5:]} {v:.4f}" for k, v in values.items()))
            if config.eval.num_samples:
                untrained = trainer.init(init_rng).params  # the same initialization, re-run (the first was donated)
                report_quality(trainer, state, untrained, images, heldout, sample_rng, workdir, writer)
        finally:
            prefetch.close()
            preemption.close()
            try:
                saves.finish()
            finally:
                manager.close()
                writer.close()
    finally:
        if lock is not None:
            lock.release()
    return state


def report_quality(trainer, state, initial_params, train_images, heldout, rng, workdir, writer) -> dict:
    """Pixel-space sliced Wasserstein distance to held-out images: floor, model, untrained ceiling."""
    n = min(trainer.config.eval.num_samples, len(heldout))
    n -= n % jax.device_count()
    samples = trainer.generate(state.ema_params, n, rng)
    untrained = trainer.generate(initial_params, n, rng)
    floor_set = train_images[np.random.default_rng(0).choice(len(train_images), n, replace=False)]
    figures = {name: sliced_wasserstein(x.astype(np.float32) / 255, heldout[:n].astype(np.float32) / 255)
               for name, x in (("real_vs_real", floor_set), ("ema_model", samples), ("untrained_model", untrained))}
    writer.scalars(int(state.step), {f"swd/{k}": v for k, v in figures.items()})
    if jax.process_index() == 0:
        image_io.save_grid(samples[:64], workdir / "samples" / "final.png", scale=2)
        console(f"sliced Wasserstein distance to {n} held-out images (pixel space, lower is better): "
                f"real images {figures['real_vs_real']:.4f} (floor) | trained model {figures['ema_model']:.4f} | "
                f"untrained model {figures['untrained_model']:.4f}")
    return figures
