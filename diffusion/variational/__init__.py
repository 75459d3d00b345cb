"""The variational view of diffusion models: bounds, decoders, reverse variances, VDM.

* ``gaussian``: Gaussian KLs and decoders (Ho et al. 2020's discretised decoder, eq. 13).
* ``reverse``: the model's reverse kernels with the four reverse variances ('fixed_small',
  'fixed_large', 'learned' of Nichol & Dhariwal 2021, 'analytic' of Bao et al. 2022), as a
  ``ReverseModel`` that every sampler accepts as a denoiser.
* ``vlb``: the discrete bound L_T + sum L_{t-1} + L_0 of any chain (all terms or importance-sampled),
  Nichol & Dhariwal's hybrid loss, and Kingma et al. 2021's continuous-time bound.
* ``vdm``: Kingma et al. 2021's learned monotone schedule as a ``Process`` and their loss, whose
  schedule gradient minimises the variance of the bound's estimator.
"""

from diffusion.variational.gaussian import (
    NUM_BINS,
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    log_normal_interval_mass,
    normal_kl,
)
from diffusion.variational.reverse import (
    CHAIN_FREE_VARIANCES,
    VARIANCES,
    ReverseModel,
    analytic_variance,
    check_eps_sq_norm_table,
    data_step_log_variances,
    estimate_eps_sq_norm,
    expected_x0_variance,
    split_learned_variance_output,
    step_log_variances,
)
from diffusion.variational.vdm import (
    GAMMA_MAX,
    GAMMA_MIN,
    SCHEDULE_PARAM_NAMES,
    LearnedSchedule,
    VDMLoss,
    init_schedule_params,
    linear_schedule_params,
    monotone_gamma,
    schedule_gamma,
)
from diffusion.variational.vlb import (
    CONTINUOUS_TIME_SAMPLINGS,
    DECODERS,
    ContinuousVLBEstimate,
    HybridLoss,
    TermHistory,
    VLBEstimate,
    continuous_diffusion_integrand,
    continuous_vlb,
    decoder_nll,
    discrete_vlb,
    init_term_history,
    prior_kl,
    second_moment_probabilities,
    term_probabilities,
    update_term_history,
    vlb_bits_per_dim,
    vlb_chain_times,
    vlb_term,
)

__all__ = [
    "CHAIN_FREE_VARIANCES",
    "CONTINUOUS_TIME_SAMPLINGS",
    "DECODERS",
    "GAMMA_MAX",
    "GAMMA_MIN",
    "NUM_BINS",
    "SCHEDULE_PARAM_NAMES",
    "VARIANCES",
    "ContinuousVLBEstimate",
    "HybridLoss",
    "LearnedSchedule",
    "ReverseModel",
    "TermHistory",
    "VDMLoss",
    "VLBEstimate",
    "analytic_variance",
    "check_eps_sq_norm_table",
    "continuous_diffusion_integrand",
    "continuous_vlb",
    "data_step_log_variances",
    "decoder_nll",
    "discrete_vlb",
    "discretized_gaussian_log_likelihood",
    "estimate_eps_sq_norm",
    "expected_x0_variance",
    "gaussian_log_likelihood",
    "init_schedule_params",
    "init_term_history",
    "linear_schedule_params",
    "log_normal_interval_mass",
    "monotone_gamma",
    "normal_kl",
    "prior_kl",
    "schedule_gamma",
    "second_moment_probabilities",
    "split_learned_variance_output",
    "step_log_variances",
    "term_probabilities",
    "update_term_history",
    "vlb_bits_per_dim",
    "vlb_chain_times",
    "vlb_term",
]
