"""Class-conditional vp_digits with classifier-free guidance (Ho & Salimans 2022), offline.

vp_digits (base.digits_config('vp'): the continuous VP SDE, the small U-Net, 1,500 steps) with a
label embedding for the 10 digits, labels dropped to the null label with probability 0.1 during
training, and DPM-Solver++(2M) in 50 steps sampling one row per digit. Each sampling step evaluates
the network twice (conditional and unconditional, one pass on a doubled batch). --mode=eval reports
the in-project classifier's agreement with the requested digit and FD at each of
eval.guidance_scales.
"""

from experiments.configs import base


def get_config():
    config = base.digits_config("vp")
    config.model.num_classes = 10
    config.training.label_dropout = 0.1
    config.sampling.method = "dpm_solver_pp_2m"
    config.sampling.grid = "uniform_log_snr"
    config.sampling.num_steps = 50
    config.sampling.labels = "all"
    config.sampling.guidance_scale = 2.0
    config.eval.guidance_scales = (1.0, 2.0, 4.0)
    return config
