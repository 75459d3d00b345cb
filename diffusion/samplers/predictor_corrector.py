"""The compiled loop shared by UniPC, DEIS, SA-Solver and the DPM-Solver++ SDE samplers.

All four are multistep exponential integrators (``diffusion.samplers.exponential``): step i evaluates the
network once, at its start t_i, and reuses the evaluations of earlier steps. UniPC and SA-Solver also
correct: the evaluation at t_i, made at the predicted state x~_i, is reused to recompute the state at
t_i from the state at t_{i-1} with a rule that includes the new evaluation (Zhao et al. 2023, UniC;
Xue et al. 2023, SA-Corrector). The corrected state, not x~_i, starts the next step, and the network
is never evaluated at it: one evaluation per step, and none after the last prediction (which is not
corrected).

``pec_scan`` runs that predict-evaluate-correct cycle over a time grid as one ``lax.scan`` whose step
i (from t_i to t_{i+1}) is

    m_i = model(x~_i, t_i)                         (the step's only network call)
    x_i = corrector[c_i](x_{i-1}, ..., m_i, ...)   (c_i = 0: no correction, x_i = x~_i)
    x~_{i+1} = predictor[p_i](x_i, ..., m_i, ...)

with the per-step orders p_i, c_i chosen on the host or in the program (traced arrays: a lax.switch
picks the branch). The trajectory holds x_0 = x_init, the corrected x_1 ... x_{N-1} and the final
prediction x~_N; the denoised predictions are those of each m_i.

The stochastic samplers (DPM-Solver++ SDE, SA-Solver) integrate the family of reverse SDEs whose
data-prediction solution over one step is (Lu et al. 2022b, App. A; Xue et al. 2023, eq. 13 with a
constant tau^2 = eta)

    x_t = (sigma_t/sigma_s) e^{-eta h} x_s + alpha_t (1 + eta) int_0^h e^{-(1+eta)(h-u)} x0(u) du
          + sigma_t sqrt(1 - e^{-2 eta h}) z,

eta = 0 being the probability-flow ODE and eta = 1 the reverse SDE. Its deterministic part is the
ODE's data-prediction step to a node whose log sigma is lowered by eta h (``sde_end``): that node's
log-SNR step is (1 + eta) h, so the kernel above is the ODE kernel at step (1 + eta) h, and a Taylor
term D_n = h^n d^n x0/dlambda^n keeps its ODE weight h' phi_{n+1}(-h') at h' = (1 + eta) h once the
lambdas of the past evaluations are stretched by (1 + eta) about lambda_s (``stretch``), which keeps
every ratio r = (lambda_k - lambda_{k+1}) / h that the multistep formulas use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

from diffusion.processes import Process
from diffusion.samplers.base import SampleResult, constant_nfe, num_steps_of, standard_normal
from diffusion.samplers.exponential import ModelFn, Node, dispatch, grid_steps

__all__ = [
    "Past",
    "check_bool",
    "check_order",
    "pec_scan",
    "sde_end",
    "sde_noise_scale",
    "stretch",
    "taylor_terms",
]


# ================================================================================ option checks
def check_order(option: str, value: Any, orders: Sequence[int]) -> None:
    """ValueError unless ``value`` is an int in ``orders``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value not in orders:
        accepted = ", ".join(map(str, orders))
        raise ValueError(f"{option}={value!r} is not an order; accepted: {accepted}")


