"""The offline demo: the continuous VP SDE on scikit-learn's 8x8 handwritten digits (no download).

A small U-Net trains on the 1,497 training digits in a few minutes on a 2-core CPU; samples come from
DPM-Solver++(2M) in 50 steps. The sample grid shows recognisable digits (see README).
"""

from experiments.configs import base


def get_config():
    config = base.get_base_config()
    config.data.dataset = "digits"
    base.set_view(config, "vp", "digits")
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
    config.sampling.method = "dpm_solver_pp_2m"
    config.sampling.grid = "uniform_log_snr"
    config.sampling.num_steps = 50
    config.sampling.num_samples = 100
    config.sampling.batch_size = 100
    config.eval.num_samples = 500
    # 8x8 digits: 98.3-99.0% test accuracy over seeds with these settings.
    config.eval.classifier_steps = 1500
    config.eval.classifier_learning_rate = 2e-3
    config.eval.classifier_max_shift = 1
    config.eval.classifier_weight_decay = 0.05
    return config
