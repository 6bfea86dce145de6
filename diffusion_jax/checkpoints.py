"""Checkpoints: the train state's Orbax I/O, resuming checks, and loading a model to sample or evaluate.

A training run's checkpoints (``WORKDIR/checkpoints/STEP``, Orbax, saved asynchronously) hold
the train state (step, params, EMA params, optimizer state, and the loss history when t is
importance-sampled) with the run's config beside it. Reading takes the latest complete one
that can be read; one that cannot is moved to ``WORKDIR/unreadable_checkpoints/`` (never
deleted) and the one before it tried. A resumed run must have the checkpoint's network, and
its other settings unless allowed.

``load`` gives a model to sample or evaluate from either kind of checkpoint: a training run's,
or ``convert.py``'s output (one set of parameters and the network's shape, no diffusion
settings). Both come back as the same ``(config, params, source)``: the config of a training
checkpoint is the run's; that of a converted one is the given config with the network and
image shape of the checkpoint.
"""

from __future__ import annotations

import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import builders, convert, errors, storage
from diffusion_jax import config as config_lib
from diffusion_jax.builders import TrainState
from diffusion_jax.errors import CheckpointError, ConfigError, StorageError
from diffusion_jax.mesh import data_mesh
from diffusion_jax.progress import console

# the keys of a config that fix the shapes of the parameters
NETWORK_KEYS = ("model.ch", "model.ch_mult", "model.num_res_blocks", "model.attn_resolutions",
                "model.resamp_with_conv", "data.channels", "diffusion.var_type")


# what a resumed run may change without --allow_config_change: how long it runs; how often it logs,
# saves, samples and evaluates; where its data and held-out images are. Any other difference changes
# the run itself.
RESUMABLE_CHANGES = ("train.num_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.keep_period", "train.profile_steps", "data.data_dir", "data.eval_name", "sample.",
                     "eval.")


def check_resume_settings(config, saved_config: dict, allow_config_change: bool) -> list[str]:
    """The settings in which ``config`` differs from the checkpoint's (beyond ``RESUMABLE_CHANGES``);
    a ConfigError listing them unless ``allow_config_change``."""
    ours, theirs = config_lib.flatten(config), config_lib.flatten(saved_config)
    differing = [f"{k} ({theirs[k]!r} in the checkpoint, {ours[k]!r} now)" for k in ours
                 if k in theirs and ours[k] != theirs[k] and not k.startswith(RESUMABLE_CHANGES)]
    if differing and not allow_config_change:
        raise ConfigError("the workdir's checkpoint was trained with other settings: " + ", ".join(differing)
                          + "; resume with the checkpoint's settings, or add --allow_config_change to go on "
                          "with these")
    return differing


def check_resume_compatible(config, saved_config: dict) -> None:
    """Refuse a checkpoint whose network differs from the config's (a CheckpointError, status 5: the
    checkpoint is not the network's), or whose timestep sampler does (a ConfigError)."""
    ours, theirs = config_lib.flatten(config), config_lib.flatten(saved_config)
    differing = [f"{k} ({theirs[k]!r} in the checkpoint, {ours[k]!r} now)" for k in NETWORK_KEYS
                 if ours[k] != theirs[k]]
    if differing:
        raise CheckpointError("the workdir's checkpoint was made with a different network: "
                              + ", ".join(differing) + "; use a new --workdir or the checkpoint's settings")
    theirs = saved_config["diffusion"].get("timestep_sampler", "uniform")  # a config without the key: uniform
    if config.diffusion.timestep_sampler != theirs:
        raise ConfigError(f"the workdir's checkpoint was trained with diffusion.timestep_sampler {theirs!r}, "
                          f"the config has {config.diffusion.timestep_sampler!r}; use a new --workdir or the "
                          "checkpoint's setting")


DIGESTS = "digests"  # the checkpoint item of the state's checksums (save_args, restore_state)
_ODD = np.uint32(2654435761)  # Knuth's multiplicative constant: odd, so every weight below is odd


@jax.jit
def _checksums(tree):
    """Per array: sum_i bits(x_i) * (2 i + 1) * _ODD mod 2^32, over its elements' bit patterns, computed
    where the arrays are. Integer sums are exact in any order, so every backend and sharding gives the
    same value; any change of one element changes it (its weight is odd, so a unit mod 2^32)."""
    def checksum(x):
        x = jnp.asarray(x).reshape(-1)
        if x.dtype.itemsize == 4:
            bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        elif x.dtype == jnp.bool_:
            bits = x.astype(jnp.uint32)
        else:
            unsigned = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
            bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
        weights = (2 * jnp.arange(x.size, dtype=jnp.uint32) + 1) * _ODD
        return jnp.sum(bits * weights, dtype=jnp.uint32)

    return jax.tree_util.tree_map(checksum, tree)