def check_bool(option: str, value: Any) -> None:
    """ValueError unless ``value`` is True or False."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{option}={value!r} must be True or False")


# ================================================================================ the loop
class Past(NamedTuple):
    """Network outputs m_k, newest first, and the half log-SNRs lambda_k at which they were made.

    In step i, ``models[0]`` is m_i (made at t_i in this step), ``models[1]`` is m_{i-1}, and so on.
    Entries from before the grid's start are zeros at lambdas extrapolated backwards with the first
    step (finite and distinct, so no formula divides by zero); the warm-up orders never use them.
    """

    models: tuple[Array, ...]
    log_snrs: tuple[Array, ...]


# predictor(x_i, start, end, past, noise, data) -> x~_{i+1}
Predictor = Callable[[Array, Node, Node, Past, Array | None, Any], Array]
# corrector(x_{i-1}, x~_i, previous, start, past, previous_noise, previous_data) -> x_i
Corrector = Callable[[Array, Array, Node, Node, Past, Array | None, Any], Array]


def _shift_right(tree: Any) -> Any:
    """Every leaf's entry i replaced by entry i - 1 (entry 0 kept): the previous step's values."""
    return jax.tree_util.tree_map(lambda a: jnp.concatenate([a[:1], a[:-1]]), tree)


def pec_scan(
    model: ModelFn,
    process: Process,
    x_init: ArrayLike,
    times: ArrayLike,
    *,
    predictors: Sequence[Predictor],
    predictor_orders: ArrayLike,
    depth: int,
    correctors: Sequence[Corrector] = (),
    corrector_orders: ArrayLike | None = None,
    key: Array | None = None,
    step_data: Any = None,
) -> SampleResult:
    """Predict, evaluate, correct over ``times`` in one lax.scan (module docstring); NFE = num_steps.

    ``predictors[p - 1]`` is the predictor of order p and ``predictor_orders`` (num_steps,) the
    order of each step; ``correctors[c - 1]`` and ``corrector_orders`` (num_steps,) likewise, with
    order 0 (always at step 0) meaning no correction. ``depth`` past evaluations (before the current
    one) are kept. With a ``key`` step i draws z_i = N(0, I) from ``split(key, num_steps)[i]`` (the
    noise convention of ``diffusion.samplers.base``), passes it to its predictor and keeps it for
    the next step's corrector, which must reuse it (SA-Solver). ``step_data`` is a pytree of
    (num_steps, ...) arrays whose entry i goes to step i's predictor (and to step i + 1's corrector).
    """
    x_init = jnp.asarray(x_init)
    times = jnp.asarray(times)
    num_steps = num_steps_of(times)
    starts, ends = grid_steps(process, times)
    stochastic = key is not None
    if corrector_orders is None:
        corrector_orders = jnp.zeros(num_steps, jnp.int32)
    if step_data is None:
        step_data = jnp.zeros(num_steps, x_init.dtype)
    step_keys = jax.random.split(key, num_steps) if stochastic else jnp.zeros(num_steps)

    def no_correction(x_previous, x_predicted, *_):
        return x_predicted

    corrector_branches = [no_correction, *correctors]

    def body(carry, inputs):
        x_predicted, x_previous, noise_previous, past_models, past_log_snrs = carry
        start, end, previous, predictor_order, corrector_order, step_key, data, data_previous = (
            inputs
        )
        m_start, x0_start = model(x_predicted, start.t)
        past = Past((m_start, *past_models), (start.log_snr, *past_log_snrs))
        if correctors:
            x = jax.lax.switch(
                corrector_order,
                corrector_branches,
                x_previous,
                x_predicted,
                previous,
                start,
                past,
                noise_previous,
                data_previous,
            )
        else:
            x = x_predicted
        noise = standard_normal(step_key, x) if stochastic else None
        x_next = dispatch(predictors, predictor_order, x, start, end, past, noise, data)
        carry = (
            x_next.astype(x.dtype),
            x,
            noise_previous if noise is None else noise,
            past.models[:depth],
            past.log_snrs[:depth],
        )
        return carry, (x.astype(x_init.dtype), x0_start.astype(x_init.dtype))

    first_step = ends.log_snr[0] - starts.log_snr[0]
    initial = (
        x_init,
        x_init,
        jnp.zeros_like(x_init) if stochastic else None,
        tuple(jnp.zeros_like(x_init) for _ in range(depth)),
        tuple(starts.log_snr[0] - k * first_step for k in range(1, depth + 1)),
    )
    inputs = (
        starts,
        ends,
        _shift_right(starts),
        jnp.asarray(predictor_orders, jnp.int32),
        jnp.asarray(corrector_orders, jnp.int32),
        step_keys,
        step_data,
        _shift_right(step_data),
    )
    (samples, *_), (states, denoised) = jax.lax.scan(body, initial, inputs)
    return SampleResult(
        samples=samples,
        nfe=constant_nfe(num_steps),
        trajectory=jnp.concatenate([states, samples[None]]),
        denoised=denoised,
    )


# ================================================================================ polynomial terms
def taylor_terms(nodes: Sequence[Array], values: Sequence[Array]) -> list[tuple[int, Array]]:
    """Taylor terms (n, D_n) at v = 0 of the polynomial of degree K - 1 through (v_k, m_k), k < K.

    D_n = d^n p / dv^n (0) solves the Vandermonde system sum_n v_k^n / n! D_n = m_k; with v the
    lambda offset in units of the step h, D_n = h^n d^n p / dlambda^n, the form that
    ``exponential_step`` integrates exactly. The nodes are traced scalars (any distinct values).
    """
    count = len(nodes)
    vandermonde = jnp.stack(
        [jnp.stack([node**n / math.factorial(n) for n in range(count)]) for node in nodes]
    )
    inverse = jnp.linalg.inv(vandermonde)  # (n, k): D_n = sum_k inverse[n, k] m_k
    return [(n, sum(inverse[n, k] * values[k] for k in range(count))) for n in range(count)]


# ================================================================================ the SDE family
def sde_end(start: Node, end: Node, eta: float) -> Node:
    """The node whose data-prediction ODE step from ``start`` is the deterministic part of the SDE
    step of noise rate ``eta`` (module docstring): log sigma lowered by eta h.

    ``eta`` is a static option: eta = 0 returns ``end`` itself, also where h is infinite (a grid
    ending at sigma = 0), which 0 * h would turn into NaN.
    """
    if eta == 0:
        return end
    h = end.log_snr - start.log_snr
    return Node(end.t, end.log_alpha, end.log_sigma - eta * h)


def stretch(start: Node, log_snrs: Sequence[Array], eta: float) -> tuple[Array, ...]:
    """lambda_s + (1 + eta)(lambda_k - lambda_s): the past lambdas on the scale of ``sde_end``."""
    return tuple(start.log_snr + (1.0 + eta) * (log_snr - start.log_snr) for log_snr in log_snrs)


def sde_noise_scale(start: Node, end: Node, eta: float) -> Array:
    """sigma_t sqrt(1 - e^{-2 eta h}): the standard deviation of the SDE step's noise."""
    h = end.log_snr - start.log_snr
    return jnp.exp(end.log_sigma) * jnp.sqrt(-jnp.expm1(-2.0 * eta * h))
