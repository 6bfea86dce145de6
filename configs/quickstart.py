"""Quickstart: a small DDPM on the embedded 16x16 handwritten digits (scikit-learn's), offline.

    python train.py --config=configs/quickstart.py --workdir=out/quickstart

Hardware: any CPU; on this project's 2-core machine about 8 minutes with compiling.
Result: grids of samples in out/quickstart/samples/ (step_N.png during training, final.png of
64 of the samples scored at the end), and the sliced Wasserstein distance (pixel space) from 296
samples to 296 of the 297 held-out digits (eval.num_samples), printed next to the same figure
for real digits (the floor) and for the untrained network (the ceiling).
"""

from diffusion_jax import config as config_lib


def get_config():
    c = config_lib.base()
    c.data.update(name="digits", image_size=16, channels=1, randflip=False)
    c.model.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    # the EMA's decay warms up ((1 + n) / (10 + n) until it reaches 0.995), so that the grids of a short
    # run (500 steps on a folder) show its trained network, not the random initialisation the EMA
    # would still hold 8% of
    c.optim.update(lr=1e-3, warmup_steps=100, ema_decay=0.995, ema_warmup=True)
    c.train.update(batch_size=64, num_steps=1200, log_every=100, checkpoint_every=500, keep_checkpoints=2)
    c.sample.update(every=600, num=64, steps=25)
    c.eval.num_samples = 296
    return c
