"""The DDPM U-Net (Ho et al. 2020, appendix B), ported layer by layer from the original
TF code (``diffusion_tf/models/unet.py`` and ``nn.py``) to Flax Linen.

Submodule names follow the original variable scopes (``down_0/block_1/conv2`` becomes
``down_0_block_1`` / ``conv2``) so that released checkpoints map one to one. Input: x_t
float32 NHWC in [-1, 1] and integer timesteps t [B] in [0, T); output: ``out_ch``
channels (C, or 2C for a learned variance).

Details kept from the original: sinusoidal timestep embedding of the integer t with
frequencies exp(-log(10000) k / (ch/2 - 1)), sin before cos; GroupNorm with 32 groups
and eps 1e-6; swish; single-head self-attention over all positions, scaled by C^-1/2;
stride-2 3x3 downsampling conv with TF 'SAME' padding (0 before, 1 after); nearest x2
upsampling then a 3x3 conv (computed as four 2x2 convs of the low-resolution input);
variance-scaling (fan_avg, uniform) init with scale 1e-10 for the layers the original
initializes near zero (each block's conv2, attention's proj_out, conv_out); zero biases.

Class-conditional networks (``num_classes`` K > 0, for classifier-free guidance, Ho & Salimans
2022) add a learned embedding of the label y in [0, K] to the timestep embedding after its two
dense layers, as improved DDPM's and ADM's ``label_emb``; label K is "no class", on which the
network is trained by dropping labels (``diffusion.cond_drop_prob``) and which guidance uses for
its unconditional pass (``guidance.py``). With K = 0 the network is the paper's, parameter for
parameter, and takes no labels.

``dtype`` sets the compute dtype of convolutions, dense layers and attention (bfloat16
where a config asks for it); parameters, normalization statistics and the output stay
float32, and so do the loss, the gradients' accumulation into float32 params, Adam and the
EMA. bfloat16 needs no loss scaling: it has float32's 8-bit exponent, so small gradients do
not underflow as in float16. ``precision``, if set, is the ``jax.default_matmul_precision`` of
those float32 operations ('highest': float32 on every backend; None: JAX's setting, which on a
TPU rounds their operands to bfloat16 and on recent NVIDIA GPUs to TF32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import conv, norm

GROUPS = 32
NORM_EPS = 1e-6


def default_init(scale: float = 1.0):
    """The original's ``default_init``: variance scaling, fan_avg, uniform (scale 0 -> 1e-10)."""
    return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


def timestep_embedding(t: jnp.ndarray, dim: int) -> jnp.ndarray:
    """[sin(t f_k), cos(t f_k)] with f_k = exp(-log(10000) k / (dim/2 - 1)) (the original's
    ``get_timestep_embedding``), zero-padded to odd ``dim``."""
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape [B], got {t.shape}")
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000) / (half - 1)))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def check_labels(y, batch: int, num_classes: int) -> None:
    """A ValueError unless ``y`` fits the network: int labels [B] for a conditional one, None otherwise.

    Only shapes and dtypes are checked here (they are known when the network is traced); the values,
    in [0, num_classes], are checked where the labels are made (``guidance``, ``train_lib``)."""
    if not num_classes:
        if y is not None:
            raise ValueError("this network is unconditional (model.num_classes = 0) and takes no labels y")
        return
    if y is None:
        raise ValueError(f"this network is class-conditional (model.num_classes = {num_classes}): give the "
                         f"labels y [B], in [0, {num_classes}), or {num_classes} for no class")
    if y.shape != (batch,) or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"labels y must be integers of shape [B] = [{batch}], got {y.dtype} {y.shape}")


class _Layers:
    """Conv, dense and norm layers with the original's initialization and our dtypes."""

    def __init__(self, dtype):
        self.dtype = dtype

    def conv(self, features, name, *, stride=1, kernel=3, scale=1.0):
        return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME", name=name,
                       kernel_init=default_init(scale), dtype=self.dtype,
                       conv_general_dilated=conv.conv_general_dilated)

    def dense(self, features, name, *, scale=1.0):
        return nn.Dense(features, name=name, kernel_init=default_init(scale), dtype=self.dtype,
                        dot_general=conv.dot_general)

    def norm(self, name):
        return norm.GroupNorm(GROUPS, NORM_EPS, name=name)


