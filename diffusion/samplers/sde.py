"""Stochastic samplers of the reverse SDE and Langevin dynamics (Song & Ermon 2019; Song et al. 2021).

Every step reads the process only through its generic methods (f, g^2, transition, sigma), so the
same code runs VP, sub-VP, VE, cosine, DDPM, SMLD and EDM:

* predictors, x_t -> x_s: 'euler_maruyama' (the reverse SDE dx = [f x - g^2 score] dt + g dW, Song et
  al. 2021 eq. 6, discretised by Euler-Maruyama), 'reverse_diffusion' (the reverse of the forward
  discretisation x_t = scale x_s + G z, Song et al. 2021 App. E eqs. 46-47) and 'ancestral'
  (``ancestral.ancestral_step``);
* correctors at a fixed time t: 'langevin' (Song et al. 2021 Alg. 4-5, step size from a target
  signal-to-noise ratio) and 'annealed_langevin' (score_sde's AnnealedLangevinDynamics, step size from
  sigma_t);
* samplers: each predictor alone, 'pc' (predictor-corrector, Song et al. 2021 Alg. 1-3 and App. G)
  and 'annealed_langevin' (SMLD / NCSN, Song & Ermon 2019 Alg. 1).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array

from diffusion.parameterization import Denoiser
from diffusion.samplers.ancestral import VARIANCES, ancestral_step
from diffusion.samplers.base import (
    SampleResult,
    constant_nfe,
    num_steps_of,
    one_evaluation_per_step,
    register_sampler,
    require_choice,
    require_int,
    require_real,
    scan_time_grid,
    standard_normal,
)
from diffusion.shapes import expand_to, sum_except_batch

__all__ = [
    "CORRECTORS",
    "NCSN_STEP_RATIO",
    "PREDICTORS",
    "annealed_langevin",
    "annealed_langevin_corrector_step",
    "euler_maruyama",
    "euler_maruyama_step",
    "langevin_corrector_step",
    "pc",
    "predictor_step",
    "reverse_diffusion",
    "reverse_diffusion_step",
]

# NCSN's step_lr / sigma_L^2 = 2e-5 / 0.01^2 = 0.2 (Song & Ermon 2019, Sec. 5 and App. B.1).
NCSN_STEP_RATIO = 2e-5 / 0.01**2


# ================================================================================ predictors
def _score_and_x0(denoiser: Denoiser, x: Array, t: Array) -> tuple[Array, Array]:
    """(score, x0) from one network evaluation: score = -eps / sigma (Song et al. 2021)."""
    eps, x0 = denoiser.predict(x, t)
    return -eps / expand_to(denoiser.process.sigma(t), eps), x0


def euler_maruyama_step(
    denoiser: Denoiser, x: Array, t: Array, s: Array, key: Array
) -> tuple[Array, Array]:
    """Euler-Maruyama step of the reverse SDE from t to s < t (Song et al. 2021, eq. 6).

    x_s = x_t - (f(t) x_t - g(t)^2 score) dt + g(t) sqrt(dt) z with dt = t - s. One network evaluation;
    returns (x_s, x0_pred).
    """
    process = denoiser.process
    score, x0_pred = _score_and_x0(denoiser, x, t)
    step = t - s
    diffusion_sq = process.diffusion_sq(t)
    drift = process.drift_coef(t) * x - diffusion_sq * score  # reverse-SDE drift (eq. 6)
    return x - drift * step + jnp.sqrt(diffusion_sq * step) * standard_normal(key, x), x0_pred


def reverse_diffusion_step(
    denoiser: Denoiser, x: Array, t: Array, s: Array, key: Array
) -> tuple[Array, Array]:
    """Reverse-diffusion predictor from t to s (Song et al. 2021, App. E eqs. 46-47).

    With the forward discretisation x_t = scale x_s + G z given by ``process.transition(s, t)`` =
    (scale, G), f_disc = (scale - 1) x and x_s = x_t - f_disc + G^2 score + G z. It agrees with the
    ancestral 'beta' step to O(beta^2) (docs/references.md, "Reverse-diffusion predictor"). One
    network evaluation; returns (x_s, x0_pred).
    """
    scale, transition_std = denoiser.process.transition(s, t)
    score, x0_pred = _score_and_x0(denoiser, x, t)
    discrete_drift = (scale - 1.0) * x
    noise = transition_std * standard_normal(key, x)
    return x - discrete_drift + transition_std**2 * score + noise, x0_pred


PredictorStep = Callable[[Denoiser, Array, Array, Array, Array], tuple[Array, Array]]
PREDICTORS = ("euler_maruyama", "reverse_diffusion", "ancestral", "none")


def predictor_step(name: str, variance: str = "beta_tilde") -> PredictorStep | None:
    """The predictor called ``name`` as a step (denoiser, x, t, s, key) -> (x_s, x0_pred); None for
    'none'.

    ``variance`` is the ancestral predictor's ('beta_tilde' or 'beta', see ``ancestral_step``).
    """
    require_choice("predictor", name, PREDICTORS)
    steps = {
        "euler_maruyama": euler_maruyama_step,
        "reverse_diffusion": reverse_diffusion_step,
        "ancestral": functools.partial(ancestral_step, variance=variance),
        "none": None,
    }
    return steps[name]


# ================================================================================ correctors
def _langevin_update(x: Array, score: Array, step_size: Array, noise: Array) -> Array:
    """x + eps score + sqrt(2 eps) z (Song et al. 2021, Alg. 4-5)."""
    step_size = expand_to(step_size, x)
    return x + step_size * score + jnp.sqrt(2.0 * step_size) * noise


def _corrector_alpha(denoiser: Denoiser, t: Array, s: Array) -> Array:
    """alpha_i = (alpha_t / alpha_s)^2: 1 - beta_i for VP, 1 for VE (score_sde's ``alpha``)."""
    return denoiser.process.transition(s, t)[0] ** 2


def langevin_corrector_step(
    denoiser: Denoiser, x: Array, t: Array, s: Array, key: Array, snr: float
) -> tuple[Array, Array]:
    """One Langevin corrector step at time t (Song et al. 2021, Alg. 4 (VE) and Alg. 5 (VP)).

    eps = 2 alpha_i (snr ||z|| / ||score||)^2, x <- x + eps score + sqrt(2 eps) z, with alpha_i from
    the grid step (t, s) the predictor takes next. As in score_sde, ||z|| and ||score|| are the
    per-example norms averaged over the batch: a per-example ratio ||z||^2 / ||score||^2 is
    F-distributed (in 2-D it has no mean) and occasionally throws samples far away. One network
    evaluation; returns (x, x0_pred).
    """
    score, x0_pred = _score_and_x0(denoiser, x, t)
    noise = standard_normal(key, x)
    noise_norm = jnp.mean(jnp.sqrt(sum_except_batch(noise**2)))
    score_norm = jnp.mean(jnp.sqrt(sum_except_batch(score**2)))
    norm_ratio = noise_norm / score_norm
    step_size = 2.0 * _corrector_alpha(denoiser, t, s) * (snr * norm_ratio) ** 2
    return _langevin_update(x, score, step_size, noise), x0_pred


def annealed_langevin_corrector_step(
    denoiser: Denoiser, x: Array, t: Array, s: Array, key: Array, snr: float
) -> tuple[Array, Array]:
    """One step of score_sde's AnnealedLangevinDynamics corrector at time t.

    eps = 2 alpha_i (snr sigma_t)^2, x <- x + eps score + sqrt(2 eps) z. One network evaluation;
    returns (x, x0_pred).
    """
    score, x0_pred = _score_and_x0(denoiser, x, t)
    noise = standard_normal(key, x)
    step_size = 2.0 * _corrector_alpha(denoiser, t, s) * (snr * denoiser.process.sigma(t)) ** 2
    return _langevin_update(x, score, step_size, noise), x0_pred


CorrectorStep = Callable[[Denoiser, Array, Array, Array, Array, float], tuple[Array, Array]]
CORRECTORS: dict[str, CorrectorStep | None] = {
    "langevin": langevin_corrector_step,
    "annealed_langevin": annealed_langevin_corrector_step,
    "none": None,
}


# ================================================================================ samplers
def _validate_pc(
    *, predictor: str, corrector: str, snr: float, n_corrector_steps: int, variance: str
) -> None:
    require_choice("predictor", predictor, PREDICTORS)
    require_choice("corrector", corrector, tuple(CORRECTORS))
    if predictor == "none" and corrector == "none":
        raise ValueError("predictor='none' and corrector='none' would not sample anything")
    require_real("snr", snr, low=0.0, low_open=True)
    require_int("n_corrector_steps", n_corrector_steps, low=1)
    require_choice("variance", variance, VARIANCES)


def _pc_nfe(num_steps: int, *, predictor: str, corrector: str, n_corrector_steps: int, **_) -> int:
    per_step = int(predictor != "none") + n_corrector_steps * int(corrector != "none")
    return num_steps * per_step


@register_sampler(
    nfe=_pc_nfe,
    deterministic=False,
    reference="Song et al. 2021, Alg. 1-5 and App. G (predictor-corrector)",
    validate=_validate_pc,
)
def pc(
    denoiser: Denoiser,
    key: Array,
    x_init: Array,
    times: Array,
    *,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    n_corrector_steps: int = 1,
    variance: str = "beta_tilde",
) -> SampleResult:
    """Predictor-corrector sampling (Song et al. 2021, Alg. 1-3; App. G).

    At each grid time t_i (i < num_steps), as score_sde: ``n_corrector_steps`` corrector steps at t_i,
    then the predictor from t_i to t_{i+1}. ``predictor`` in PREDICTORS, ``corrector`` in CORRECTORS
    (not both 'none'); ``snr`` is the corrector's target signal-to-noise ratio (0.16: score_sde's
    CIFAR-10 VE setting); ``variance`` is the 'ancestral' predictor's variance. The defaults are the
    paper's PC sampler (reverse diffusion + Langevin). With predictor 'none' the state is carried
    unchanged from t_i to t_{i+1}, so the last correction happens at times[-2] (score_sde's
    NonePredictor). NFE = num_steps ([predictor != 'none'] + n_corrector_steps [corrector != 'none']).
    A step's x0 prediction is the predictor's (the last corrector's with predictor 'none').
    """
    predict = predictor_step(predictor, variance)
    correct = CORRECTORS[corrector]

    def corrector_step(x, t, s, corrector_key):
        corrector_keys = jax.random.split(corrector_key, n_corrector_steps)

        def body(current, step_key):
            corrected, x0_pred = correct(denoiser, current, t, s, step_key, snr)
            return corrected.astype(current.dtype), x0_pred

        x, x0_preds = jax.lax.scan(body, x, corrector_keys)
        return x, x0_preds[-1]

    def step(x, t, s, step_key):
        corrector_key, predictor_key = jax.random.split(step_key)
        if correct is not None:
            x, x0_pred = corrector_step(x, t, s, corrector_key)
        if predict is not None:
            x, x0_pred = predict(denoiser, x, t, s, predictor_key)
        return x, x0_pred

    nfe = _pc_nfe(
        num_steps_of(times),
        predictor=predictor,
        corrector=corrector,
        n_corrector_steps=n_corrector_steps,
    )
    return scan_time_grid(step, x_init, times, key, nfe=nfe)


def _run_predictor(
    predictor: str, denoiser: Denoiser, key: Array, x_init: Array, times: Array
) -> SampleResult:
    """Run one predictor alone down the grid: NFE = num_steps."""
    predict = predictor_step(predictor)

    def step(x, t, s, step_key):
        return predict(denoiser, x, t, s, step_key)

    return scan_time_grid(step, x_init, times, key, nfe=num_steps_of(times))


@register_sampler(
    nfe=one_evaluation_per_step,
    deterministic=False,
    reference="Song et al. 2021, eq. 6 (reverse SDE), Euler-Maruyama",
)
def euler_maruyama(denoiser: Denoiser, key: Array, x_init: Array, times: Array) -> SampleResult:
    """Euler-Maruyama on the reverse SDE down ``times`` (Song et al. 2021, eq. 6), NFE = num_steps.

    x_s = x_t - (f x_t - g^2 score) dt + g sqrt(dt) z with dt = t - s.
    """
    return _run_predictor("euler_maruyama", denoiser, key, x_init, times)


@register_sampler(
    nfe=one_evaluation_per_step,
    deterministic=False,
    reference="Song et al. 2021, App. E eqs. 46-47 (reverse-diffusion predictor)",
)
def reverse_diffusion(denoiser: Denoiser, key: Array, x_init: Array, times: Array) -> SampleResult:
    """Reverse-diffusion sampling down ``times`` (Song et al. 2021, App. E eq. 47), NFE = num_steps.

    x_s = x_t - (scale - 1) x_t + G^2 score + G z with (scale, G) = process.transition(s, t).
    """
    return _run_predictor("reverse_diffusion", denoiser, key, x_init, times)


def _validate_annealed_langevin(*, step_lr: float | None, n_steps_each: int) -> None:
    if step_lr is not None:
        require_real("step_lr", step_lr, low=0.0, low_open=True)
    require_int("n_steps_each", n_steps_each, low=1)


def _annealed_langevin_nfe(num_steps: int, n_steps_each: int, **_) -> int:
    return (num_steps + 1) * n_steps_each


@register_sampler(
    nfe=_annealed_langevin_nfe,
    deterministic=False,
    reference="Song & Ermon 2019, Algorithm 1 (annealed Langevin dynamics)",
    validate=_validate_annealed_langevin,
)
def annealed_langevin(
    denoiser: Denoiser,
    key: Array,
    x_init: Array,
    times: Array,
    *,
    step_lr: float | None = None,
    n_steps_each: int = 100,
) -> SampleResult:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) over every time of the grid.

    At each grid time t_i (noise level sigma_i = sigma(t_i), i = 0..num_steps, times[0] included),
    ``n_steps_each`` steps x <- x + a_i/2 score + sqrt(a_i) z with a_i = step_lr sigma_i^2 / sigma_L^2,
    sigma_L = sigma(times[-1]) the grid's smallest noise level. NFE = (num_steps + 1) n_steps_each.
    Defaults are NCSN's (n_steps_each = 100; step_lr = 2e-5 at sigma_L = 0.01): ``step_lr=None`` keeps
    NCSN's ratio a_L / sigma_L^2 = 0.2 on any grid (a fixed step_lr of 2e-5 is unstable for grids whose
    sigma_L is well below 0.01, e.g. sub-VP's 1e-4). On the SMLD process,
    ``time_grid(smld, 'linspace', L - 1)`` visits exactly NCSN's L noise levels. The trajectory is
    the initial state and the state after each level (num_steps + 2 states); ``denoised`` the last
    x0 prediction at each level.
    """
    process = denoiser.process
    sigma_last_sq = process.sigma(times[-1]) ** 2
    step_ratio = NCSN_STEP_RATIO if step_lr is None else step_lr / sigma_last_sq
    level_keys = jax.random.split(key, times.shape[0])
    x_init = jnp.asarray(x_init)

    def level(x, inputs):
        t, level_key = inputs
        step_size = step_ratio * process.sigma(t) ** 2  # a_i = eps sigma_i^2 / sigma_L^2 (Alg. 1)

        def langevin(current, step_key):
            score, x0_pred = _score_and_x0(denoiser, current, t)
            noise = standard_normal(step_key, current)
            updated = current + 0.5 * step_size * score + jnp.sqrt(step_size) * noise
            return updated.astype(current.dtype), x0_pred.astype(current.dtype)

        x, x0_preds = jax.lax.scan(langevin, x, jax.random.split(level_key, n_steps_each))
        return x, (x, x0_preds[-1])

    samples, (states, denoised) = jax.lax.scan(level, x_init, (times, level_keys))
    return SampleResult(
        samples=samples,
        nfe=constant_nfe(_annealed_langevin_nfe(num_steps_of(times), n_steps_each)),
        trajectory=jnp.concatenate([x_init[None], states]),
        denoised=denoised,
    )
