"""Import of released DDPM weights into the :class:`~diffusion_jax.models.unet.UNet` params.

Two sources:

- the diffusers ``UNet2DModel`` format: a directory with ``config.json`` and
  ``diffusion_pytorch_model.safetensors`` (or ``.bin``), as the hub's ``google/ddpm-*``
  models. ``google/ddpm-cifar10-32`` holds the *raw* weights (FID about 12); the
  ``google/ddpm-ema-*`` 256x256 models hold EMA weights;
- the original TF checkpoints of the DDPM release (e.g. ``model.ckpt-790000`` of the
  CIFAR-10 run), which hold raw and ``ExponentialMovingAverage`` copies of each variable;
  the EMA copy is the one behind FID 3.17.

The converted tree is compared with the configured network before anything is written:
a checkpoint whose names or shapes do not fit is refused with the first mismatches named.
The result is one Orbax checkpoint directory holding ``params`` and ``model`` (the UNet
settings), written atomically.

    python -m diffusion_jax.convert --diffusers DIR --out OUT [--preset ddpm_cifar10]
    python -m diffusion_jax.convert --tf-checkpoint PREFIX --out OUT [--raw] [--preset ...]
"""

from __future__ import annotations

import argparse
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from diffusion_jax import errors, host_tensorflow, storage, xla_flags
from diffusion_jax.errors import CheckpointError, ConfigError
from diffusion_jax.models.unet import PRESETS, UNet

# diffusers layer names -> ours; the legacy attention names (query, key, value, proj_attn)
# are those of checkpoints saved before diffusers 0.12.
_DIFFUSERS_LAYERS = {
    "norm1": "norm1", "norm2": "norm2", "conv1": "conv1", "conv2": "conv2",
    "time_emb_proj": "temb_proj", "conv_shortcut": "nin_shortcut",
    "group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v", "value": "v",
    "to_out.0": "proj_out", "proj_attn": "proj_out",
}
_TF_KINDS = {"W": "kernel", "b": "bias", "gamma": "scale", "beta": "bias"}
_DENSE = ("temb_dense0", "temb_dense1", "temb_proj", "nin_shortcut", "q", "k", "v", "proj_out")
# diffusers UNet2DModel settings that the DDPM network has; anything else is a different network
_DIFFUSERS_FIXED = dict(
    act_fn="silu", norm_num_groups=32, norm_eps=1e-6, time_embedding_type="positional", flip_sin_to_cos=False,
    freq_shift=1, downsample_padding=0, center_input_sample=False, resnet_time_scale_shift="default",
    class_embed_type=None, num_class_embeds=None, mid_block_scale_factor=1, add_attention=True,
)


def _to_flax(path: tuple, value: np.ndarray) -> np.ndarray:
    """A PyTorch weight in our layout: OIHW conv -> HWIO; [out, in] linear or 1x1 conv -> [in, out]."""
    if path[-1] != "kernel":
        return value
    if value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
        return value.reshape(value.shape[2:]) if path[-2] in _DENSE else value
    return value.T


def _diffusers_path(name: str, levels: int):
    """Our params path for a diffusers ``UNet2DModel`` state-dict name (None if unknown)."""
    stem, _, kind = name.rpartition(".")
    kind = {"weight": "kernel", "bias": "bias"}.get(kind)
    top = {"time_embedding.linear_1": ("temb_dense0",), "time_embedding.linear_2": ("temb_dense1",),
           "conv_in": ("conv_in",), "conv_norm_out": ("norm_out",), "conv_out": ("conv_out",)}
    if stem in top:
        path = top[stem]
    elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", stem):
        side, level, kind_of, index, layer = m.groups()
        # diffusers' up_blocks start at the bottom
        level = int(level) if side == "down" else levels - 1 - int(level)
        block = "block" if kind_of == "resnets" else "attn"
        if layer not in _DIFFUSERS_LAYERS:
            return None
        path = (f"{side}_{level}_{block}_{index}", _DIFFUSERS_LAYERS[layer])
    elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv", stem):
        side, level, _ = m.groups()
        level = int(level) if side == "down" else levels - 1 - int(level)
        path = (f"{side}_{level}_{side}sample_conv",)
    elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", stem):
        kind_of, index, layer = m.groups()
        if layer not in _DIFFUSERS_LAYERS:
            return None
        name = f"mid_block_{int(index) + 1}" if kind_of == "resnets" else f"mid_attn_{int(index) + 1}"
        path = (name, _DIFFUSERS_LAYERS[layer])
    else:
        return None
    if kind is None:
        return None
    if path[-1].startswith("norm"):
        kind = "scale" if kind == "kernel" else kind
    return path + (kind,)


