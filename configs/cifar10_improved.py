"""Improved DDPM on CIFAR-10 (Nichol & Dhariwal 2021): cosine schedule, learned-range variance, L_hybrid.

    python train.py --config=configs/cifar10_improved.py --workdir=DIR
    # L_vlb with t importance-sampled (their section 3.3), for the best likelihood:
    python train.py --config=configs/cifar10_improved.py:vlb --workdir=DIR
    # their schedule and objective ablations (section 3, tables 1 and 2):
    python train.py --config=configs/cifar10_improved.py:simple_linear --workdir=DIR

Their CIFAR-10 settings (the paper's appendix and improved-diffusion's README): T = 4000
steps of the cosine schedule (eq. 17, s = 0.008), eps prediction with learned_range variance
(eq. 15), L_hybrid = L_simple + 0.001 L_vlb with the mean stopped in L_vlb (eq. 16), Adam at
1e-4 without warmup or gradient clipping, batch 128, dropout 0.3, 128 channels with 3 residual
blocks per level, attention at 16x16 and 8x8, EMA 0.9999, 500k steps. ``vlb``: L_vlb = T L_{t-1}
(loss_type 'rescaled_kl', their ``RESCALED_KL``) with the loss-second-moment timestep sampler
(10 losses per t, uniform until filled).

The ablations: ``simple_linear`` and ``simple_cosine`` train L_simple with the fixed variance
beta_t; ``hybrid_linear`` is L_hybrid on the linear schedule. Their linear schedule at T = 4000
is DDPM's scaled by 1000 / T (``linear_scaled``).

Differences from their run: their attention has 4 heads and their residual blocks condition on
t by scaling and shifting the normalization (``use_scale_shift_norm``), where this DDPM U-Net
has one head and adds the embedding.

Expected results (the paper, CIFAR-10): L_hybrid, FID 2.94 with the full 4000-step sampler;
L_vlb with importance sampling, NLL 2.94 bits/dim on the test set. Learned variances keep FID
close with 100 sampling steps (their figure 8): the grids during training use 100 DDPM steps
spaced by their rule (real numbers evenly spaced from the first to the last step, rounded:
``linspace``), and so does sample.py unless told otherwise (--sampler=ddpm --steps=4000 for the
paper's FID).

Hardware and time: about 1.3x the DDPM CIFAR-10 run's compute per step (3 residual blocks and
a second attention level); see configs/cifar10.py.
"""

from configs import cifar10

OBJECTIVES = {
    "hybrid": dict(schedule="cosine", var_type="learned_range", loss_type="hybrid"),
    "vlb": dict(schedule="cosine", var_type="learned_range", loss_type="rescaled_kl",
                timestep_sampler="loss-second-moment"),
    "simple_linear": dict(schedule="linear_scaled", var_type="fixed_large", loss_type="mse"),
    "simple_cosine": dict(schedule="cosine", var_type="fixed_large", loss_type="mse"),
    "hybrid_linear": dict(schedule="linear_scaled", var_type="learned_range", loss_type="hybrid"),
}


def get_config(objective="hybrid"):
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")
    c = cifar10.get_config()
    c.model.update(num_res_blocks=3, attn_resolutions=(16, 8), dropout=0.3)
    c.diffusion.update(num_timesteps=4000, mean_type="eps", hybrid_lambda=1e-3, **OBJECTIVES[objective])
    c.optim.update(lr=1e-4, warmup_steps=0, grad_clip=0.0)
    c.train.num_steps = 500_000
    c.sample.update(sampler="ddpm", steps=100, spacing="linspace")
    return c
