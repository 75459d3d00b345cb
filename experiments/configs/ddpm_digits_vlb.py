"""ddpm_digits with a learned reverse variance and the hybrid loss (Nichol & Dhariwal 2021), offline.

The DDPM chain of ddpm_digits (T = 500, linear betas 1e-4 -> 0.02, the same small U-Net on the 8x8
digits) whose network also outputs v per pixel, the reverse variance exp(v log beta +
(1 - v) log beta-tilde) (their eq. 15), trained with L_simple + 0.001 L_vlb (their Sec. 3.1).
Ancestral sampling draws from the model's own kernels (variance='model'); --mode=eval adds bits/dim
from the variational bound with the fixed small, fixed large, learned and analytic variances
(Ho et al. 2020; Bao et al. 2022) beside the probability-flow ODE's.
"""

from experiments.configs import base


def get_config():
    config = base.digits_config("ddpm")
    config.model.variance = "learned"
    config.training.weighting = "hybrid"
    config.sampling.options.ancestral.variance = "model"
    config.eval.vlb = True
    return config
