"""The probability-flow ODE and its adaptive solution, shared by the ODE sampler and the likelihood.

Every process has the probability-flow ODE (Song et al. 2021, eq. 13)

    dx/dt = f(t) x - g(t)^2 / 2 score(x, t) = f(t) x + g(t)^2 / (2 sigma(t)) eps(x, t),

whose marginals are those of the forward SDE. ``solve_adaptive`` integrates it (or an augmented
state, as the likelihood does) with diffrax's embedded Runge-Kutta pairs, in one of two variables:

* 't': time itself;
* 'log_snr': s = -lambda(t), minus the half log-SNR (increasing in t), with dy/ds = dy/dt dt/ds and
  dt/ds = -1 / (d lambda/dt). This is DPM-Solver's variable (Lu et al. 2022); it makes the vector
  field smooth for DDPM's continuous view, whose piecewise-linear log alpha makes dy/dt jump at
  every chain time.

NFE is exact: both solvers are first-same-as-last, and the slope at the start (one evaluation, also
used for the first step size) is handed to diffrax as its solver state, so every attempted step,
accepted or rejected, costs the stages after the first: NFE = 1 + len(tableau.c) * steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
from jax import Array

from diffusion.parameterization import DenoiserViews
from diffusion.processes import Process
from diffusion.shapes import expand_to

__all__ = [
    "ADAPTIVE_SOLVERS",
    "TIME_VARIABLES",
    "ode_end_at_zero_noise",
    "probability_flow",
    "probability_flow_and_x0",
    "probability_flow_field",
    "solve_adaptive",
]

ADAPTIVE_SOLVERS = {"dopri5": diffrax.Dopri5, "tsit5": diffrax.Tsit5}
TIME_VARIABLES = ("t", "log_snr")


def probability_flow_and_x0(
    denoiser: DenoiserViews, x: Array, t: Array, **model_kwargs
) -> tuple[Array, Array]:
    """(dx/dt, x0 prediction) at (x, t) from one network evaluation (see ``probability_flow``)."""
    process = denoiser.process
    eps_pred, x0_pred = denoiser.predict(x, t, **model_kwargs)
    drift = expand_to(process.drift_coef(t), x) * x
    slope = drift + expand_to(0.5 * process.diffusion_sq(t) / process.sigma(t), x) * eps_pred
    return slope, x0_pred


def probability_flow(denoiser: DenoiserViews, x: Array, t: Array, **model_kwargs) -> Array:
    """dx/dt of the probability-flow ODE at (x, t) (Song et al. 2021, eq. 13): one network evaluation.

    f x - g^2/2 score, written as f x + g^2 / (2 sigma) eps (score = -eps / sigma); t is a scalar or
    a (batch,) array.
    """
    return probability_flow_and_x0(denoiser, x, t, **model_kwargs)[0]


def _to_variable(process: Process, t: Array, time_variable: str) -> Array:
    return jnp.asarray(t) if time_variable == "t" else -process.log_snr(t)


def _from_variable(process: Process, s: Array, time_variable: str) -> tuple[Array, Array]:
    """(t, dt/ds) at the integration variable s."""
    if time_variable == "t":
        return s, jnp.ones_like(s)
    t = process.t_from_log_snr(-s)
    dlambda_dt = jax.jvp(process.log_snr, (t,), (jnp.ones_like(t),))[1]
    return t, -1.0 / dlambda_dt


def _first_step(y0, slope0, rtol: float, atol: float) -> Array:
    """First step size 0.01 ||y0|| / ||f(y0)|| in the tolerance-scaled RMS norm (Hairer, Norsett &
    Wanner, "Solving ODEs I", Sec. II.4, steps a-b), from the slope the solve reuses as its first
    stage, so it costs no evaluation."""
    leaves, slopes = jax.tree.leaves(y0), jax.tree.leaves(slope0)
    scales = [atol + rtol * jnp.abs(leaf) for leaf in leaves]
    size = sum(leaf.size for leaf in leaves)

    def scaled_rms(values):
        return jnp.sqrt(
            sum(jnp.sum((v / c) ** 2) for v, c in zip(values, scales, strict=True)) / size
        )

    y_norm, slope_norm = scaled_rms(leaves), scaled_rms(slopes)
    tiny = (y_norm < 1e-5) | (slope_norm < 1e-5)
    return jnp.where(tiny, 1e-6, 0.01 * y_norm / jnp.where(tiny, 1.0, slope_norm))


def solve_adaptive(
    vector_field: Callable[[Array, Any, Any], Any],
    y0: Any,
    t0: Array,
    t1: Array,
    args: Any,
    *,
    process: Process,
    time_variable: str = "t",
    solver: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
) -> tuple[Any, Array]:
    """(y(t1), NFE) for dy/dt = vector_field(t, y, args) from y(t0) = y0 (a pytree), in either
    direction of time, solved adaptively in ``time_variable`` (see the module docstring).

    ``solver``: 'dopri5' (Dormand & Prince 1980, the RK45 of score_sde) or 'tsit5' (Tsitouras 2011);
    ``rtol``/``atol`` feed diffrax's PID controller; exceeding ``max_steps`` raises at run time. The
    error norm is taken over the whole pytree, so a batch shares one step size (as score_sde's
    flattened solve). ``vector_field`` must be hashable for diffrax to reuse its compilation.
    """
    if time_variable not in TIME_VARIABLES:
        raise ValueError(
            f"unknown time_variable {time_variable!r}; accepted: {', '.join(TIME_VARIABLES)}"
        )
    if solver not in ADAPTIVE_SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; accepted: {', '.join(ADAPTIVE_SOLVERS)}")

    def field_in_variable(s, y, args):
        t, dt_ds = _from_variable(process, s, time_variable)
        return jax.tree.map(lambda leaf: dt_ds * leaf, vector_field(t, y, args))

    s0, s1 = _to_variable(process, t0, time_variable), _to_variable(process, t1, time_variable)
    term = diffrax.ODETerm(field_in_variable)
    slope0 = term.vf(s0, y0, args)
    span = s1 - s0
    first_step = jnp.sign(span) * jnp.minimum(_first_step(y0, slope0, rtol, atol), jnp.abs(span))
    ode_solver = ADAPTIVE_SOLVERS[solver]()
    solution = diffrax.diffeqsolve(
        term,
        ode_solver,
        t0=s0,
        t1=s1,
        dt0=first_step,
        y0=y0,
        args=args,
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        # diffrax's FSAL state is (first_step, f0): with first_step=False it reuses f0 as the first
        # stage, also when the first step is rejected (tests count the calls to guard this layout).
        solver_state=(jnp.asarray(False), slope0),
        max_steps=max_steps,
    )
    y1 = jax.tree.map(lambda leaf: leaf[-1], solution.ys)
    nfe = 1 + len(ode_solver.tableau.c) * solution.stats["num_steps"]
    return y1, jnp.asarray(nfe, jnp.int32)


def probability_flow_field(t: Array, x: Array, denoiser: DenoiserViews) -> Array:
    """``probability_flow`` as the (t, y, args) vector field that ``solve_adaptive`` integrates."""
    return probability_flow(denoiser, x, t)


def ode_end_at_zero_noise(
    denoiser: DenoiserViews,
    x: Array,
    t_start: float,
    *,
    end_sigma_hat: float = 1e-6,
    solver: str = "dopri5",
    rtol: float = 1e-10,
    atol: float = 1e-10,
    max_steps: int = 100_000,
) -> Array:
    """The probability-flow ODE's end at sigma = 0 from x at t_start: a reference for samplers.

    An adaptive solve in the log-SNR variable down to sigma_hat = ``end_sigma_hat`` (below the
    process's t_min where need be: its formulas hold there), then the denoiser's x0 prediction, the
    end of the remaining path up to O(end_sigma_hat^2) (the x0 prediction along the trajectory is
    smooth in sigma_hat^2; ``diffusion.samplers.api``). Use float64 for tight tolerances.
    """
    process = denoiser.process
    t_end = process.t_from_log_snr(-jnp.log(end_sigma_hat))
    x_end, _ = solve_adaptive(
        probability_flow_field,
        jnp.asarray(x),
        jnp.asarray(t_start, dtype=jnp.result_type(float)),
        t_end,
        denoiser,
        process=process,
        time_variable="log_snr",
        solver=solver,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
    )
    return denoiser.x0(x_end, t_end)
