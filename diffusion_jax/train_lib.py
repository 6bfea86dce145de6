"""Training: the pure train step, the compiled pieces of a run, and the loop around them.

One program for one CPU, eight GPUs or a TPU pod: a one-axis ``Mesh('data')`` over every
device of every process; the global batch is sharded on ``data``, the state replicated and
donated. Randomness is stateless: step s draws from ``fold_in(key, s)``, and the data of
step s is a function of (seed, step) (see ``input_pipeline``), so a resumed run continues
exactly the interrupted one.

The loop runs its periodic actions from one list: the log line and TensorBoard scalars
(``train.log_every``), the checkpoint (``train.checkpoint_every``, ``checkpoints``) and the
evaluators (``evaluation.evaluators``: sample grids, FID/IS, NLL, the quickstart's quality
figure), each with its period and all at the last step. SIGINT and SIGTERM in the loop save
the current step and stop (``interrupts``). A non-finite loss or gradient leaves the parameters
untouched and stops the run at the next log or save, naming the step.
"""

from __future__ import annotations

import functools
import signal
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import (
    builders,
    checkpoints,
    guidance,
    host_tensorflow,
    image_io,
    input_pipeline,
    interrupts,
    losses,
    run_lock,
    sample_lib,
    sampler_registry,
    schedule,
    storage,
    summaries,
    timestep_sampler,
)
from diffusion_jax import config as config_lib
from diffusion_jax.builders import TrainState
from diffusion_jax.errors import ConfigError, NonFiniteError
from diffusion_jax.evaluation import evaluators as evaluators_lib
from diffusion_jax.evaluation import inception
from diffusion_jax.mesh import data_mesh
from diffusion_jax.models.unet import UNet
from diffusion_jax.progress import console, duration


def train_step(state: TrainState, batch, rng, *, model: UNet, sched: schedule.Schedule, tx, config):
    """One step of DDPM Algorithm 1 with Adam, clipping and the parameter EMA on ``batch`` (``image``
    float32 NHWC in [-1, 1]; ``label`` int32 [B] for a class-conditional network); returns the new
    state and the step's metrics (the loss, and its sum and count per quarter of the timestep range).

    With ``diffusion.timestep_sampler = 'loss-second-moment'`` t is importance-sampled from the
    loss history and each example's loss weighted by 1 / (T p_t) (improved DDPM section 3.3). A
    class-conditional network sees each label replaced by "no class" with probability
    ``diffusion.cond_drop_prob`` (``guidance.drop_labels``), drawn from the step's key like t and the
    noise.
    """
    dropout_rng, diffusion_rng, label_rng = jax.random.split(jax.random.fold_in(rng, state.step), 3)
    d = config.diffusion
    lr = builders.learning_rate(config)(state.step)
    x0 = batch["image"]
    t_rng, noise_rng = jax.random.split(diffusion_rng)
    if state.loss_history is None:
        t = jax.random.randint(t_rng, (x0.shape[0],), 0, sched.num_timesteps)
        weights = jnp.ones((x0.shape[0],))
    else:
        t, weights = timestep_sampler.sample(state.loss_history, t_rng, x0.shape[0])
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    y = None
    if model.num_classes:
        y = guidance.drop_labels(batch["label"], label_rng, d.cond_drop_prob, model.null_label)

    def loss_fn(params):
        def model_fn(x, t):
            return model.apply({"params": params}, x, t, y, train=True, rngs={"dropout": dropout_rng})

        per_example = losses.losses_at(model_fn, sched, x0, t, noise, loss_type=d.loss_type,
                                       mean_type=d.mean_type, var_type=d.var_type,
                                       hybrid_lambda=d.hybrid_lambda)
        return jnp.mean(weights * per_example), per_example

    (loss, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)

    def update(state: TrainState) -> TrainState:
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = builders.ema_decay(config.optim, state.step)
        return state._replace(
            params=params, ema_params=optax.incremental_update(params, state.ema_params, 1.0 - decay),
            opt_state=opt_state, loss_history=None if state.loss_history is None else timestep_sampler.update(
                state.loss_history, t, per_example))

    # one branch, not a select per leaf of the state: less to compile (~1-2 s of the CIFAR-10 step's 20)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    state = jax.lax.cond(finite, update, lambda state: state, state)
    state = state._replace(step=state.step + 1,
                           bad_step=jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step))
    in_quarter = jax.nn.one_hot(t * 4 // sched.num_timesteps, 4)  # [B, 4]: which quarter of [0, T) t is in
    return state, dict(loss=loss, grad_norm=grad_norm, lr=lr, loss_sum_by_quarter=per_example @ in_quarter,
                       count_by_quarter=jnp.sum(in_quarter, axis=0))


class Trainer:
    """The compiled pieces of a run on a mesh of ``devices`` (default: all): state init, train step and
    sampling."""

    def __init__(self, config, devices=None):
        self.config = config
        self.model = builders.make_model(config)
        self.sched = builders.make_schedule(config)
        self.tx = builders.make_optimizer(config)
        self.mesh = data_mesh(devices)
        self.replicated = NamedSharding(self.mesh, P())
        self.data_sharding = NamedSharding(self.mesh, P("data"))
        # runs once: XLA's backend optimizes the random draws less; the same values, ~3 s of 10 sooner
        self.init = jax.jit(functools.partial(builders.init_state, config, self.model, self.tx),
                            out_shardings=self.replicated,
                            compiler_options={"xla_backend_optimization_level": 1})
        self.step = jax.jit(
            functools.partial(train_step, model=self.model, sched=self.sched, tx=self.tx, config=config),
            in_shardings=(self.replicated, self.data_sharding, self.replicated),
            out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))
        self.generate = sample_lib.Generator(config, self.model, self.sched, self.mesh)

    def abstract_state(self) -> TrainState:
        return builders.abstract_state(self.config, self.replicated)

    def global_batch(self, local_batch: dict) -> dict:
        """The global batch of every process's ``local_batch`` (``image``, and ``label`` if the network
        is class-conditional), sharded on ``data``."""
        keys = ("image", "label") if self.model.num_classes else ("image",)
        return {k: jax.make_array_from_process_local_data(self.data_sharding, local_batch[k]) for k in keys}


