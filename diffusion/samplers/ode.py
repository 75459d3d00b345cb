"""Solvers of the probability-flow ODE, and EDM's stochastic sampler built on its Heun step.

The probability-flow ODE of a process (Song et al. 2021, eq. 13) is

    dx/dt = f(t) x - g(t)^2 / 2 score(x, t) = f(t) x + g(t)^2 / (2 sigma(t)) eps(x, t),

written with the process's generic f and g^2, so one code path serves every process (for EDM,
f = 0 and g^2 = 2 t, it is Karras et al.'s dx/dt = (x - D(x; t)) / t).

* 'euler', 'heun': fixed-step Euler and Heun (Karras et al. 2022, Alg. 1). Our grids end at
  t_end > 0, so Heun corrects every step: NFE = 2 num_steps.
* 'edm_stochastic': Karras et al. 2022, Alg. 2 (churn, then a Heun step), on any process.
* 'adaptive': diffrax's Dopri5 / Tsit5 with a PID step-size controller between the grid's end
  points (the ODE sampler of score_sde, which calls scipy's RK45 with rtol = atol = 1e-5).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import Array

from diffusion.flow import (
    ADAPTIVE_SOLVERS,
    TIME_VARIABLES,
    probability_flow,
    probability_flow_and_x0,
    probability_flow_field,
    solve_adaptive,
)
from diffusion.parameterization import Denoiser
from diffusion.samplers.base import (
    SampleResult,
    num_steps_of,
    one_evaluation_per_step,
    register_sampler,
    require_choice,
    require_int,
    require_real,
    scan_time_grid,
    standard_normal,
    two_evaluations_per_step,
)

__all__ = [
    "adaptive",
    "edm_stochastic",
    "euler",
    "euler_step",
    "heun",
    "heun_step",
]


def euler_step(denoiser: Denoiser, x: Array, t: Array, s: Array) -> tuple[Array, Array]:
    """Euler step of the probability-flow ODE from t to s: (x + (s - t) dx/dt(x, t), x0_pred)."""
    slope, x0_pred = probability_flow_and_x0(denoiser, x, t)
    return x + (s - t) * slope, x0_pred


def heun_step(denoiser: Denoiser, x: Array, t: Array, s: Array) -> tuple[Array, Array]:
    """Heun step from t to s (Karras et al. 2022, Alg. 1 lines 5-8): two network evaluations.

    d = dx/dt(x, t), x' = x + (s - t) d, x_s = x + (s - t) (d + dx/dt(x', s)) / 2; returns
    (x_s, x0 prediction at (x, t)).
    """
    slope, x0_pred = probability_flow_and_x0(denoiser, x, t)
    x_euler = x + (s - t) * slope
    slope_end = probability_flow(denoiser, x_euler, s)
    return x + (s - t) * 0.5 * (slope + slope_end), x0_pred


@register_sampler(
    nfe=one_evaluation_per_step,
    deterministic=True,
    reference="Song et al. 2021, eq. 13 (probability-flow ODE), Euler's method",
)
def euler(denoiser: Denoiser, key: Array, x_init: Array, times: Array) -> SampleResult:
    """Euler's method on the probability-flow ODE down ``times`` (Song et al. 2021, eq. 13).

    First order; NFE = num_steps; ``key`` is unused.
    """

    def step(x, t, s, step_key):
        return euler_step(denoiser, x, t, s)

    return scan_time_grid(step, x_init, times, key, nfe=num_steps_of(times))


@register_sampler(
    nfe=two_evaluations_per_step,
    deterministic=True,
    reference="Karras et al. 2022, Algorithm 1 (Heun) on the probability-flow ODE",
)
def heun(denoiser: Denoiser, key: Array, x_init: Array, times: Array) -> SampleResult:
    """Heun's method on the probability-flow ODE down ``times`` (Karras et al. 2022, Algorithm 1).

    Second order; the grid ends at t_end > 0, so every step is corrected: NFE = 2 num_steps.
    ``key`` is unused.
    """

    def step(x, t, s, step_key):
        return heun_step(denoiser, x, t, s)

    return scan_time_grid(
        step, x_init, times, key, nfe=two_evaluations_per_step(num_steps_of(times))
    )


def _validate_edm_stochastic(
    *, S_churn: float, S_tmin: float, S_tmax: float, S_noise: float
) -> None:
    require_real("S_churn", S_churn, low=0.0)
    require_real("S_tmin", S_tmin, low=0.0)
    require_real("S_tmax", S_tmax, low=S_tmin, allow_inf=True)
    require_real("S_noise", S_noise, low=0.0)


@register_sampler(
    nfe=two_evaluations_per_step,
    deterministic=False,
    reference="Karras et al. 2022, Algorithm 2 (stochastic sampler)",
    validate=_validate_edm_stochastic,
    deterministic_if=lambda *, S_churn, S_noise, **_: S_churn == 0.0 or S_noise == 0.0,
)
def edm_stochastic(
    denoiser: Denoiser,
    key: Array,
    x_init: Array,
    times: Array,
    *,
    S_churn: float = 40.0,
    S_tmin: float = 0.05,
    S_tmax: float = 50.0,
    S_noise: float = 1.003,
) -> SampleResult:
    """Karras et al. 2022, Algorithm 2 (stochastic sampler), generalised to any process.

    At each step from t to s, with the noise level sigma_hat(t) = sigma/alpha = exp(-lambda(t)):
    gamma = min(S_churn / num_steps, sqrt(2) - 1) if S_tmin <= sigma_hat(t) <= S_tmax else 0; the
    noise level is raised to (1 + gamma) sigma_hat(t), i.e. to t_hat = t(lambda(t) - log(1 + gamma))
    (clipped to T), by x_hat = scale x + S_noise std z with (scale, std) = process.transition(t, t_hat)
    (for EDM, sigma = t: x + sqrt(t_hat^2 - t^2) S_noise z, Alg. 2 lines 4-5); then a Heun step from
    t_hat to s (lines 6-10). NFE = 2 num_steps.

    The defaults are Karras et al.'s ImageNet-64 settings for their own model (Table 5: S_churn = 40,
    S_tmin = 0.05, S_tmax = 50, S_noise = 1.003); their others: CIFAR-10 VP 30, 0.01, 1, 1.007;
    CIFAR-10 VE 80, 0.05, 1, 1.007; ImageNet-64 with ADM's network 80, 0.05, 50, 1.003. S_churn = 0
    (or S_noise = 0) makes it Heun's method exactly (``heun``).
    """
    process = denoiser.process
    gamma_max = min(S_churn / num_steps_of(times), math.sqrt(2.0) - 1.0)

    def step(x, t, s, step_key):
        log_snr = process.log_snr(t)
        sigma_hat = jnp.exp(-log_snr)
        in_churn_range = (sigma_hat >= S_tmin) & (sigma_hat <= S_tmax)
        gamma = jnp.where(in_churn_range, gamma_max, 0.0)
        # sigma_hat(t_hat) = (1 + gamma) sigma_hat(t)  <=>  lambda(t_hat) = lambda(t) - log(1 + gamma).
        raised = jnp.minimum(process.t_from_log_snr(log_snr - jnp.log1p(gamma)), process.T)
        t_hat = jnp.where(gamma > 0.0, raised, t)  # exactly t without churn (no round trip)
        scale, std = process.transition(t, t_hat)
        x_hat = scale * x + S_noise * std * standard_normal(step_key, x)
        return heun_step(denoiser, x_hat, t_hat, s)

    return scan_time_grid(
        step, x_init, times, key, nfe=two_evaluations_per_step(num_steps_of(times))
    )


def _validate_adaptive(
    *,
    solver: str,
    rtol: float,
    atol: float,
    max_steps: int,
    max_nfe: int | None,
    time_variable: str,
) -> None:
    require_choice("solver", solver, tuple(ADAPTIVE_SOLVERS))
    require_choice("time_variable", time_variable, TIME_VARIABLES)
    require_real("rtol", rtol, low=0.0, low_open=True)
    require_real("atol", atol, low=0.0, low_open=True)
    require_int("max_steps", max_steps, low=1)
    if max_nfe is not None:
        stages = len(ADAPTIVE_SOLVERS[solver].tableau.c)
        require_int("max_nfe", max_nfe, low=1 + stages)  # the first slope and one step


@register_sampler(
    nfe=lambda num_steps, **_: None,
    deterministic=True,
    reference="Dormand & Prince 1980 / Tsitouras 2011 via diffrax, on Song et al. 2021 eq. 13",
    validate=_validate_adaptive,
)
def adaptive(
    denoiser: Denoiser,
    key: Array,
    x_init: Array,
    times: Array,
    *,
    solver: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    max_nfe: int | None = None,
    time_variable: str = "t",
) -> SampleResult:
    """Adaptive Runge-Kutta solve of the probability-flow ODE from times[0] to times[-1] (diffrax).

    Only the grid's end points matter. ``solver``: 'dopri5' (Dormand & Prince 1980, the RK45 of
    score_sde's ODE sampler) or 'tsit5' (Tsitouras 2011); ``rtol``/``atol`` feed diffrax's PID
    controller (score_sde: 1e-5 both); ``time_variable`` 't' or 'log_snr' (use 'log_snr' for DDPM's
    piecewise continuous view); ``max_nfe`` caps the network evaluations (NFE = 1 + stages x steps,
    so at most (max_nfe - 1) // stages steps, accepted or rejected); hitting the step limit raises at
    run time. The whole batch shares one step size. NFE is exact (see
    ``diffusion.flow.solve_adaptive``). ``key`` is unused.
    """
    if max_nfe is not None:
        max_steps = min(max_steps, (max_nfe - 1) // len(ADAPTIVE_SOLVERS[solver].tableau.c))
    x_end, nfe = solve_adaptive(
        probability_flow_field,
        x_init,
        times[0],
        times[-1],
        denoiser,
        process=denoiser.process,
        time_variable=time_variable,
        solver=solver,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
    )
    return SampleResult(samples=x_end, nfe=nfe)
