"""The Inception network of FID and IS: a Flax port of pytorch-fid's ``InceptionV3`` (FID blocks).

pytorch-fid reproduces the TF graph of 2015-12-05 that the FID (Heusel et al. 2017) and IS
(Salimans et al. 2016) numbers of the DDPM and DDIM papers were computed with: torchvision's
Inception-v3 with the blocks ``FIDInceptionA/C/E_1/E_2`` (average pools that leave the padding
out of the mean; a max pool in the last block) and 1008 classes. Here the same network, NHWC,
with each BatchNorm (eps 1e-3) folded into its convolution: inference only. It gives the 2048
pool features (FID) and the 1008 logits (IS), from uint8 images handled as pytorch-fid does:
/ 255, bilinear resize to 299x299 (``F.interpolate(align_corners=False)``, no antialiasing),
then * 2 - 1.

The weights are pytorch-fid's release, ``pt_inception-2015-12-05-6726825d.pth`` (a PyTorch
state dict; reading it needs torch once), or the ``.npz`` that ``--convert`` makes of it:

    python -m diffusion_jax.evaluation.inception --convert pt_inception-2015-12-05-6726825d.pth \\
        --out pt_inception-2015-12-05-6726825d.npz
"""

from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import errors, storage, xla_flags
from diffusion_jax.errors import DataError
from diffusion_jax.mesh import data_mesh
from diffusion_jax.models import conv

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
WEIGHTS_ENV = "DIFFUSION_JAX_INCEPTION_WEIGHTS"
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax")
BN_EPS = 1e-3  # torchvision's BasicConv2d
SIZE = 299
NUM_FEATURES, NUM_CLASSES = 2048, 1008


class BasicConv(nn.Module):
    """Conv -> BatchNorm -> ReLU, the BatchNorm folded into the conv's kernel and bias.

    The convolution is oneDNN's on a one-device CPU run (diffusion_jax/models/onednn.py).
    """

    features: int
    kernel: tuple = (1, 1)
    strides: int = 1
    padding: tuple = (0, 0)

    @nn.compact
    def __call__(self, x):
        pad = tuple((p, p) for p in self.padding)
        return nn.relu(nn.Conv(self.features, self.kernel, self.strides, padding=pad, name="conv",
                               conv_general_dilated=conv.conv_general_dilated)(x))


def _avg_pool(x):
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, strides=2, padding="VALID"):
    return nn.max_pool(x, (3, 3), (strides, strides), padding=padding)