class UpsampleConv(nn.Module):
    """Nearest-neighbour x2 upsampling then a 3x3 'SAME' convolution (the original's ``upsample``
    with ``with_conv``), computed by ``conv.upsample_conv`` on the low-resolution input: 4/9 of
    the FLOPs. Parameters, their initialization and dtypes as the ``nn.Conv`` it replaces."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", default_init(), (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return conv.upsample_conv(x.astype(self.dtype), kernel) + bias.astype(self.dtype)


class ResnetBlock(nn.Module):
    """GN, swish, conv3x3; + dense(swish(temb)); GN, swish, dropout, conv3x3 (zero init);
    a 1x1 ``nin_shortcut`` when the channel count changes."""

    out_ch: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb, *, train: bool):
        layers = _Layers(self.dtype)
        h = layers.conv(self.out_ch, "conv1")(nn.swish(layers.norm("norm1")(x)))
        h = h + layers.dense(self.out_ch, "temb_proj")(nn.swish(temb))[:, None, None, :]
        h = nn.swish(layers.norm("norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = layers.conv(self.out_ch, "conv2", scale=0.0)(h)
        if x.shape[-1] != self.out_ch:
            x = layers.dense(self.out_ch, "nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions with 1x1 q, k, v, proj_out (zero init)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        layers = _Layers(self.dtype)
        B, H, W, C = x.shape
        h = layers.norm("norm")(x)
        q, k, v = (layers.dense(C, name)(h).reshape(B, H * W, 1, C) for name in ("q", "k", "v"))
        h = jax.nn.dot_product_attention(q, k, v).reshape(B, H, W, C)  # softmax(q k^T / sqrt(C)) v
        return x + layers.dense(C, "proj_out", scale=0.0)(h)


class UNet(nn.Module):
    """The DDPM network; ``unet2d16b2`` (CIFAR-10) is ch=128, ch_mult=(1, 2, 2, 2), attention at 16."""

    ch: int = 128
    out_ch: int = 3
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    num_classes: int = 0  # K > 0: class-conditional, labels y in [0, K], K meaning "no class"
    dtype: Any = jnp.float32
    precision: str | None = None  # jax.default_matmul_precision's name, None: JAX's setting

    @property
    def null_label(self) -> int:
        """The "no class" label of a class-conditional network: K, after the classes 0..K-1."""
        return self.num_classes

    def __call__(self, x, t, y=None, *, train: bool = False):
        if self.precision is None:
            return self.network(x, t, y, train=train)
        with jax.default_matmul_precision(self.precision):
            return self.network(x, t, y, train=train)

    @nn.compact
    def network(self, x, t, y=None, *, train: bool = False):
        B, S, S2, _ = x.shape
        levels = len(self.ch_mult)
        if S != S2 or S % 2 ** (levels - 1):
            raise ValueError(
                f"images must be square with a side divisible by 2^(levels - 1) = {2 ** (levels - 1)}, "
                f"got {S}x{S2}"
            )
        if t.shape != (B,):
            raise ValueError(f"timesteps must have shape [B] = [{B}], got {t.shape}")
        check_labels(y, B, self.num_classes)
        layers = _Layers(self.dtype)
        block = lambda out_ch, name: ResnetBlock(out_ch, self.dropout, self.dtype, name=name)  # noqa: E731

        temb = timestep_embedding(t, self.ch)
        temb = layers.dense(4 * self.ch, "temb_dense0")(temb)
        temb = layers.dense(4 * self.ch, "temb_dense1")(nn.swish(temb))
        if self.num_classes:
            temb = temb + nn.Embed(self.num_classes + 1, 4 * self.ch, name="label_emb")(y)

        hs = [layers.conv(self.ch, "conv_in")(x.astype(self.dtype))]
        for level in range(levels):
            for i in range(self.num_res_blocks):
                h = block(self.ch * self.ch_mult[level], f"down_{level}_block_{i}")(hs[-1], temb, train=train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(self.dtype, name=f"down_{level}_attn_{i}")(h)
                hs.append(h)
            if level != levels - 1:
                hs.append(self._downsample(hs[-1], f"down_{level}_downsample", layers))

        h = hs[-1]
        h = block(h.shape[-1], "mid_block_1")(h, temb, train=train)
        h = AttnBlock(self.dtype, name="mid_attn_1")(h)
        h = block(h.shape[-1], "mid_block_2")(h, temb, train=train)

        for level in reversed(range(levels)):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = block(self.ch * self.ch_mult[level], f"up_{level}_block_{i}")(h, temb, train=train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(self.dtype, name=f"up_{level}_attn_{i}")(h)
            if level != 0:
                h = self._upsample(h, f"up_{level}_upsample")

        h = nn.swish(layers.norm("norm_out")(h))
        return layers.conv(self.out_ch, "conv_out", scale=0.0)(h).astype(jnp.float32)

    def _downsample(self, x, name, layers):
        if self.resamp_with_conv:
            return layers.conv(x.shape[-1], f"{name}_conv", stride=2)(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")

    def _upsample(self, x, name):
        if self.resamp_with_conv:
            return UpsampleConv(x.shape[-1], self.dtype, name=f"{name}_conv")(x)
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest neighbour x2


# The networks of the paper, by the original code's model names (scripts/run_*.py).
PRESETS = {
    # unet2d16b2, CIFAR-10 32x32: 35,746,307 parameters
    "ddpm_cifar10": dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1),
    # unet2d16b2c112244, CelebA-HQ and LSUN 256x256: 113,673,219 parameters
    "ddpm_256": dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,),
                     dropout=0.0),
}
