"""A tiny run for the training tests: digits, a two-level 32-channel U-Net, T = 100.

Adam's eps is 1e-3 rather than 1e-8: behind the zero-initialized layers the first gradients
are ~1e-10, where the order of a sum over devices decides their low bits, and eps = 1e-8
would scale that rounding up to updates of ~lr * g / eps. With eps = 1e-3 runs on different
device counts can be compared at float32 tolerance.
"""

from diffusion_jax import config as config_lib


def get_config():
    c = config_lib.base()
    c.data.update(name="digits", image_size=16, channels=1, randflip=True)
    c.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1)
    c.diffusion.update(num_timesteps=100)
    c.optim.update(lr=1e-3, warmup_steps=2, ema_decay=0.9, eps=1e-3)
    c.train.update(batch_size=8, num_steps=5, log_every=1, checkpoint_every=100, keep_checkpoints=3)
    c.sample.update(every=0, num=8, steps=5)
    return c