def digests(tree) -> dict[str, int]:
    """The checksum of each array of ``tree`` (:func:`_checksums`), by its path. The sums are
    replicated: each process reads its own copy (a multi-process array spans other hosts' devices)."""
    sums = _checksums(tree)
    return {jax.tree_util.keystr(path): int(np.asarray(value.addressable_data(0))) for path, value in
            jax.tree_util.tree_flatten_with_path(sums)[0]}


def save_args(state: TrainState, config) -> ocp.args.Composite:
    """A checkpoint of ``state`` (:func:`saved_tree`), the run's config and the state's digests, saved
    together: a checkpoint is complete with all three or not at all."""
    tree = saved_tree(state)
    return ocp.args.Composite(state=ocp.args.StandardSave(tree), config=ocp.args.JsonSave(config.to_dict()),
                              **{DIGESTS: ocp.args.JsonSave(digests(tree))})


class DigestMismatch(ValueError):
    """Arrays of a checkpoint whose checksums differ from those saved with it: damaged in storage."""


def restore_state(manager: ocp.CheckpointManager, step: int, abstract: TrainState) -> TrainState:
    """The train state saved at ``step``, shaped and sharded as ``abstract`` (see :func:`saved_tree`),
    its arrays checked against the digests saved with them (a checkpoint saved before digests were
    is read unchecked); a DigestMismatch names the arrays that differ."""
    items = {"state": ocp.args.StandardRestore(saved_tree(abstract))}
    if (epath.Path(manager.directory) / str(step) / DIGESTS).exists():
        items[DIGESTS] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    tree = restored["state"]
    if DIGESTS in items:
        saved, found = restored[DIGESTS], digests(tree)
        differing = sorted(k for k in saved.keys() | found.keys() if saved.get(k) != found.get(k))
        if differing:
            named = ", ".join(differing[:3]) + (", ..." if len(differing) > 3 else "")
            raise DigestMismatch(f"{len(differing)} array(s) differ from their checksums saved with the "
                                 f"checkpoint: {named}")
    return TrainState(**tree)


def saved_tree(state: TrainState) -> dict:
    """What a checkpoint holds of ``state``: its fields without those the run does not use (None),
    so that a checkpoint holds only what its run trains."""
    return {k: v for k, v in state._asdict().items() if v is not None}


