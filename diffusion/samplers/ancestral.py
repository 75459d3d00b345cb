"""Ancestral sampling (DDPM) and DDIM, for any process and any decreasing time grid.

Both step from x_t to x_s (s < t) through the denoiser's x0 / eps prediction at (x_t, t) and the
process's two-time kernels, so the same code runs VP, VE, DDPM, SMLD, EDM, ...:

* 'ancestral' draws x_s from q(x_s | x_t, x_0 = x0_pred) (Ho et al. 2020, Alg. 2; eq. 7), with the
  variance of the posterior ('beta_tilde') or of the forward transition ('beta'); on the DDPM chain
  with the full grid and the final denoising step it is exactly Ho et al.'s Algorithm 2;
* 'ddim' is the generalised non-Markovian step of Song, Meng & Ermon 2021 (eq. 12) with
  sigma_eta = eta * posterior std (eq. 16): eta = 0 is the deterministic DDIM, eta = 1 the ancestral
  'beta_tilde' step (docs/references.md, "DDIM and DPM-Solver-1").
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array

from diffusion.parameterization import Denoiser, ReverseKernelDenoiser
from diffusion.samplers.base import (
    SampleResult,
    num_steps_of,
    one_evaluation_per_step,
    register_sampler,
    require_choice,
    require_real,
    scan_time_grid,
    standard_normal,
)

__all__ = ["VARIANCES", "ancestral", "ancestral_step", "ddim", "ddim_step"]

VARIANCES = ("beta_tilde", "beta", "model")


def ancestral_step(
    denoiser: Denoiser, x: Array, t: Array, s: Array, key: Array, variance: str
) -> tuple[Array, Array]:
    """One ancestral step x_t -> x_s ~ N(mu(x0_pred, x_t), std^2 I) (Ho et al. 2020, Alg. 2 line 4).

    mu = coef_x0 x0_pred + coef_xt x_t is the mean of q(x_s | x_t, x_0) (Ho et al. eq. 7, Kingma et
    al. 2021 eq. 4) and std = ``process.ancestral_std(s, t, variance)``. One network evaluation.
    Returns (x_s, x0_pred).
    """
    if variance == "model":
        if not isinstance(denoiser, ReverseKernelDenoiser):
            raise ValueError(
                "variance='model' needs a denoiser with its own reverse kernel (a "
                f"diffusion.variational.ReverseModel), got {type(denoiser).__name__}"
            )
        return denoiser.reverse_step(x, t, s, key)
    process = denoiser.process
    _, x0_pred = denoiser.predict(x, t)
    coef_x0, coef_xt, _ = process.posterior(s, t)
    std = process.ancestral_std(s, t, variance)
    return coef_x0 * x0_pred + coef_xt * x + std * standard_normal(key, x), x0_pred


def _validate_ancestral(*, variance: str) -> None:
    require_choice("variance", variance, VARIANCES)


@register_sampler(
    nfe=one_evaluation_per_step,
    deterministic=False,
    reference="Ho et al. 2020, Algorithm 2 (posterior q(x_s | x_t, x0_pred), any process)",
    validate=_validate_ancestral,
)
def ancestral(
    denoiser: Denoiser,
    key: Array,
    x_init: Array,
    times: Array,
    *,
    variance: str = "beta_tilde",
) -> SampleResult:
    """Ancestral sampling down ``times`` (Ho et al. 2020, Algorithm 2), generalised to any process.

    ``variance``: 'beta_tilde' (posterior variance, Ho et al.'s sigma_t^2 = beta-tilde_t), 'beta'
    (sigma_t^2 = beta_t), or 'model': the denoiser's own kernel (a learned or analytic variance,
    Nichol & Dhariwal 2021, Bao et al. 2022; ``ReverseKernelDenoiser``). NFE = num_steps. With the
    DDPM process, ``time_grid(ddpm, 'linspace', N - 1)`` and ``denoise_final=True`` this is
    Algorithm 2 with its N evaluations (its last step, z = 0 at t = 1, is the posterior mean to
    t = 0, i.e. the x0 prediction).
    """

    def step(x, t, s, step_key):
        return ancestral_step(denoiser, x, t, s, step_key, variance)

    return scan_time_grid(step, x_init, times, key, nfe=num_steps_of(times))


def ddim_step(
    denoiser: Denoiser, x: Array, t: Array, s: Array, key: Array, eta: float
) -> tuple[Array, Array]:
    """One DDIM step (Song, Meng & Ermon 2021, eq. 12), one network evaluation; (x_s, x0_pred).

    x_s = alpha_s x0_pred + sqrt(sigma_s^2 - sigma_eta^2) eps_pred + sigma_eta z with
    sigma_eta = eta * std of q(x_s | x_t, x_0) (eq. 16). With r = SNR_t / SNR_s that std is
    sigma_s sqrt(1 - r), so the eps coefficient is sigma_s sqrt((1 - eta^2) + eta^2 r), computed in that
    form (no cancellation at eta = 1, where it is sigma_s sqrt(r)).
    """
    process = denoiser.process
    eps_pred, x0_pred = denoiser.predict(x, t)
    snr_ratio = jnp.exp(2.0 * (process.log_snr(t) - process.log_snr(s)))  # r = SNR_t / SNR_s
    eps_coef = process.sigma(s) * jnp.sqrt((1.0 - eta**2) + eta**2 * snr_ratio)
    x_s = process.alpha(s) * x0_pred + eps_coef * eps_pred
    if eta == 0.0:  # static option: the deterministic sampler draws no noise
        return x_s, x0_pred
    noise_std = eta * process.posterior(s, t)[2]
    return x_s + noise_std * standard_normal(key, x), x0_pred


def _validate_ddim(*, eta: float) -> None:
    require_real("eta", eta, low=0.0, high=1.0)


@register_sampler(
    nfe=one_evaluation_per_step,
    deterministic=True,
    reference="Song, Meng & Ermon 2021, eqs. 12 and 16",
    validate=_validate_ddim,
    deterministic_if=lambda *, eta: eta == 0.0,
)
def ddim(
    denoiser: Denoiser, key: Array, x_init: Array, times: Array, *, eta: float = 0.0
) -> SampleResult:
    """DDIM sampling down ``times`` (Song, Meng & Ermon 2021, eqs. 12 and 16), NFE = num_steps.

    ``eta`` in [0, 1]: 0 is deterministic DDIM (= DPM-Solver-1, Lu et al. 2022, Sec. 4.1), 1 is ancestral
    sampling with the posterior variance (same noise draws as 'ancestral' for the same key).
    """

    def step(x, t, s, step_key):
        return ddim_step(denoiser, x, t, s, step_key, eta)

    return scan_time_grid(step, x_init, times, key, nfe=num_steps_of(times))
