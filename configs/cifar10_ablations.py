"""DDPM table 2 ablations on CIFAR-10: the CIFAR-10 run with another target and objective.

    python train.py --config=configs/cifar10_ablations.py:NAME --workdir=DIR

NAME (paper's FID, table 2):
  mean_kl_learned   mu~ prediction, true bound L, learned diagonal Sigma    23.69
  mean_kl_fixed     mu~ prediction, true bound L, fixed isotropic Sigma     13.22
  mean_mse          mu~ prediction, ||mu~ - mu_theta||^2 (unstable in the paper)
  eps_kl_fixed      eps prediction, true bound L, fixed isotropic Sigma     13.51 (IS 7.67, NLL <= 3.70)
  eps_mse_learned   eps prediction, L_simple, learned Sigma (unstable in the paper; trained here
                    with the hybrid objective, the only way L_simple reaches a learned Sigma)
  x0_mse            x0 prediction, L_simple (not in the paper's table; a common baseline)
Hardware and time as configs/cifar10.py.
"""

from configs import cifar10

SETTINGS = {
    "mean_kl_learned": dict(mean_type="mean", var_type="learned", loss_type="kl"),
    "mean_kl_fixed": dict(mean_type="mean", var_type="fixed_large", loss_type="kl"),
    "mean_mse": dict(mean_type="mean", var_type="fixed_large", loss_type="mse"),
    "eps_kl_fixed": dict(mean_type="eps", var_type="fixed_large", loss_type="kl"),
    "eps_mse_learned": dict(mean_type="eps", var_type="learned", loss_type="hybrid"),
    "x0_mse": dict(mean_type="x0", var_type="fixed_large", loss_type="mse"),
}


def get_config(name="eps_kl_fixed"):
    if name not in SETTINGS:
        raise ValueError(f"unknown ablation {name!r}; allowed: {', '.join(SETTINGS)}")
    c = cifar10.get_config()
    c.diffusion.update(SETTINGS[name])
    return c
