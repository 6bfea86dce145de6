"""DDPM on CIFAR-10 (Ho et al. 2020, section 4; the original scripts/run_cifar.py).

    python train.py --config=configs/cifar10.py --workdir=DIR
    # a TPU pod or Slurm cluster: add --distributed; a GPU cluster: --distributed
    #   --coordinator_address=HOST:PORT --num_processes=N --process_id=I on each host

Network: unet2d16b2 (35,746,307 parameters), eps prediction, fixed_large variance, L_simple.
Adam 2e-4 with 5,000 warmup steps, clipping 1.0, batch 128, EMA 0.9999, dropout 0.1, random
flips, T = 1000 linear betas 1e-4 .. 0.02, 800k steps.

Hardware and time: the paper trained on a TPU v3-8 at 21 steps/s (10.6 h for 800k steps);
expect about a day on 8 A100s. On this project's 2-core CPU one step takes about 35 s: not
a CPU job.

Expected result (EMA weights, 50,000 samples, DDPM-1000): FID 3.17 against the training
set, IS 9.46; NLL <= 3.75 bits/dim on the test set. The data: tfds 'cifar10' (downloaded
by tfds.builder('cifar10').download_and_prepare() on a machine with network access).
"""

from diffusion_jax import config as config_lib


def get_config():
    c = config_lib.base()  # the schema's defaults are this run
    c.train.keep_period = 100_000  # keep every 100k-step checkpoint for good
    return c