def checkpoint_manager(workdir: epath.Path, config, create: bool) -> ocp.CheckpointManager:
    """The run's checkpoints, ``workdir/checkpoints`` (``workdir``: a ``storage.checkpoint_path``)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.train.keep_checkpoints, keep_period=config.train.keep_period or None,
        create=create, cleanup_tmp_directories=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(workdir / "checkpoints", options=options)


def restore_config(manager: ocp.CheckpointManager, step: int) -> dict:
    """The config saved beside the checkpoint of ``step``, as a dict."""
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def _on_any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.bool_(flag))))


def _set_aside(manager: ocp.CheckpointManager, workdir: epath.Path, step: int, error: Exception) -> None:
    """Move the unreadable checkpoint of ``step`` to ``WORKDIR/unreadable_checkpoints/`` (never delete it)."""
    reason = errors.described(error)
    target = workdir / "unreadable_checkpoints" / f"{step}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        (workdir / "checkpoints" / str(step)).rename(target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"checkpoints._set_aside: step {step}")
    manager.reload()
    if jax.process_index() == 0:  # a warning: on stderr, with the run's other warnings and errors
        print(f"warning: the checkpoint of step {step} cannot be read ({reason}); moved it to {target}",
              file=sys.stderr, flush=True)


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
        raise CheckpointError(f"none of the checkpoints of steps {sorted(tried)} in "
                              f"{workdir / 'checkpoints'} can be read; they were moved to "
                              f"{workdir / 'unreadable_checkpoints'}. Start a new --workdir, or restore them "
                              "from a copy")
    return None, None


class Saves:
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
            reason = errors.first_line(e) or type(e).__name__
            raise StorageError(f"saving the checkpoint of step {failed} in {self.manager.directory} failed: "
                               f"{reason}; the checkpoints before it are intact") from e

    def save(self, step: int, args) -> None:
        self._guard(lambda: self.manager.save(step, args=args, force=True), step)
        self.in_flight = step

    def check(self) -> None:
        if self.in_flight is not None:
            self._guard(self.manager.check_for_errors)

    def finish(self) -> None:
        self._guard(self.manager.wait_until_finished)
        self.in_flight = None



PARAMS = ("ema", "raw")


class Loaded(NamedTuple):
    config: Any  # ml_collections.ConfigDict
    params: Any
    source: str  # what was loaded: WORKDIR/checkpoints/STEP (ema or raw) or a converted checkpoint's path


def _kind(path: epath.Path) -> str:
    if (path / "model").is_dir() and (path / "params").is_dir():
        return "converted"
    if (path / "state").is_dir() and (path / "config").is_dir():
        return "training"
    raise CheckpointError(f"{path} is not a checkpoint: expected convert.py's output (with model/ and "
                          "params/) or a training checkpoint WORKDIR/checkpoints/STEP (with state/ and "
                          "config/)")


def _training(workdir: epath.Path, step: int | None, which: str, config):
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"{workdir} holds no checkpoints (no {directory}); "
                              f"train with train.py --workdir={workdir}")
    options = ocp.CheckpointManagerOptions(create=False)
    given = config

    def read(step):
        saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        if given is None:
            config = config_lib.base()
            config.update(saved)  # keys added to the schema since the run keep their defaults
        else:
            config = given
            check_resume_compatible(config, saved)
        replicated = NamedSharding(data_mesh(), P())
        return config, restore_state(manager, step, builders.abstract_state(config, replicated))

    with ocp.CheckpointManager(directory, options=options) as manager:
        steps = manager.all_steps()
        if not steps:
            raise CheckpointError(f"{directory} holds no complete checkpoint")
        if step is None:  # the latest readable one; an unreadable one is set aside as train.py does
            step, (config, state) = latest_readable(manager, workdir, read)
        elif step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {directory}; there are steps "
                                  f"{sorted(steps)}")
        else:
            try:
                config, state = read(step)
            except errors.Error:
                raise
            except Exception as e:  # noqa: BLE001  (Orbax and TensorStore raise many kinds for damaged files)
                raise CheckpointError(
                    f"the checkpoint of step {step} in {directory} cannot be read "
                    f"({errors.described(e)})") from e
    notice = builders.ema_notice(config.optim, step) if which == "ema" else None
    if notice:
        console(notice)
    return Loaded(config, state.ema_params if which == "ema" else state.params,
                  f"{directory / str(step)} ({which})")


def _converted(path: epath.Path, which: str, config):
    if which != "ema":
        raise ConfigError(f"{path} is a converted checkpoint with one set of parameters; params={which!r} "
                          "does not apply (convert.py --raw chooses the raw TF weights when converting)")
    params, unet, image_shape = convert.load(path)
    config = config_lib.base() if config is None else ml_collections.ConfigDict(config.to_dict())
    expected = builders.out_channels(config)
    channels = image_shape[2]
    if channels != config.data.channels or unet.out_ch != expected:
        raise ConfigError(f"{path} does not fit the config: the network takes {channels} channels and "
                          f"outputs {unet.out_ch}, the config has data.channels={config.data.channels} and "
                          f"diffusion.var_type={config.diffusion.var_type!r} (so {expected} outputs)")
    config.model.update(ch=unet.ch, ch_mult=unet.ch_mult, num_res_blocks=unet.num_res_blocks,
                        attn_resolutions=unet.attn_resolutions, resamp_with_conv=unet.resamp_with_conv,
                        dropout=0.0, num_classes=0)  # the released networks are unconditional
    config.data.image_size = image_shape[0]
    return Loaded(config, params, str(path))


def load(*, workdir: str | None = None, checkpoint: str | None = None, step: int | None = None,
         which: str = "ema", config=None) -> Loaded:
    """The config and params of ``workdir``'s checkpoint (the latest, or ``step``) or of ``checkpoint``.

    ``which`` is 'ema' or 'raw' (training checkpoints only). ``config``, if given, supplies the
    diffusion and sampling settings and must describe the checkpoint's network.
    """
    if (workdir is None) == (checkpoint is None):
        raise ConfigError("give exactly one of --workdir (a training run) and --checkpoint "
                          "(a checkpoint directory)")
    if which not in PARAMS:
        raise ConfigError(f"params must be one of {PARAMS}, got {which!r}")
    if checkpoint is not None:
        checkpoint = storage.checkpoint_path(checkpoint, what="checkpoint")
        storage.check_reachable(checkpoint, what="checkpoint")
        if not checkpoint.is_dir():
            raise CheckpointError(f"checkpoint {checkpoint} does not exist")
        if _kind(checkpoint) == "converted":
            if step is not None:
                raise ConfigError("--step applies to training workdirs, not to a converted checkpoint")
            return _converted(checkpoint, which, config)
        workdir, step = checkpoint.parent.parent, int(checkpoint.name)
    else:
        workdir = storage.checkpoint_path(workdir)
        storage.check_reachable(workdir, what="workdir")
    return _training(workdir, step, which, config)
