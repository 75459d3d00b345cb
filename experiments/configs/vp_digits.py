"""The offline demo: the continuous VP SDE on scikit-learn's 8x8 handwritten digits (no download).

A small U-Net trains on the 1,497 training digits in a few minutes on a 2-core CPU; samples come from
DPM-Solver++(2M) in 50 steps. The sample grid shows recognisable digits (see README).
"""

from experiments.configs import base


def get_config():
    config = base.digits_config("vp")
    config.sampling.method = "dpm_solver_pp_2m"
    config.sampling.grid = "uniform_log_snr"
    config.sampling.num_steps = 50
    return config
