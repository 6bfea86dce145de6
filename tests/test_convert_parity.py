"""Weight import: diffusers UNet2DModel and original TF checkpoints into the Flax U-Net."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import torch
from diffusers import UNet2DModel

from diffusion_jax import convert, errors
from diffusion_jax.models.peer_configs import DIFFUSERS_CIFAR10
from diffusion_jax.models.unet import UNet

pytestmark = pytest.mark.parity

CIFAR10 = DIFFUSERS_CIFAR10
# a small network with a learned-variance head (2C outputs)
SMALL = dict(CIFAR10, sample_size=16, out_channels=6, layers_per_block=1, block_out_channels=(32, 64),
             down_block_types=("DownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def random_diffusers_model(config, seed):
    torch.manual_seed(seed)
    model = UNet2DModel(**config).eval()
    with torch.no_grad():  # perturb everything, so zero-initialized layers and norms count too
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def compare_outputs(torch_model, params, flax_model, size, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, size, size, 3)).astype(np.float32)
    t = np.array([0, 417, 999])
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t)).sample
    ours = jax.jit(lambda p, x, t: flax_model.apply({"params": p}, x, t))(params, x, jnp.asarray(t))
    ref = ref.permute(0, 2, 3, 1).numpy()
    assert float(np.abs(ref).max()) > 0.1
    return float(np.abs(np.asarray(ours) - ref).max())


@pytest.mark.parametrize("config, size", [(CIFAR10, 32), (SMALL, 16)], ids=["cifar10", "small-learned-var"])
def test_diffusers_weights_give_the_same_outputs(tmp_path, config, size):
    torch_model = random_diffusers_model(config, seed=0)
    torch_model.save_pretrained(tmp_path / "hub", safe_serialization=True)
    flat, kwargs, image_shape = convert.load_diffusers(str(tmp_path / "hub"))
    model = UNet(**kwargs)
    params = convert.fit(flat, model, image_shape)
    assert compare_outputs(torch_model, params, model, size) <= 1e-4
    # written and read back through the Orbax checkpoint, and through the command line
    convert.save(str(tmp_path / "ckpt"), params, kwargs, image_shape)
    loaded, loaded_model, loaded_shape = convert.load(str(tmp_path / "ckpt"))
    assert loaded_model == model and loaded_shape == image_shape
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    assert convert.main(["--diffusers", str(tmp_path / "hub"), "--out", str(tmp_path / "cli")]) == 0


def test_legacy_attention_names_and_bin_files(tmp_path):
    torch_model = random_diffusers_model(SMALL, seed=1)
    state = torch_model.state_dict()
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for name, value in state.items():
        for new, old in legacy.items():
            name = name.replace(f".{new}.", f".{old}.")
        renamed[name] = value
    os.makedirs(tmp_path / "old")
    torch.save(renamed, tmp_path / "old" / "diffusion_pytorch_model.bin")
    with open(tmp_path / "old" / "config.json", "w") as f:
        json.dump(dict(torch_model.config), f)
    flat, kwargs, image_shape = convert.load_diffusers(str(tmp_path / "old"))
    model = UNet(**kwargs)
    assert compare_outputs(torch_model, convert.fit(flat, model, image_shape), model, 16) <= 1e-4


def tf_name(diffusers_name, levels):
    """The original TF variable name of a diffusers weight, written from diffusion_tf/models/unet.py."""
    stem, kind = diffusers_name.rsplit(".", 1)
    layer = {"norm1": "norm1", "norm2": "norm2", "conv1": "conv1", "conv2": "conv2",
             "time_emb_proj": "temb_proj", "conv_shortcut": "nin_shortcut", "group_norm": "norm", "to_q": "q",
             "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    parts = stem.split(".")
    if stem.startswith("time_embedding"):
        scope = f"temb/dense{int(parts[1][-1]) - 1}"
    elif parts[0] in ("conv_in", "conv_out"):
        scope = parts[0]
    elif parts[0] == "conv_norm_out":
        scope = "norm_out"
    elif parts[0] == "mid_block":
        scope = (f"mid/{'block' if parts[1] == 'resnets' else 'attn'}_{int(parts[2]) + 1}/"
                 f"{layer['.'.join(parts[3:])]}")
    else:
        level = int(parts[1]) if parts[0] == "down_blocks" else levels - 1 - int(parts[1])
        side = parts[0][: -len("_blocks")]
        if parts[2] in ("downsamplers", "upsamplers"):
            scope = f"{side}_{level}/{side}sample/conv"
        else:
            block = "block" if parts[2] == "resnets" else "attn"
            scope = f"{side}_{level}/{block}_{parts[3]}/{layer['.'.join(parts[4:])]}"
    is_norm = scope.split("/")[-1].startswith("norm")
    var = {"weight": "gamma" if is_norm else "W", "bias": "beta" if is_norm else "b"}[kind]
    return f"model/{scope}/{var}"


def tf_layout(value):
    """PyTorch layout -> the original's: conv OIHW -> HWIO, 1x1 conv and linear -> [in, out]."""
    if value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
        return value[0, 0] if value.shape[:2] == (1, 1) else value
    return value.T if value.ndim == 2 else value


