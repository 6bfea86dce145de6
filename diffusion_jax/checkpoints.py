"""A model to sample or evaluate: its config and parameters from a training workdir or a converted checkpoint.

Two kinds of checkpoint hold a model: a training run's (``WORKDIR/checkpoints/STEP``, with
the run's config, raw and EMA parameters) and ``convert.py``'s output (one set of
parameters and the network's shape, no diffusion settings). Both come back as the same
``(config, params, source)``: the config of a training checkpoint is the run's; that of a converted
one is the given config with the network and image shape of the checkpoint.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from diffusion_jax import config as config_lib
from diffusion_jax import convert, errors, storage, train_lib
from diffusion_jax.errors import CheckpointError, ConfigError

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
    raise CheckpointError(f"{path} is not a checkpoint: expected convert.py's output (with model/ and params/) or "
                          "a training checkpoint WORKDIR/checkpoints/STEP (with state/ and config/)")


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
            train_lib.check_resume_compatible(config, saved)
        return config, train_lib.restore_state(manager, step, train_lib.Trainer(config).abstract_state())

    with ocp.CheckpointManager(directory, options=options) as manager:
        steps = manager.all_steps()
        if not steps:
            raise CheckpointError(f"{directory} holds no complete checkpoint")
        if step is None:  # the latest readable one; an unreadable one is set aside as train.py does
            step, (config, state) = train_lib.latest_readable(manager, workdir, read)
        elif step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {directory}; there are steps {sorted(steps)}")
        else:
            try:
                config, state = read(step)
            except errors.Error:
                raise
            except Exception as e:  # noqa: BLE001  (Orbax and TensorStore raise many kinds for damaged files)
                raise CheckpointError(f"the checkpoint of step {step} in {directory} cannot be read "
                                      f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]})") from e
    return Loaded(config, state.ema_params if which == "ema" else state.params,
                  f"{directory / str(step)} ({which})")


def _converted(path: epath.Path, which: str, config):
    if which != "ema":
        raise ConfigError(f"{path} is a converted checkpoint with one set of parameters; params={which!r} does not "
                          "apply (convert.py --raw chooses the raw TF weights when converting)")
    params, unet, image_shape = convert.load(path)
    config = config_lib.base() if config is None else ml_collections.ConfigDict(config.to_dict())
    expected = config_lib.out_channels(config)
    channels = image_shape[2]
    if channels != config.data.channels or unet.out_ch != expected:
        raise ConfigError(f"{path} does not fit the config: the network takes {channels} channels and outputs "
                          f"{unet.out_ch}, the config has data.channels={config.data.channels} and "
                          f"diffusion.var_type={config.diffusion.var_type!r} (so {expected} outputs)")
    config.model.update(ch=unet.ch, ch_mult=unet.ch_mult, num_res_blocks=unet.num_res_blocks,
                        attn_resolutions=unet.attn_resolutions, resamp_with_conv=unet.resamp_with_conv, dropout=0.0)
    config.data.image_size = image_shape[0]
    return Loaded(config, params, str(path))


def load(*, workdir: str | None = None, checkpoint: str | None = None, step: int | None = None,
         which: str = "ema", config=None) -> Loaded:
    """The config and params of ``workdir``'s checkpoint (the latest, or ``step``) or of ``checkpoint``.

    ``which`` is 'ema' or 'raw' (training checkpoints only). ``config``, if given, supplies the
    diffusion and sampling settings and must describe the checkpoint's network.
    """
    if (workdir is None) == (checkpoint is None):
        raise ConfigError("give exactly one of --workdir (a training run) and --checkpoint (a checkpoint directory)")
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
