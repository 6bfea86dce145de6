"""Class-conditional DDPM on CIFAR-10 with classifier-free guidance (Ho & Salimans 2022).

    python train.py --config=configs/cifar10_cond.py --workdir=DIR
    python evaluate.py --mode=guidance_sweep --workdir=DIR --out=DIR/sweep \\
        --guidance_scales=0,0.1,0.3,1,2,4 --num_samples=50000

The CIFAR-10 recipe of configs/cifar10.py (network, schedule, optimizer, 800k steps) with the
10 classes: a learned class embedding added to the timestep embedding (unet2d16b2 plus an 11 x
512 table: 35,751,939 parameters), and each training label replaced by "no class" with
probability 0.1 (their p_uncond; 0.1 and 0.2 did best in their ImageNet runs). Sample grids
during training are guided at w = 0.3, one class per column. The cost per step is the
unconditional run's; guided sampling costs two network passes a step (one batched forward of
2B), w = 0 one.

Expected behaviour, as in their paper: FID is lowest at a small guidance scale and rises for
larger w, while the Inception score rises steadily with w (samples more typical of their class,
less diverse). Published reference figures: their paper reports ImageNet 64x64 and 128x128, not
CIFAR-10 (128x128: best FID 2.43, at w = 0.3); no published figure exists for this exact
recipe, so the sweep above is the figure to compare runs of it with.
"""

from configs import cifar10


def get_config():
    c = cifar10.get_config()
    c.model.num_classes = 10
    c.diffusion.cond_drop_prob = 0.1
    c.sample.guidance = 0.3
    return c