def write_tf_checkpoint(prefix, state, levels):
    """A checkpoint with the release's names: raw variables, EMA copies (other values) and Adam slots."""
    names, tensors = [], []
    for name, value in state.items():
        raw = tf_layout(value.numpy())
        var = tf_name(name, levels)
        names += [var, var + "/ExponentialMovingAverage", var + "/Adam"]
        tensors += [raw, raw * 0.5 + 0.01, np.zeros_like(raw)]
    names.append("global_step")
    tensors.append(np.int64(790000))
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(t) for t in tensors])


def test_tf_checkpoint_agrees_with_the_diffusers_path(tmp_path):
    torch_model = random_diffusers_model(SMALL, seed=2)
    torch_model.save_pretrained(tmp_path / "hub", safe_serialization=True)
    flat, kwargs, image_shape = convert.load_diffusers(str(tmp_path / "hub"))
    prefix = str(tmp_path / "model.ckpt-790000")
    write_tf_checkpoint(prefix, torch_model.state_dict(), levels=2)
    raw = convert.load_tf_checkpoint(prefix, ema=False)
    ema = convert.load_tf_checkpoint(prefix, ema=True)
    assert raw.keys() == flat.keys() == ema.keys()
    for k in flat:
        np.testing.assert_array_equal(raw[k], flat[k], err_msg=str(k))
        np.testing.assert_allclose(ema[k], flat[k] * 0.5 + 0.01, rtol=1e-6, err_msg=str(k))
    model = UNet(**kwargs)
    assert compare_outputs(torch_model, convert.fit(raw, model, image_shape), model, 16) <= 1e-4
    out = tmp_path / "from_tf"
    assert convert.main(["--tf-checkpoint", prefix, "--out", str(out), "--preset", "ddpm_cifar10"]) == 5
    assert not out.exists()  # a small network does not fit the CIFAR-10 preset: nothing written


def test_mismatching_checkpoints_are_refused_and_nothing_is_written(tmp_path, capsys):
    random_diffusers_model(SMALL, seed=3).save_pretrained(tmp_path / "hub", safe_serialization=True)
    flat, kwargs, image_shape = convert.load_diffusers(str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=r"does not fit the configured network; missing from the checkpoint: "
                                         r"down_0_block_1/conv1/bias"):
        convert.fit(flat, UNet(**dict(kwargs, num_res_blocks=2)), image_shape)
    with pytest.raises(ValueError, match=r"shape differs: conv_out/bias \(6,\) \(network: \(3,\)\)"):
        convert.fit(flat, UNet(**dict(kwargs, out_ch=3)), image_shape)
    assert convert.main(["--diffusers", str(tmp_path / "hub"), "--out", str(tmp_path / "x"),
                         "--preset", "ddpm_cifar10"]) == 5
    assert "is not the ddpm_cifar10 network: differs in" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    (tmp_path / "hub" / "config.json").write_text(json.dumps(dict(config, freq_shift=0, act_fn="gelu")))
    with pytest.raises(ValueError,
                       match=r"not the DDPM network: act_fn = 'gelu' \(DDPM: 'silu'\); freq_shift = 0"):
        convert.load_diffusers(str(tmp_path / "hub"))
    with pytest.raises(errors.CheckpointError, match="neither diffusion_pytorch_model.safetensors nor .bin"):
        os.remove(tmp_path / "hub" / "diffusion_pytorch_model.safetensors")
        (tmp_path / "hub" / "config.json").write_text(json.dumps(config))
        convert.load_diffusers(str(tmp_path / "hub"))
