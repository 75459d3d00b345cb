"""VE SDE on CIFAR-10 with an NCSN++-sized network (score_sde's ncsnpp_continuous ve).

NCSN++'s conditioning (Fourier features of log sigma, output scaled by 1/sigma), sigma 0.01 -> 50,
data in [0, 1], PC sampling (reverse diffusion + Langevin, snr 0.16). Our U-Net has DDPM's blocks
(no BigGAN blocks, no FIR filters, no progressive growing); see vp_cifar10.
"""

from experiments.configs import base


def get_config():
    config = base.get_base_config()
    config.data.dataset = "cifar10"
    config.data.random_flip = True
    base.set_view(config, "ve", "cifar10")
    config.model.nf = 128
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 4
    config.model.attn_resolutions = (16,)
    config.training.n_iters = 1_300_000
    config.training.snapshot_freq = 50_000
    config.eval.feature_extractor = "inception"
    return config
