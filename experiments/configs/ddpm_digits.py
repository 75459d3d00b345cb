"""Higham, Higham & Grindrod 2023's DDPM experiment, offline: scikit-learn's 8x8 digits.

Their setting (Sec. 5): T = 500 steps of linear betas 1e-4 -> 0.02, the eps loss on uniform integer
steps, ancestral sampling with the posterior variance beta-tilde and no noise at the last step
(base.set_view(config, 'ddpm', ...)). Their network and optimiser settings are not all given and
their data are 28x28; here a small U-Net (vp_digits' size) that trains on the 1,497 training digits
in a few minutes on a 2-core CPU. Its samples feed the figure `python -m experiments.figures
--figure=ddpm_digits` (Higham et al. Figs. 2-6).
"""

from experiments.configs import base


def get_config():
    config = base.get_base_config()
    config.data.dataset = "digits"
    base.set_view(config, "ddpm", "digits")
    config.model.nf = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0
    config.training.batch_size = 128
    config.training.n_iters = 1500
    config.training.log_freq = 100
    config.training.snapshot_freq = 500
    config.training.checkpoint_freq = 500
    config.training.ema_decay = 0.999
    config.training.ema_warmup = True
    config.optim.lr = 2e-3
    config.optim.warmup = 200
    config.sampling.num_samples = 100
    config.sampling.batch_size = 100
    config.eval.num_samples = 500  # Higham et al. sort 500 samples into classes (Fig. 4)
    # The in-project classifier on 8x8 digits, as vp_digits.
    config.eval.classifier_steps = 1500
    config.eval.classifier_learning_rate = 2e-3
    config.eval.classifier_max_shift = 1
    config.eval.classifier_weight_decay = 0.05
    return config