def _record_start(workdir: epath.Path, config, lock: run_lock.RunLock) -> None:
    """The config of this start of the run, as ``WORKDIR/configs/START-RUNID.json``: never overwritten."""
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(lock.owner["started"]))
    storage.write_json(workdir / "configs" / f"{started}-{lock.owner['run_id']}.json", config.to_dict())


NON_FINITE_STOP = "non_finite_stop.json"  # in the workdir: the settings and step of a non-finite stop


def _check_finite(state: TrainState, last_good: int | None) -> None:
    """A NonFiniteError naming the first non-finite step and ``last_good``, the checkpoint a restart
    resumes from: verified by its checksums when this run resumed from it, or saved by this run from
    a state checked finite."""
    bad = int(state.bad_step)  # the index of the step, from 0; the console counts the steps done, from 1
    if bad >= 0:
        raise NonFiniteError(f"non-finite loss or gradient at step {bad + 1}; parameters were not updated "
                             "from then on and nothing after it was saved (last good checkpoint: "
                             + (f"step {last_good}, verified)" if last_good is not None else "none)"))


def _record_non_finite(workdir: epath.Path, config, error: NonFiniteError, last_good: int | None) -> None:
    """``WORKDIR/non_finite_stop.json``: the stop's message, its config and the step a restart would
    resume from, for :func:`_refuse_repeating_non_finite`."""
    if jax.process_index() == 0:
        storage.write_json(workdir / NON_FINITE_STOP, {"error": str(error), "resume_step": last_good,
                                                       "config": config.to_dict()})