class InceptionA(nn.Module):  # FIDInceptionA
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, name="branch1x1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(BasicConv(48, name="branch5x5_1")(x))
        b3 = BasicConv(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, name="branch_pool")(_avg_pool(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):  # torchvision's InceptionB (Mixed_6a)
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = BasicConv(64, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):  # FIDInceptionC
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = BasicConv(192, name="branch1x1")(x)
        b7 = BasicConv(c7, name="branch7x7_1")(x)
        b7 = BasicConv(c7, **row, name="branch7x7_2")(b7)
        b7 = BasicConv(192, **col, name="branch7x7_3")(b7)
        bd = BasicConv(c7, name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, **col, name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, **row, name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, **col, name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, **row, name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, name="branch_pool")(_avg_pool(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):  # torchvision's InceptionD (Mixed_7a)
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(BasicConv(192, name="branch3x3_1")(x))
        b7 = BasicConv(192, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):  # FIDInceptionE_1 (average pool) and FIDInceptionE_2 (max pool)
    max_pool: bool

    @nn.compact
    def __call__(self, x):
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = BasicConv(320, name="branch1x1")(x)
        b3 = BasicConv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv(384, **row, name="branch3x3_2a")(b3),
                              BasicConv(384, **col, name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv(448, name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv(384, **row, name="branch3x3dbl_3a")(bd),
                              BasicConv(384, **col, name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _max_pool(x, strides=1, padding=((1, 1), (1, 1))) if self.max_pool else _avg_pool(x)
        bp = BasicConv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(images):
    """uint8 NHWC (C = 1 or 3, any size) -> float32 [N, 299, 299, 3] in [-1, 1], as pytorch-fid."""
    x = images.astype(jnp.float32) / 255.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (SIZE, SIZE):
        x = jax.image.resize(x, (x.shape[0], SIZE, SIZE, 3), "bilinear", antialias=False)
    return 2.0 * x - 1.0


class InceptionV3(nn.Module):
    """uint8 images -> (pool features [N, 2048], logits [N, 1008])."""

    @nn.compact
    def __call__(self, images):
        x = preprocess(images)
        x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool(x)
        x = BasicConv(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool(x)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, name=name)(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        return pool, nn.Dense(NUM_CLASSES, name="fc")(pool)


def weights_path(path: str | None = None) -> str:
    """The weights file: ``path``, else $DIFFUSION_JAX_INCEPTION_WEIGHTS, else the .npz or .pth in the cache.

    The cache is ~/.cache/diffusion_jax/ (local to each host); ``path`` may be on any filesystem
    of ``storage`` (gs://...). A missing file is a DataError that says where to get it.
    """
    if path is None:
        path = os.environ.get(WEIGHTS_ENV)
    if path is None:
        stem = os.path.join(DEFAULT_DIR, os.path.splitext(WEIGHTS_FILE)[0])
        path = next((p for p in (stem + ".npz", stem + ".pth") if os.path.exists(p)), stem + ".pth")
    weights = storage.path(path, what="Inception weights")
    path = str(weights)
    if not weights.exists() or weights.is_dir():
        raise DataError(
            f"the Inception weights for FID and IS are not at {path}. They are pytorch-fid's release "
            f"({WEIGHTS_FILE}); download them once with\n  mkdir -p {DEFAULT_DIR} && "
            f"curl -L -o {os.path.join(DEFAULT_DIR, WEIGHTS_FILE)} {WEIGHTS_URL}\n"
            f"or point to them with --inception_weights (config.eval.inception_weights) or ${WEIGHTS_ENV}")
    return path


def _read_pth(path: str) -> dict:
    try:
        import torch
    except ImportError as e:
        raise DataError(f"reading {path} (a PyTorch file) needs torch: pip install torch (a CPU build is "
                        "enough), or convert it once where torch is installed: python -m "
                        f"diffusion_jax.evaluation.inception --convert {path} --out WEIGHTS.npz") from e
    with storage.path(path).open("rb") as f:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # the unpickler raises any kind of error on bytes it cannot parse
            raise DataError(f"{path} could not be read as a PyTorch state dict ({WEIGHTS_FILE} from "
                            f"pytorch-fid's release): {errors.described(e)}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path} holds a {type(state).__name__}, not a PyTorch state dict of tensors "
                        f"({WEIGHTS_FILE} from pytorch-fid's release)")
    return {k: v.numpy() for k, v in state.items()}


def fold(state: dict) -> dict:
    """pytorch-fid's state dict (``Conv2d_1a_3x3.conv.weight``, ``.bn.running_var``, ``fc.weight``, ...) ->
    the flat params of :class:`InceptionV3` (``Conv2d_1a_3x3/conv/kernel``, ...), each BatchNorm folded in."""
    flat = {}
    for name in state:
        if not name.endswith(".conv.weight"):
            continue
        stem = name[: -len(".conv.weight")]
        gamma, beta, mean, var = (np.asarray(state[f"{stem}.bn.{k}"], np.float64)
                                  for k in ("weight", "bias", "running_mean", "running_var"))
        scale = gamma / np.sqrt(var + BN_EPS)
        kernel = np.asarray(state[name], np.float64).transpose(2, 3, 1, 0) * scale  # OIHW -> HWIO
        path = "/".join(stem.split(".")) + "/conv"
        flat[f"{path}/kernel"] = kernel.astype(np.float32)
        flat[f"{path}/bias"] = (beta - mean * scale).astype(np.float32)
    flat["fc/kernel"] = np.asarray(state["fc.weight"], np.float32).T
    flat["fc/bias"] = np.asarray(state["fc.bias"], np.float32)
    return flat


def abstract_params(sharding=None) -> dict:
    """The shapes and dtypes of :class:`InceptionV3`'s params, placed by ``sharding``, without computing
    them."""
    shapes = jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.uint8))
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                  shapes["params"])


def _shapes() -> dict:
    """{"Block/conv/kernel": shape, ...} of the params of :class:`InceptionV3`."""
    return {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(abstract_params()).items()}


def _unflatten(flat: dict) -> dict:
    """{"Block/conv/kernel": array, ...} -> the nested params of :class:`InceptionV3`, on the device."""
    return jax.tree_util.tree_map(jnp.asarray, traverse_util.unflatten_dict({tuple(k.split("/")): v
                                                                              for k, v in flat.items()}))


def _check(flat: dict, path: str) -> dict:
    expected = _shapes()
    missing = sorted(expected.keys() - flat.keys())
    extra = sorted(flat.keys() - expected.keys())
    shapes = sorted(f"{k} {flat[k].shape} vs {expected[k]}" for k in expected.keys() & flat.keys()
                    if flat[k].shape != expected[k])
    problems = [f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                for label, items in (("missing", missing), ("unexpected", extra), ("shape differs", shapes))
                if items]
    if problems:
        raise DataError(f"{path} is not pytorch-fid's FID Inception ({WEIGHTS_FILE}): " + "; ".join(problems))
    return flat


def load_params(path: str) -> dict:
    """The params of :class:`InceptionV3` from pytorch-fid's ``.pth`` or the ``.npz`` of ``--convert``."""
    if path.endswith(".npz"):
        flat = storage.load_npz(storage.path(path))
    else:
        try:
            state = _read_pth(path)
        except FileNotFoundError as e:
            raise DataError(f"{path}: no such file ({WEIGHTS_FILE} from pytorch-fid's release)") from e
        missing_bn = [k for k in state
                      if k.endswith(".conv.weight") and k.replace(".conv.weight", ".bn.weight") not in state]
        if "fc.weight" not in state or missing_bn:
            raise DataError(f"{path} is not pytorch-fid's FID Inception ({WEIGHTS_FILE}): "
                            f"{'fc.weight' if 'fc.weight' not in state else missing_bn[0]} is missing")
        flat = fold(state)
    return _unflatten(_check(flat, path))


def random_params(seed: int = 0) -> dict:
    """Random params of the network's shapes, for tests and benchmarks without the released weights.

    Kernels are drawn at He scale (variance 2 / fan-in), so that the features keep their scale
    through the 94 ReLU layers; biases are zero. On 40 digits: pool features of mean magnitude
    0.49 and an FID of 0.85 between two halves; Flax's default initializer (variance 1 / fan-in,
    halved by each ReLU) gives 3e-4 and 3e-7. It is also ~2 s against ~20 s of compiling ``init``.
    """
    rng = np.random.default_rng(seed)
    flat = {k: (np.zeros(shape, np.float32) if len(shape) == 1 else
                (rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[:-1]))).astype(np.float32))
            for k, shape in _shapes().items()}
    return _unflatten(flat)


class Extractor:
    """Pool features and logits of uint8 images in batches sharded over all devices.

    N images go in the fewest batches of at most ``batch_size``, all of one size (a multiple of
    the devices; the last padded), so 20 images cost 20, not ``batch_size``, and one compile.
    Every process passes the same images (all of them) and gets all the features back. ``devices``:
    those of the mesh (default: all).
    """

    def __init__(self, params, batch_size: int = 200, devices=None):
        mesh = data_mesh(devices)
        self.batch_size = -(-batch_size // mesh.size) * mesh.size
        self.params, self.data = params, NamedSharding(mesh, P("data"))
        # the jitted network: (variables, uint8 [batch, H, W, 3]) -> (pool, logits)
        self.apply = jax.jit(jax.default_matmul_precision(conv.EVALUATION_PRECISION)(InceptionV3().apply),
                             in_shardings=(NamedSharding(mesh, P()), self.data),
                             out_shardings=self.data)

    def __call__(self, images: np.ndarray, progress=None):
        """uint8 [N, H, W, C] -> (pool [N, 2048] float64, logits [N, 1008] float32); ``progress(done, N)``,
        if given, is called after each batch."""
        pools, logits = [], []
        count, devices = -(-len(images) // self.batch_size), self.data.mesh.size  # the fewest batches
        size = -(-len(images) // (count * devices)) * devices  # of one size, a multiple of the devices
        for start in range(0, len(images), size):
            batch = np.asarray(images[start:start + size])
            padded = np.concatenate([batch, np.zeros((size - len(batch),) + batch.shape[1:], batch.dtype)])
            x = jax.make_array_from_callback(padded.shape, self.data,
                                             lambda index, padded=padded: padded[index])
            pool, logit = (np.asarray(multihost_utils.process_allgather(a, tiled=True))[:len(batch)]
                           for a in self.apply({"params": self.params}, x))
            pools.append(pool.astype(np.float64))
            logits.append(logit)
            if progress is not None:
                progress(start + len(batch), len(images))
        return np.concatenate(pools), np.concatenate(logits)


def main(argv=None):
    xla_flags.set_defaults()  # before JAX starts its backends
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--convert", required=True, metavar="PTH", help="pytorch-fid's weights file")
    parser.add_argument("--out", required=True, metavar="NPZ", help="the .npz to write")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.convert)
    except errors.Error as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    storage.save_npz(storage.path(args.out), **flat)
    print(f"wrote {args.out}: {sum(v.size for v in flat.values()):,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