def unet_kwargs_from_diffusers_config(config: dict) -> dict:
    """Our UNet settings for a diffusers ``UNet2DModel`` config, refusing other networks."""
    different = {k: (config.get(k, v), v) for k, v in _DIFFUSERS_FIXED.items() if config.get(k, v) != v}
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        different["_class_name"] = (config["_class_name"], "UNet2DModel")
    channels = list(config["block_out_channels"])
    ch = channels[0]
    head_dim = config.get("attention_head_dim")
    # strict=False: lists of different lengths are a malformed config (diffusers refuses it), not checked here
    if head_dim is not None and any(
            head_dim != c for c, t in zip(channels, config["down_block_types"], strict=False) if "Attn" in t):
        different["attention_head_dim"] = (head_dim, "None (one head, as DDPM)")
    if any(c % ch for c in channels):
        different["block_out_channels"] = (channels, "multiples of the first entry")
    if different:
        details = "; ".join(f"{k} = {got!r} (DDPM: {want!r})" for k, (got, want) in sorted(different.items()))
        raise CheckpointError(f"this diffusers UNet2DModel is not the DDPM network: {details}")
    size = config["sample_size"]
    return dict(
        ch=ch, ch_mult=tuple(c // ch for c in channels), num_res_blocks=config["layers_per_block"],
        attn_resolutions=tuple(size // 2**i for i, t in enumerate(config["down_block_types"]) if "Attn" in t),
        out_ch=config["out_channels"],
    )


def load_diffusers(directory: str):
    """(flat params {path: array}, UNet kwargs, image shape) from a diffusers model directory."""
    directory = storage.path(directory, what="diffusers directory")
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory} is not a diffusers UNet2DModel directory: it has no "
                              "config.json (give a directory with config.json and "
                              "diffusion_pytorch_model.safetensors, as the hub's google/ddpm-* models)")
    config = storage.read_json(directory / "config.json")
    kwargs = unet_kwargs_from_diffusers_config(config)
    safetensors_file = directory / "diffusion_pytorch_model.safetensors"
    if safetensors_file.exists():
        from safetensors.numpy import load

        state = load(safetensors_file.read_bytes())
    else:
        bin_file = directory / "diffusion_pytorch_model.bin"
        if not bin_file.exists():
            raise CheckpointError(f"{directory} has neither diffusion_pytorch_model.safetensors nor .bin")
        try:
            import torch
        except ImportError as e:
            raise CheckpointError("reading a .bin checkpoint needs torch (pip install torch); "
                                  "a .safetensors file does not") from e
        with bin_file.open("rb") as f:
            state = {k: v.numpy() for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}
    levels = len(kwargs["ch_mult"])
    flat, unknown = {}, []
    for name, value in state.items():
        path = _diffusers_path(name, levels)
        if path is None:
            unknown.append(name)
        else:
            flat[path] = _to_flax(path, np.asarray(value, np.float32))
    if unknown:
        raise CheckpointError(f"unknown names in {directory}: {', '.join(sorted(unknown)[:8])}")
    image_shape = (config["sample_size"], config["sample_size"], config["in_channels"])
    return flat, kwargs, image_shape


def _tf_path(name: str):
    """Our params path for an original TF variable name such as ``model/down_0/block_1/conv2/W``."""
    parts = name.split("/")
    if len(parts) < 3 or parts[0] != "model" or parts[-1] not in _TF_KINDS:
        return None
    scope, kind = parts[1:-1], _TF_KINDS[parts[-1]]
    if scope[0] == "temb" or (len(scope) == 3 and scope[1] in ("downsample", "upsample")):
        return ("_".join(scope), kind)
    if re.fullmatch(r"down_\d+|up_\d+|mid", scope[0]):
        return ("_".join(scope[:2]),) + tuple(scope[2:]) + (kind,)
    return tuple(scope) + (kind,)


def load_tf_checkpoint(prefix: str, *, ema: bool = True):
    """Flat params from an original DDPM TF checkpoint: its EMA copies, or the raw variables."""
    tf = host_tensorflow.tensorflow()
    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as e:
        raise CheckpointError(f"{prefix} is not a TF checkpoint prefix (PREFIX.index and PREFIX.data-*): "
                              f"{str(e).splitlines()[0]}") from e
    suffix = "/ExponentialMovingAverage"
    flat = {}
    for name in reader.get_variable_to_shape_map():
        if ema != name.endswith(suffix):
            continue
        path = _tf_path(name[: -len(suffix)] if ema else name)
        if path is not None:
            flat[path] = np.asarray(reader.get_tensor(name), np.float32)
    if not flat:
        kind = "ExponentialMovingAverage copies" if ema else "raw model/ variables"
        raise CheckpointError(f"{prefix} holds no {kind} of DDPM model variables")
    return flat


