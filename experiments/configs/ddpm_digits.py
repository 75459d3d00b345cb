"""Higham, Higham & Grindrod 2023's DDPM experiment, offline: scikit-learn's 8x8 digits.

Their setting (Sec. 5): T = 500 steps of linear betas 1e-4 -> 0.02, the eps loss on uniform integer
steps, ancestral sampling with the posterior variance beta-tilde and no noise at the last step
(base.set_view(config, 'ddpm', ...)). Their network and optimiser settings are not all given and
their data are 28x28; here vp_digits' small U-Net and training settings (base.digits_config). Its
samples feed `python -m experiments.figures --figure=ddpm_experiment` (Higham et al. Figs. 2-6);
eval sorts 500 samples into classes as their Fig. 4.
"""

from experiments.configs import base


def get_config():
    return base.digits_config("ddpm")