def _refuse_repeating_non_finite(workdir: epath.Path, config, resume_step: int | None) -> None:
    """A NonFiniteError (status 3 again) if the run stopped on a non-finite value and would now
    restart from the same checkpoint with the same settings: training is deterministic, so it would
    meet the same value at the same step, and a scheduler that restarts on failure would loop. Any
    change of setting (with --allow_config_change) or of the checkpoint to resume from lets it go
    on, and the record is removed; removing it by hand retries as is."""
    record = workdir / NON_FINITE_STOP
    if not record.exists():
        return
    stopped = storage.read_json(record)
    same = not checkpoints.check_resume_settings(config, stopped["config"], allow_config_change=True)
    if same and stopped["resume_step"] == resume_step:
        raise NonFiniteError(f"this run stopped before with: {stopped['error']}. Restarted unchanged it "
                             "would stop the same way, so it did not start: do not retry as is. Change a "
                             "setting (e.g. --config.optim.lr=..., with --allow_config_change), or remove "
                             f"{record} to retry unchanged")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("read " + NON_FINITE_STOP)  # by all before it is removed
    if jax.process_index() == 0:
        record.unlink()


class _Log:
    """The log action: the means of the metrics since the last log, on the console and in TensorBoard,
    with the rate (measured from the end of the run's first step, compilation and evaluations left
    out) and the ETA."""

    def __init__(self, writer: summaries.Writer, batch_size: int, num_steps: int, num_timesteps: int):
        self.writer, self.batch_size, self.num_steps, self.T = writer, batch_size, num_steps, num_timesteps
        self.pending, self.tick, self.tick_step = [], time.perf_counter(), None

    def leave_out(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation's) out of the next rate."""
        self.tick += seconds

    def first_step_done(self, done: int) -> None:
        now = time.perf_counter()
        console(f"compiled and ran the first step in {now - self.tick:.1f} s (the rates below leave it out)")
        self.tick, self.tick_step = now, done

    def __call__(self, done: int, state: TrainState) -> None:
        fetched = jax.device_get(self.pending)  # one transfer for the interval's metrics
        means = {k: float(np.mean([m[k] for m in fetched])) for k in ("loss", "grad_norm", "lr")}
        sums, counts = (np.sum([m[k] for m in fetched], axis=0)
                        for k in ("loss_sum_by_quarter", "count_by_quarter"))
        for q in range(4):  # the loss where t is in each quarter of [0, T), over the interval's examples
            if counts[q]:
                means[f"loss_by_t/{q * self.T // 4}-{(q + 1) * self.T // 4 - 1}"] = float(sums[q] / counts[q])
        now = time.perf_counter()
        line = (f"step {done}/{self.num_steps}  loss {means['loss']:.4f}  "
                f"grad norm {means['grad_norm']:.3f}  lr {means['lr']:.2e}")
        if self.tick_step is not None and done > self.tick_step:
            rate = (done - self.tick_step) / (now - self.tick)
            means.update(steps_per_sec=rate, images_per_sec=rate * self.batch_size)
            line += f"  {rate:.2f} steps/s  {rate * self.batch_size:.1f} img/s  " \
                    f"ETA {duration((self.num_steps - done) / rate)}"
        self.writer.scalars(done, means)
        console(line)
        self.pending, self.tick, self.tick_step = [], now, done


class _Periodic(NamedTuple):
    every: int  # 0: never (but at a stop, if ``at_stop``)
    run: Callable[[int, TrainState], None]  # (steps done, state)
    at_stop: bool = False  # also when a signal stops the run (the log and the checkpoint)

    def due(self, done: int, num_steps: int) -> bool:
        return bool(self.every) and (done % self.every == 0 or done == num_steps)


def make_evaluators(config, trainer: Trainer, images, heldout: np.ndarray | None,
                    init_rng) -> list[evaluators_lib.Evaluator]:
    """The evaluators of ``config.sample`` and ``config.eval`` (the Inception network is loaded only if
    FID is asked for). ``images``: the training share's uint8 images, an array or a streamed share's
    ``images`` (read when indexed)."""
    s, e, T = config.sample, config.eval, config.train.num_steps
    found = []
    if s.every:
        # a class-conditional model samples every class in turn (sample_lib.cycle_labels): a class a column
        found.append(evaluators_lib.SampleGrid(s.every, trainer.generate, s.num,
                                               columns=config.model.num_classes or None))
    if e.every and e.fid_samples:
        from diffusion_jax.evaluation import report

        scorer = report.InceptionScorer(config.data, reference_stats=e.reference_stats,
                                        inception_weights=e.inception_weights)
        found.append(evaluators_lib.FidIs(e.every, trainer.generate, scorer, e.fid_samples, e.batch_size))
    if e.every and e.nll_images:
        from diffusion_jax.evaluation import likelihood

        bound = likelihood.Bound(builders.apply_fn(builders.make_model(config, evaluation=True)),
                                 trainer.sched, batch_size=e.batch_size, **builders.output_types(config))
        found.append(evaluators_lib.Nll(e.every, bound, heldout[:e.nll_images]))
    if e.num_samples:
        n = min(e.num_samples, len(heldout))
        n -= n % jax.device_count()
        # the untrained network: the same initialization, run again (the first state was donated)
        found.append(evaluators_lib.SlicedWasserstein(T, trainer.generate, images, heldout, n,
                                                      lambda: trainer.init(init_rng).params))
    return found


def _evaluate(evaluator, workdir: epath.Path, writer: summaries.Writer, log: _Log, rng, done: int,
              state: TrainState) -> None:
    began = time.perf_counter()
    values = evaluator.run(state.ema_params, rng)
    images = {k: v for k, v in values.items() if isinstance(v, np.ndarray) and v.ndim == 3}
    scalars = {k: v for k, v in values.items() if k not in images}
    writer.scalars(done, scalars)
    writer.images(done, images)
    if jax.process_index() == 0:
        for name, image in images.items():
            image_io.save_png(image, workdir / "samples" / (f"step_{done:08d}.png" if name == "samples" else
                                                            f"{name}.png"))
    line = evaluator.line(values)
    if line:
        console(f"step {done}: {line}")
    log.leave_out(time.perf_counter() - began)


def _ema_notice(optim, done: int, state: TrainState) -> None:
    """After a grid of the EMA parameters' samples: a note while they are mostly the initial ones."""
    notice = builders.ema_notice(optim, done)
    if notice:
        console(notice)


def _profile(workdir: epath.Path, first: int, last: int):
    """A ``jax.profiler`` trace of steps ``first`` + 1 .. ``last`` in the TensorBoard directory (its
    Profile tab): ``(step, state)`` is called after each step."""
    directory = str(workdir / "tensorboard")

    def after(step: int, state: TrainState) -> None:
        if step == first:
            jax.block_until_ready(state)
            jax.profiler.start_trace(directory)
        elif step == last:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            console(f"profiled steps {first + 1}-{last}: {directory} (TensorBoard's Profile tab)")

    return after


def train_and_evaluate(config, workdir: str, *, take_over_lock: bool = False,
                       allow_config_change: bool = False) -> TrainState:
    """Train (or resume) the run of ``config`` in ``workdir`` (local or gs://); returns the final state.

    ``take_over_lock``: take over a stale lock of another run (``run_lock``); ``allow_config_change``:
    resume a checkpoint trained with other settings (``checkpoints.check_resume_settings``). SIGINT and
    SIGTERM raise ``interrupts.Interrupted``: at once before the loop, after saving the current step in it."""
    signums = (signal.SIGINT, signal.SIGTERM) if jax.process_count() == 1 else (signal.SIGINT,)
    with interrupts.Signals(signums) as signals:
        return _train_and_evaluate(config, workdir, signals, take_over_lock, allow_config_change)


def _share(config) -> dict:
    """The arguments of ``input_pipeline``'s functions that select this process's share of the data."""
    d = config.data
    return dict(image_size=d.image_size, channels=d.channels, data_dir=d.data_dir,
                process_index=jax.process_index(), process_count=jax.process_count())


def _check_before_writing(config, workdir: str) -> tuple[epath.Path, input_pipeline.Streamed | None]:
    """The checks of a run before it writes anything: the config against the devices and processes,
    the workdir reachable and writable, the training data (``input_pipeline.check``). Returns the
    workdir as a path and the streamed share the check opened (None for data read into memory)."""
    config_lib.validate(config, jax.device_count(), jax.process_count())
    workdir = storage.checkpoint_path(workdir)
    storage.check_reachable(workdir, what="workdir")
    streamed = input_pipeline.check(config.data.name, config.data.train_split,
                                    batch_size=config.train.batch_size // jax.process_count(),
                                    num_classes=config.model.num_classes, **_share(config))
    storage.check_writable(workdir, what="workdir")
    return workdir, streamed


def dry_run(config, workdir: str) -> None:
    """``train.py --dry_run``: the run's checks, and what it would train on, without training.

    Every check of a run before its first step (:func:`_check_before_writing`, and the workdir
    shared by every process), then, from process 0: the config, key by key; the data source with
    its size and classes; what the workdir holds; the network's parameter count. Nothing is
    written but the checks' probe files, which are removed; no lock is taken, so a run may be
    training in the workdir meanwhile."""
    workdir, _ = _check_before_writing(config, workdir)
    storage.check_shared(workdir)
    d, t = config.data, config.train
    console("config:")
    for key, value in config_lib.flatten(config).items():
        console(f"  {key} = {value!r}")
    count = input_pipeline.num_examples(d.name, d.train_split, data_dir=d.data_dir)
    names = input_pipeline.classes(d.name, d.train_split, data_dir=d.data_dir)
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    console(f"data: {d.name} split {d.train_split}: {count} images"
            + (f", {len(names)} classes ({shown})" if names else ", no classes")
            + f"; each of the {jax.process_count()} process(es) reads a share, "
            f"{t.batch_size // jax.process_count()} images a step")
    steps = []
    if (workdir / "checkpoints").is_dir():
        with checkpoints.checkpoint_manager(workdir, config, create=False) as manager:
            steps = manager.all_steps()
    held = (f"checkpoints of steps {', '.join(map(str, sorted(steps)))}: the run resumes from the newest "
            "readable one" if steps else "no checkpoint: the run starts at step 1")
    console(f"workdir: {workdir}, writable and seen by all {jax.process_count()} process(es); {held}")
    params = builders.abstract_state(config, None).params
    count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    console(f"network: {count:,} parameters; {t.num_steps} steps of {t.batch_size} images over "
            f"{jax.device_count()} device(s)")
    console("dry run complete: nothing was trained or saved")


class TpuChip(NamedTuple):
    hbm_gib: float  # HBM per chip
    cores: int  # TensorCores per chip
    peak_flops: float  # bfloat16 FLOP/s per chip


# Each generation as Google Cloud lists it (cloud.google.com/tpu/docs/v2, v3, v4, v5e, v5p, v6e), keyed by
# JAX's device_kind. A JAX device is a chip or one TensorCore of it (``device.num_cores`` of them), so
# a device has num_cores / cores of the chip's HBM and peak.
TPU_CHIPS = {"TPU v2": TpuChip(16, 2, 45e12), "TPU v3": TpuChip(32, 2, 123e12),
             "TPU v4": TpuChip(32, 2, 275e12), "TPU v5 lite": TpuChip(16, 1, 197e12),
             "TPU v5": TpuChip(95, 2, 459e12), "TPU v6 lite": TpuChip(32, 1, 918e12)}
MFUS = (0.4, 0.6)  # the model FLOP utilizations at which a step time is projected


class TpuCompile(NamedTuple):
    """A program of a run (the train step, a batch of sampling, a batch of FID features) compiled for a
    TPU slice: per-device bytes and FLOPs (the compiler's) of one call, the device's HBM and peak
    (``TPU_CHIPS``), the compile's seconds on this host."""
    program: str
    topology: str
    device_kind: str
    num_devices: int
    batch_size: int
    arguments: int
    outputs: int
    aliased: int
    temporary: int
    code: int
    flops: float
    hbm: float
    peak_flops: float
    seconds: float
    flops_note: str = ""  # how ``flops`` was counted, where not the compiled program's own figure

    @property
    def total(self) -> int:
        """Bytes a device holds during the step: arguments, outputs not written over a donated argument,
        temporaries and the program."""
        return self.arguments + self.outputs - self.aliased + self.temporary + self.code

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm


def tpu_devices(topology: str) -> list:
    """The devices of the TPU slice ``topology`` (e.g. ``v5e:2x4``), from libtpu, on any host; libtpu's
    warnings of a host without TPUs go to the debug log."""
    from jax.experimental import topologies

    with host_tensorflow.stderr_to_log("libtpu"):
        try:
            return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
        except RuntimeError as caught:  # libtpu missing ("TPU support not installed") or an unknown name
            e = caught
    if "not installed" in str(e):
        raise ConfigError(f"--compile_for={topology} needs libtpu, JAX's TPU compiler: pip install "
                          "'jax[tpu]' (the project's tpu extra, see docs/pods.md)") from e
    said = str(e).splitlines()[0]
    if "INVALID_ARGUMENT" in said:
        raise ConfigError(f"--compile_for={topology}: libtpu knows no such TPU slice ({said}); name one as "
                          "GENERATION:TOPOLOGY, e.g. v3:2x2, v4:2x2x1, v5e:2x4, v6e:4x4") from e
    raise ConfigError(f"--compile_for={topology}: libtpu could not describe the slice: {said}") from e


def _tpu_chip(topology: str, devices) -> TpuChip:
    kind = devices[0].device_kind
    if kind not in TPU_CHIPS:
        raise ConfigError(f"--compile_for={topology}: its devices are {kind!r}, whose HBM and peak "
                          f"train_lib.TPU_CHIPS does not list (it has {', '.join(TPU_CHIPS)})")
    return TPU_CHIPS[kind]


def _tpu_compile(program: str, jitted, args, topology: str, devices, batch_size: int) -> TpuCompile:
    """``jitted`` lowered on the abstract ``args`` and compiled by XLA:TPU; its figures per device."""
    chip = _tpu_chip(topology, devices)
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    share = devices[0].num_cores / chip.cores
    return TpuCompile(program, topology, devices[0].device_kind, len(devices), batch_size,
                      memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.alias_size_in_bytes,
                      memory.temp_size_in_bytes, memory.generated_code_size_in_bytes, float(cost["flops"]),
                      chip.hbm_gib * 2 ** 30 * share, chip.peak_flops * share, seconds)


def _tpu_trainer(config, topology: str, devices) -> Trainer:
    _tpu_chip(topology, devices)  # an unknown device kind before the config's checks
    config_lib.validate(config, len(devices), len({d.process_index for d in devices}))
    return Trainer(config, devices)


def compile_for_tpu(config, topology: str, devices, batch_size: int | None = None) -> TpuCompile:
    """``config``'s train step, at global ``batch_size`` (default the config's), compiled by XLA:TPU for
    ``devices`` (``tpu_devices(topology)``) as one program over all of them, as a slice of any number
    of hosts runs it; nothing is allocated or run."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.batch_size = batch_size or config.train.batch_size
    trainer = _tpu_trainer(config, topology, devices)
    d = config.data
    shape = (config.train.batch_size, d.image_size, d.image_size, d.channels)
    image = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=trainer.data_sharding)
    batch = {"image": image}
    if config.model.num_classes:
        batch["label"] = jax.ShapeDtypeStruct(image.shape[:1], jnp.int32, sharding=trainer.data_sharding)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=trainer.replicated)
    return _tpu_compile("train step", trainer.step, (trainer.abstract_state(), batch, rng), topology, devices,
                        config.train.batch_size)


def compile_evaluation_for_tpu(config, topology: str, devices) -> list[TpuCompile]:
    """What evaluation runs, compiled by XLA:TPU for ``devices`` as :func:`compile_for_tpu` does: one
    batch of ``eval.batch_size`` samples by the config's sampler (``sample.sampler``, ``sample.steps``;
    every network evaluation of the batch), and the FID extractor on a batch of as many of the
    samples (the Inception at full precision, ``conv.EVALUATION_PRECISION``)."""
    trainer = _tpu_trainer(config, topology, devices)
    num, d, replicated = config.eval.batch_size, config.data, trainer.replicated
    params = trainer.abstract_state().ema_params
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    index = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    y = jax.ShapeDtypeStruct((num,), jnp.int32, sharding=replicated) if config.model.num_classes else None
    evaluations = sampler_registry.evaluations(config.sample, trainer.sched)
    sampling = _tpu_compile(f"sampling ({config.sample.sampler}, {evaluations} network evaluations)",
                            trainer.generate.compiled(num), (params, rng, index, y), topology, devices, num)
    # XLA's cost analysis counts the body of the sampling loop once: the FLOPs are those of the network
    # evaluations, each one forward of the batch (of both passes, doubled, when guided)
    rows = num * (2 if config.model.num_classes and config.sample.guidance else 1)
    x_t = jax.ShapeDtypeStruct((rows, d.image_size, d.image_size, d.channels), jnp.float32,
                               sharding=trainer.data_sharding)
    timesteps = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=trainer.data_sharding)
    forward = jax.jit(builders.apply_fn(trainer.model)).lower(params, x_t, timesteps).compile()
    per_evaluation = float(forward.cost_analysis()["flops"])
    sampling = sampling._replace(flops=evaluations * per_evaluation, flops_note=(
        f"{evaluations} network evaluations of {per_evaluation / 1e9:.2f}"))
    extractor = inception.Extractor(None, batch_size=num, devices=devices)
    variables = {"params": inception.abstract_params(replicated)}
    images = jax.ShapeDtypeStruct((extractor.batch_size, d.image_size, d.image_size, 3), jnp.uint8,
                                  sharding=extractor.data)
    features = _tpu_compile("FID features", extractor.apply, (variables, images), topology, devices,
                            extractor.batch_size)
    return [sampling, features]


def largest_batch(fits: Callable[[int], bool], start: int, unit: int) -> int | None:
    """The largest multiple of ``unit`` for which ``fits`` holds, assuming it holds up to some size and
    not beyond: doubling from ``start`` until it fails, then bisecting. None if ``unit`` does not fit."""
    low, high = 0, max(unit, start // unit * unit)
    while fits(high):
        low, high = high, 2 * high
    while high - low > unit:
        middle = (low + high) // 2 // unit * unit
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low or None


def _bytes(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def print_tpu_compile(r: TpuCompile) -> None:
    """The lines of ``train.py --compile_for``."""
    console(f"{r.program} on {r.topology} ({r.num_devices} x {r.device_kind}), global batch {r.batch_size}: "
            f"compiled in {r.seconds:.0f} s")
    console(f"  per device: arguments {_bytes(r.arguments)}, outputs {_bytes(r.outputs)} "
            f"({_bytes(r.aliased)} of them in donated arguments), temporaries {_bytes(r.temporary)}, "
            f"program {_bytes(r.code)}")
    console(f"  total {_bytes(r.total)} of the device's {_bytes(r.hbm)} HBM: "
            + ("fits" if r.fits else "does NOT fit"))
    call = "step" if r.program == "train step" else "batch"
    times = ", ".join(f"{r.flops / (mfu * r.peak_flops) * 1e3:.3g} ms at {mfu:.0%} MFU" for mfu in MFUS)
    counted = f" ({r.flops_note} GFLOP)" if r.flops_note else ""
    console(f"  {r.flops / 1e9:.1f} GFLOP per device per {call}{counted}; projected {call} time (not "
            f"measured): {times} of the device's {r.peak_flops / 1e12:.1f} TFLOP/s bfloat16 peak")


def _train_and_evaluate(config, workdir: str, signals: interrupts.Signals, take_over_lock: bool,
                        allow_config_change: bool) -> TrainState:
    workdir, streamed = _check_before_writing(config, workdir)  # a folder is listed once, here
    d, t = config.data, config.train
    process, processes = jax.process_index(), jax.process_count()
    lock = run_lock.take(workdir, take_over=take_over_lock)  # before anything else: a second run stops here
    try:
        resume_step = None
        if (workdir / "checkpoints").is_dir():
            with checkpoints.checkpoint_manager(workdir, config, create=False) as manager:
                resume_step, saved = checkpoints.latest_readable(
                    manager, workdir, lambda step: checkpoints.restore_config(manager, step))
                if saved is not None:
                    checkpoints.check_resume_compatible(config, saved)
                    changed = checkpoints.check_resume_settings(config, saved, allow_config_change)
                    if changed:
                        console("going on with changed settings: " + ", ".join(changed))
        _refuse_repeating_non_finite(workdir, config, resume_step)
        if lock is not None:
            _record_start(workdir, config, lock)
        data = streamed if streamed is not None else input_pipeline.open_share(d.name, d.train_split,
                                                                                 **_share(config))
        heldout = None
        if config.eval.num_samples or config.eval.nll_images:
            if d.eval_name is None and input_pipeline.one_set(d.name) and process == 0:
                print(f"warning: data.name = {d.name!r} is one set of images, so the held-out figures "
                      "(eval.num_samples, eval.nll_images) are computed on training images; name other "
                      "images with --config.data.eval_name=folder:PATH (or prepared:DIR, tfds:NAME:SPLIT)",
                      file=sys.stderr, flush=True)
            heldout = input_pipeline.load(d.eval_name or d.name, d.eval_split, image_size=d.image_size,
                                          channels=d.channels, data_dir=d.data_dir)

        trainer = Trainer(config)
        init_rng, train_rng, sample_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
        evaluators = make_evaluators(config, trainer, data.images, heldout, init_rng)
        storage.check_shared(workdir)
        manager = checkpoints.checkpoint_manager(workdir, config, create=True)
        state = trainer.init(init_rng)
        abstract = trainer.abstract_state()
        last_good, restored = checkpoints.latest_readable(
            manager, workdir, lambda step: checkpoints.restore_state(manager, step, abstract))
        if last_good is not None:
            state = restored
            console(f"resumed from the checkpoint of step {last_good} in {workdir}")
        start = int(state.step)
        writer = summaries.Writer(workdir / "tensorboard", purge_step=start + 1)  # the first step it logs
        writer.hparams(config_lib.flatten(config))
        saves = checkpoints.Saves(manager)
        log = _Log(writer, t.batch_size, t.num_steps, config.diffusion.num_timesteps)

        def save(done: int, state: TrainState) -> None:
            nonlocal last_good
            _check_finite(state, last_good)
            if lock is not None:
                lock.refresh()  # still this run's workdir: another may have taken over its lock
            saves.save(done, checkpoints.save_args(state, config))
            last_good = done

        def log_finite(done: int, state: TrainState) -> None:
            _check_finite(state, last_good)
            log(done, state)

        periodic = [_Periodic(t.log_every, log_finite, at_stop=True),
                    _Periodic(t.checkpoint_every, save, at_stop=True)]
        periodic += [_Periodic(e.every, functools.partial(_evaluate, e, workdir, writer, log, sample_rng))
                     for e in evaluators]
        periodic.append(_Periodic(config.sample.every, functools.partial(_ema_notice, config.optim)))
        profiled = (start + 1, min(start + 1 + t.profile_steps, t.num_steps))  # after the compiling step
        if t.profile_steps and profiled[1] > profiled[0]:
            periodic.append(_Periodic(1, _profile(workdir, *profiled)))
        prefetch = input_pipeline.batches(data, start, batch_size=t.batch_size // processes, seed=config.seed,
                                          randflip=d.randflip, process_index=process)
        if start < t.num_steps:
            console(f"compiling the train step (step {start + 1} of {t.num_steps} next)")
        else:
            console(f"the run is complete: its checkpoint of step {start} is at or past train.num_steps = "
                    f"{t.num_steps}, so there is nothing to train (to go on, raise --config.train.num_steps)")
        try:
            for step in range(start, t.num_steps):
                state, metrics = trainer.step(state, trainer.global_batch(next(prefetch)), train_rng)
                log.pending.append(metrics)
                saves.check()
                if lock is not None:
                    lock.refresh(every=run_lock.REFRESH_SECONDS)
                done = step + 1
                if step == start:
                    jax.block_until_ready(state)
                    log.first_step_done(done)
                    signals.deferring = processes == 1  # from now on a signal is for saving this step
                stop = signals.requested if processes == 1 else manager.reached_preemption(done)
                for action in periodic:
                    if action.at_stop and stop or not stop and action.due(done, t.num_steps):
                        action.run(done, state)
                if stop:  # the save completes in the finally below, or its failure is the error
                    signum = signals.received if processes == 1 else signal.SIGTERM
                    raise interrupts.Interrupted(signum,
                                                 f"saved step {done}; the same command resumes from it")
        except NonFiniteError as e:
            _record_non_finite(workdir, config, e, last_good)
            raise
        finally:
            prefetch.close()
            try:
                saves.finish()
            finally:
                manager.close()
                writer.close()
    finally:
        if lock is not None:
            lock.release()
    return state