def fit(flat: dict, model: UNet, image_shape) -> dict:
    """The nested params tree, after checking names and shapes against ``model``."""
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(image_shape)),
                           jnp.zeros((1,), jnp.int32))
    )
    expected = {k: v.shape for k, v in traverse_util.flatten_dict(abstract["params"]).items()}
    name = "/".join
    missing = sorted(name(k) for k in expected.keys() - flat.keys())
    extra = sorted(name(k) for k in flat.keys() - expected.keys())
    shapes = sorted(f"{name(k)} {flat[k].shape} (network: {expected[k]})"
                    for k in expected.keys() & flat.keys() if flat[k].shape != expected[k])
    problems = [f"{label}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
                for label, items in (("missing from the checkpoint", missing), ("not in the network", extra),
                                     ("shape differs", shapes)) if items]
    if problems:
        raise CheckpointError("the checkpoint does not fit the configured network; " + "; ".join(problems))
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})


def save(directory: str, params, unet_kwargs: dict, image_shape) -> None:
    """One atomic Orbax checkpoint: ``params`` and ``model`` (UNet kwargs and image shape)."""
    directory = storage.checkpoint_path(directory, what="--out")
    if directory.exists():
        raise ConfigError(f"{directory} exists; choose a new --out directory")
    model = dict(unet=dict(unet_kwargs), image_shape=list(image_shape))
    model["unet"]["ch_mult"] = list(model["unet"]["ch_mult"])
    model["unet"]["attn_resolutions"] = list(model["unet"]["attn_resolutions"])
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(directory, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), model=ocp.args.JsonSave(model)))


def load(directory: str):
    """(params, UNet, image shape) from a checkpoint written by :func:`save`."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        path = storage.checkpoint_path(directory, what="checkpoint")
        restored = checkpointer.restore(path, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(), model=ocp.args.JsonRestore()))
    model = restored["model"]
    unet = dict(model["unet"], ch_mult=tuple(model["unet"]["ch_mult"]),
                attn_resolutions=tuple(model["unet"]["attn_resolutions"]))
    return restored["params"], UNet(**unet), tuple(model["image_shape"])


def main(argv=None):
    xla_flags.set_defaults()  # before JAX starts its backends
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--diffusers", metavar="DIR", help="a diffusers UNet2DModel directory")
    source.add_argument("--tf-checkpoint", metavar="PREFIX", help="an original DDPM TF checkpoint prefix")
    parser.add_argument("--out", required=True, help="new directory for the converted checkpoint")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="the network to fit (default: from config.json; ddpm_cifar10 for TF "
                             "checkpoints)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image side for TF checkpoints (default 32)")
    parser.add_argument("--out-ch", type=int, default=3,
                        help="output channels for TF checkpoints (6: learned variance)")
    parser.add_argument("--raw", action="store_true",
                        help="TF checkpoints: take the raw weights, not the EMA copies")
    args = parser.parse_args(argv)
    try:
        if args.diffusers:
            flat, kwargs, image_shape = load_diffusers(args.diffusers)
            if args.preset:
                wanted = dict(PRESETS[args.preset], out_ch=kwargs["out_ch"])
                differing = sorted(k for k in kwargs if k != "dropout" and kwargs[k] != wanted.get(k))
                if differing:
                    raise CheckpointError(f"{args.diffusers} is not the {args.preset} network: differs in "
                                          + ", ".join(f"{k} ({kwargs[k]} vs {wanted[k]})" for k in differing))
        else:
            flat = load_tf_checkpoint(args.tf_checkpoint, ema=not args.raw)
            kwargs = dict(PRESETS[args.preset or "ddpm_cifar10"], out_ch=args.out_ch)
            image_shape = (args.image_size or 32,) * 2 + (3,)
        kwargs.pop("dropout", None)  # a training setting: sampling runs deterministic
        params = fit(flat, UNet(**kwargs), image_shape)
        save(args.out, params, kwargs, image_shape)
    except errors.Error as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    print(f"wrote {args.out}: {sum(v.size for v in jax.tree_util.tree_leaves(params)):,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
