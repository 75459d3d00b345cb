"""Continuous VP SDE on CIFAR-10 with a DDPM++-sized network (score_sde's ddpmpp_continuous vp).

Differences from score_sde's DDPM++: our U-Net has DDPM's ResNet blocks and resampling (no BigGAN
blocks, no FIR filters); width, depth, attention, dropout, skip rescaling and the training
hyperparameters are theirs (batch 128, Adam 2e-4, warm-up 5000, clip 1, EMA 0.9999, 1.3M steps).
"""

from experiments.configs import base


def get_config():
    config = base.get_base_config()
    config.data.dataset = "cifar10"
    config.data.random_flip = True
    base.set_view(config, "vp", "cifar10")
    config.model.nf = 128
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 4
    config.model.attn_resolutions = (16,)
    config.model.skip_rescale = True
    config.training.n_iters = 1_300_000
    config.training.snapshot_freq = 50_000
    config.eval.feature_extractor = "inception"
    return config
