"""DPM-Solver and DPM-Solver++: exponential integrators of the probability-flow ODE in log-SNR time.

With the half log-SNR lambda = log(alpha / sigma) as the time variable, the probability-flow ODE of every
linear-Gaussian process has an exactly solvable linear part. Its solution from s to t, h = lambda_t -
lambda_s > 0, is (Lu et al. 2022, "DPM-Solver", eq. 3.4; Lu et al. 2022, "DPM-Solver++", eq. 8)

    eps form: x_t = (alpha_t/alpha_s) x_s - alpha_t int_{lambda_s}^{lambda_t} e^{-lambda} eps dlambda
    x0 form:  x_t = (sigma_t/sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^{lambda} x0 dlambda

and the solvers differ only in how they approximate the prediction inside the integral: a Taylor
polynomial in lambda whose coefficients are finite differences of network evaluations, either inside
the step (singlestep, Runge-Kutta-like) or from previous steps (multistep, Adams-like). Integrating the
Taylor term of degree n exactly gives the weight h phi_{n+1}(h) (eps form) or h phi_{n+1}(-h) (x0 form)
of the exponential-integrator phi-functions (``_phi``). The data-prediction form is the noise-prediction
form under the symmetry alpha <-> sigma, lambda -> -lambda, so one step function serves both.

Everything is written with the process's log alpha, log sigma and lambda, and the denoiser's (eps, x0)
views, so every solver runs every process (VP, sub-VP, VE, cosine, DDPM, SMLD, EDM) and every
parameterization.

Registered samplers (``SamplerSpec`` in ``diffusion.samplers.base``):

* 'dpm_solver': singlestep DPM-Solver-``order`` (1: DDIM / DPM-Solver-1, eq. 3.7; 2: Alg. 1 with
  r1 = 1/2; 3: Alg. 2 with r1 = 1/3, r2 = 2/3); NFE = order * num_steps.
* 'dpm_solver_fast': DPM-Solver-fast (Lu et al. 2022, Sec. 3.4 and App. D.1): singlestep with per-step
  ``orders``; ``plan(nfe)`` picks K = nfe // 3 + 1 steps and the orders that spend exactly nfe.
* 'dpm_solver_multistep': multistep DPM-Solver-``order`` in noise prediction (Lu et al. 2022b, App. B);
  NFE = num_steps.
* 'dpm_solver_pp_2s', 'dpm_solver_pp_2m', 'dpm_solver_pp_3m': DPM-Solver++ in data prediction
  (Lu et al. 2022b, Alg. 1 and 2, and the third-order multistep of its App. B), with optional dynamic
  thresholding of the x0 prediction (Saharia et al. 2022).

The multistep solvers warm up with lower orders on their first steps; ``lower_order_final`` also lowers
the order of the last steps when num_steps < ``LOWER_ORDER_FINAL_MAX_STEPS`` (15, as documented in the
official DPM-Solver code, whose implementation uses 10), which stabilises few-step sampling.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

from diffusion.parameterization import Denoiser
from diffusion.processes import Process
from diffusion.samplers.base import (
    SampleResult,
    SamplerFn,
    constant_nfe,
    get_sampler,
    num_steps_of,
    one_evaluation_per_step,
    register_sampler,
    require_int,
    require_real,
    two_evaluations_per_step,
)
from diffusion.shapes import expand_to

__all__ = [
    "LOWER_ORDER_FINAL_MAX_STEPS",
    "ORDERS",
    "dpm_solver",
    "dpm_solver_fast",
    "dpm_solver_multistep",
    "dpm_solver_pp_2m",
    "dpm_solver_pp_2s",
    "dpm_solver_pp_3m",
    "dynamic_threshold",
    "fast_orders",
    "multistep_orders",
]

ORDERS = (1, 2, 3)
LOWER_ORDER_FINAL_MAX_STEPS = 15

# Intermediate points of the singlestep solvers as fractions of the lambda step (Lu et al. 2022, Alg. 1-2).
_SECOND_ORDER_FRACTIONS = (0.5,)
_THIRD_ORDER_FRACTIONS = (1.0 / 3.0, 2.0 / 3.0)


# ================================================================================ validation
def _check_order(option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value not in ORDERS:
        raise ValueError(f"{option}={value!r} is not an order; accepted: 1, 2, 3")


def _check_bool(option: str, value: Any) -> None:
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{option}={value!r} must be True or False")


def _validate(**options: Any) -> None:
    """ValueError for a bad option value of any DPM-Solver sampler (every option, defaults filled in).

    The grid-dependent check (one order per step) is in ``_fast_step_orders``.
    """
    if "order" in options:
        _check_order("order", options["order"])
    if options.get("orders") is not None:
        orders = options["orders"]
        if isinstance(orders, str) or not isinstance(orders, Sequence):
            raise ValueError(f"orders={orders!r} must be a tuple of per-step orders")
        for order in orders:
            _check_order(f"orders={tuple(orders)!r}: entry", order)
    if "lower_order_final" in options:
        _check_bool("lower_order_final", options["lower_order_final"])
    if "thresholding" in options:
        _check_bool("thresholding", options["thresholding"])
        require_real(
            "thresholding_ratio", options["thresholding_ratio"], low=0.0, high=1.0, low_open=True
        )
        require_real(
            "thresholding_max_value", options["thresholding_max_value"], low=0.0, low_open=True
        )


# ================================================================================ order schedules
def fast_orders(nfe: int) -> tuple[int, ...]:
    """Per-step orders of DPM-Solver-fast for exactly ``nfe`` evaluations (Lu et al. 2022, App. D.1).

    K = nfe // 3 + 1 steps: (3, ..., 3, 2, 1) if nfe % 3 == 0, (3, ..., 3, 1) if nfe % 3 == 1 and
    (3, ..., 3, 2) if nfe % 3 == 2. For nfe < 3 this is the single step (nfe,).
    """
    require_int("nfe", nfe)
    num_steps = nfe // 3 + 1
    tail = {0: (2, 1), 1: (1,), 2: (2,)}[nfe % 3]
    return (3,) * (num_steps - len(tail)) + tail


def _default_fast_orders(num_steps: int) -> tuple[int, ...]:
    """(3, ..., 3, 1): DPM-Solver-fast's schedule for nfe = 3 num_steps - 2, used when orders=None."""
    return (3,) * (num_steps - 1) + (1,)


def multistep_orders(num_steps: int, order: int, lower_order_final: bool) -> tuple[int, ...]:
    """Per-step orders of the multistep solvers (Lu et al. 2022b, App. B; official DPM-Solver code).

    Step i (0-based) has only i previous evaluations, so its order is min(order, i + 1) (warm-up); with
    ``lower_order_final`` and num_steps < LOWER_ORDER_FINAL_MAX_STEPS it is also at most num_steps - i,
    so the last step is first order and the one before at most second order.
    """
    orders = np.minimum(order, np.arange(1, num_steps + 1))
    if lower_order_final and num_steps < LOWER_ORDER_FINAL_MAX_STEPS:
        orders = np.minimum(orders, np.arange(num_steps, 0, -1))
    return tuple(int(o) for o in orders)


# ================================================================================ dynamic thresholding
def dynamic_threshold(x0: ArrayLike, ratio: float = 0.995, max_value: float = 1.0) -> Array:
    """Dynamic thresholding of an x0 prediction (Saharia et al. 2022, "Imagen", Sec. 2.3).

    Per example, s = max(max_value, quantile_ratio(|x0|)) (linear-interpolation quantile over all
    non-batch entries); x0 is clipped to [-s, s] and scaled by max_value / s. With max_value = 1 this is
    Imagen's rule for data in [-1, 1] (and DPM-Solver++'s, Lu et al. 2022b, Sec. 5); for another
    max_value it keeps the output in [-max_value, max_value]. It is the identity whenever every
    |x0| <= max_value.
    """
    x0 = jnp.asarray(x0)
    magnitudes = jnp.abs(x0).reshape(x0.shape[0], -1)
    bound = jnp.maximum(jnp.quantile(magnitudes, ratio, axis=1), max_value)
    bound = expand_to(bound, x0)
    return jnp.clip(x0, -bound, bound) * (max_value / bound)


# ================================================================================ the exponential step
class _Node(NamedTuple):
    """A time with its log alpha and log sigma (a pytree, so grids of nodes go through lax.scan)."""

    t: Array
    log_alpha: Array
    log_sigma: Array

    @property
    def log_snr(self) -> Array:
        return self.log_alpha - self.log_sigma


def _node(process: Process, t: ArrayLike) -> _Node:
    return _Node(jnp.asarray(t), process.log_alpha(t), process.log_sigma(t))


def _node_at_fraction(process: Process, start: _Node, end: _Node, fraction: float) -> _Node:
    """The node at lambda_s + fraction * h, converted to time by the process's exact inverse."""
    log_snr = start.log_snr + fraction * (end.log_snr - start.log_snr)
    return _node(process, process.t_from_log_snr(log_snr))


def _phi(h: Array, n: int) -> Array:
    """h phi_{n+1}(h) = h^{-n} int_0^h e^{h - tau} tau^n / n! dtau: the weight of the Taylor term of degree n.

    phi_1(h) = (e^h - 1)/h and phi_{k+1}(h) = (phi_k(h) - 1/k!)/h are the exponential-integrator
    phi-functions; h phi_1 = expm1(h), h phi_2 = expm1(h)/h - 1, h phi_3 = expm1(h)/h^2 - 1/h - 1/2
    (Lu et al. 2022, eq. 3.6; Lu et al. 2022b, App. B).
    """
    weight = jnp.expm1(h)
    for k in range(1, n + 1):
        weight = weight / h - 1.0 / math.factorial(k)
    return weight


def _exponential_step(
    prediction: str, x: Array, start: _Node, end: _Node, terms: Sequence[tuple[int, Array]]
) -> Array:
    """x at ``end`` from x at ``start`` given Taylor terms (n, D_n), D_n ~ h^n d^n m / dlambda^n.

    noise prediction: x_t = (alpha_t/alpha_s) x_s - sigma_t sum_n h phi_{n+1}(h) D_n
    (Lu et al. 2022, eq. 3.6); data prediction: x_t = (sigma_t/sigma_s) x_s + alpha_t sum_n
    h phi_{n+1}(-h) D_n (Lu et al. 2022b, eq. 9), with h = lambda_t - lambda_s. In terms of
    ``_phi(s, n)`` = s phi_{n+1}(s) both are ``scale x - weight sum_n _phi(+-h, n) D_n``.
    """
    h = end.log_snr - start.log_snr
    if prediction == "eps":
        scale = jnp.exp(end.log_alpha - start.log_alpha)
        weight = jnp.exp(end.log_sigma)
        signed_h = h
    else:
        scale = jnp.exp(end.log_sigma - start.log_sigma)
        weight = jnp.exp(end.log_alpha)
        signed_h = -h
    update = sum(_phi(signed_h, n) * derivative for n, derivative in terms)
    return (scale * x - weight * update).astype(x.dtype)


_ModelFn = Callable[[Array, Array], Array]


def _model_fn(
    denoiser: Denoiser, prediction: str, threshold: Callable[[Array], Array] | None
) -> _ModelFn:
    """m(x, t): the eps prediction, or the (optionally thresholded) x0 prediction: one network call."""

    def model(x: Array, t: Array) -> Array:
        eps, x0 = denoiser.predict(x, t)
        if prediction == "eps":
            return eps.astype(x.dtype)
        return (x0 if threshold is None else threshold(x0)).astype(x.dtype)

    return model


def _grid_steps(process: Process, times: ArrayLike) -> tuple[_Node, _Node]:
    """The start and end nodes of every step of a time grid, stacked for lax.scan."""
    nodes = _node(process, jnp.asarray(times))
    starts = jax.tree_util.tree_map(lambda a: a[:-1], nodes)
    ends = jax.tree_util.tree_map(lambda a: a[1:], nodes)
    return starts, ends


def _dispatch(branches: Sequence[Callable[..., Array]], order: Array, *operands) -> Array:
    """branches[order - 1](*operands): a direct call for a single branch, else one lax.switch."""
    if len(branches) == 1:
        return branches[0](*operands)
    return jax.lax.switch(order - 1, branches, *operands)


# ================================================================================ singlestep
def _singlestep_update(
    order: int,
    model: _ModelFn,
    prediction: str,
    process: Process,
    x: Array,
    start: _Node,
    end: _Node,
) -> Array:
    """One singlestep DPM-Solver step of ``order`` from start to end (``order`` network calls).

    Order 1 is DPM-Solver-1 = DDIM (Lu et al. 2022, eq. 3.7); order 2 is Alg. 1 (r1 = 1/2) and
    order 3 is Alg. 2 (r1 = 1/3, r2 = 2/3) of Lu et al. 2022 in noise prediction, and in data
    prediction order 2 is DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1). The intermediate nodes sit at
    fractions r of the lambda step; the realised ratios (exact up to the inverse t(lambda)) are used.
    """
    m_start = model(x, start.t)
    if order == 1:
        return _exponential_step(prediction, x, start, end, [(0, m_start)])
    h = end.log_snr - start.log_snr
    if order == 2:
        (fraction,) = _SECOND_ORDER_FRACTIONS
        mid = _node_at_fraction(process, start, end, fraction)
        r1 = (mid.log_snr - start.log_snr) / h
        x_mid = _exponential_step(prediction, x, start, mid, [(0, m_start)])
        # m_s + (m_s1 - m_s) / (2 r1) integrated with the first-order weight (Lu et al. 2022, Alg. 1).
        combined = m_start + (model(x_mid, mid.t) - m_start) / (2.0 * r1)
        return _exponential_step(prediction, x, start, end, [(0, combined)])
    first, second = (_node_at_fraction(process, start, end, f) for f in _THIRD_ORDER_FRACTIONS)
    r1 = (first.log_snr - start.log_snr) / h
    r2 = (second.log_snr - start.log_snr) / h
    x_first = _exponential_step(prediction, x, start, first, [(0, m_start)])
    diff_first = model(x_first, first.t) - m_start
    # u2 of Lu et al. 2022, Alg. 2: the step to s2 corrected by (r2/r1) D1 with weight h2 phi_2(h2).
    x_second = _exponential_step(
        prediction, x, start, second, [(0, m_start), (1, (r2 / r1) * diff_first)]
    )
    diff_second = model(x_second, second.t) - m_start
    return _exponential_step(prediction, x, start, end, [(0, m_start), (1, diff_second / r2)])


def _singlestep_sample(
    denoiser: Denoiser,
    x_init: ArrayLike,
    times: ArrayLike,
    orders: tuple[int, ...],
    prediction: str,
    threshold: Callable[[Array], Array] | None = None,
) -> SampleResult:
    """Singlestep DPM-Solver over the grid with per-step ``orders`` (static), in one lax.scan."""
    process = denoiser.process
    model = _model_fn(denoiser, prediction, threshold)
    starts, ends = _grid_steps(process, times)
    branches = [
        lambda x, s, t, order=order: _singlestep_update(order, model, prediction, process, x, s, t)
        for order in range(1, max(orders) + 1)
    ]

    def body(x, step):
        start, end, order = step
        return _dispatch(branches, order, x, start, end), None

    steps = (starts, ends, jnp.asarray(orders, dtype=jnp.int32))
    samples, _ = jax.lax.scan(body, jnp.asarray(x_init), steps)
    return SampleResult(samples=samples, nfe=constant_nfe(sum(orders)))


# ================================================================================ multistep
def _multistep_update(
    order: int,
    prediction: str,
    x: Array,
    start: _Node,
    end: _Node,
    model_history: tuple[Array, ...],
    log_snr_history: tuple[Array, ...],
) -> Array:
    """One multistep step of ``order`` from start (= history[0]) to end, reusing past evaluations.

    model_history = (m_0, m_1, m_2) at lambda_0 (start), lambda_1, lambda_2 (earlier). With r_k =
    (lambda_k - lambda_{k+1}) / h the first differences D1_k = (m_k - m_{k+1}) / r_k give
    order 2: x_t = step with m_0 + D1_0 / 2 at the first-order weight (Lu et al. 2022b, Alg. 2);
    order 3: D1 = D1_0 + r_0 (D1_0 - D1_1)/(r_0 + r_1) ~ h m' and D2 = 2 (D1_0 - D1_1)/(r_0 + r_1)
    ~ h^2 m'', the derivatives of the quadratic through the three points, each integrated exactly.
    """
    h = end.log_snr - start.log_snr
    m_0 = model_history[0]
    if order == 1:
        return _exponential_step(prediction, x, start, end, [(0, m_0)])
    r_0 = (log_snr_history[0] - log_snr_history[1]) / h
    diff_0 = (m_0 - model_history[1]) / r_0
    if order == 2:
        return _exponential_step(prediction, x, start, end, [(0, m_0 + 0.5 * diff_0)])
    r_1 = (log_snr_history[1] - log_snr_history[2]) / h
    diff_1 = (model_history[1] - model_history[2]) / r_1
    first_derivative = diff_0 + r_0 / (r_0 + r_1) * (diff_0 - diff_1)
    # The official DPM-Solver code uses (D1_0 - D1_1) / (r_0 + r_1) here, half the quadratic's
    # h^2 m''; with that its 3M solvers converge with global order 2 only on Gaussian data.
    second_derivative = 2.0 * (diff_0 - diff_1) / (r_0 + r_1)
    terms = [(0, m_0), (1, first_derivative), (2, second_derivative)]
    return _exponential_step(prediction, x, start, end, terms)


def _multistep_sample(
    denoiser: Denoiser,
    x_init: ArrayLike,
    times: ArrayLike,
    orders: tuple[int, ...],
    prediction: str,
    threshold: Callable[[Array], Array] | None = None,
) -> SampleResult:
    """Multistep DPM-Solver(++) with per-step ``orders`` (static), one network call per step.

    The scan carries x and the last max(orders) - 1 model evaluations; step i evaluates the model at
    times[i] and steps to times[i + 1], so the evaluation at the final time is never made.
    """
    process = denoiser.process
    x_init = jnp.asarray(x_init)
    model = _model_fn(denoiser, prediction, threshold)
    starts, ends = _grid_steps(process, times)
    depth = max(orders)
    branches = [
        lambda x, s, t, m, lam, order=order: _multistep_update(order, prediction, x, s, t, m, lam)
        for order in range(1, depth + 1)
    ]

    def body(carry, step):
        x, model_history, log_snr_history = carry
        start, end, order = step
        models = (model(x, start.t), *model_history)
        log_snrs = (start.log_snr, *log_snr_history)
        x_next = _dispatch(branches, order, x, start, end, models, log_snrs)
        return (x_next, models[: depth - 1], log_snrs[: depth - 1]), None

    # Placeholders for the evaluations before the grid starts, which the warm-up orders never read:
    # zeros at lambdas extrapolated backwards with the first step (finite, distinct: no 0/0 anywhere).
    first_step = ends.log_snr[0] - starts.log_snr[0]
    initial = (
        x_init,
        tuple(jnp.zeros_like(x_init) for _ in range(depth - 1)),
        tuple(starts.log_snr[0] - k * first_step for k in range(1, depth)),
    )
    steps = (starts, ends, jnp.asarray(orders, dtype=jnp.int32))
    (samples, _, _), _ = jax.lax.scan(body, initial, steps)
    return SampleResult(samples=samples, nfe=constant_nfe(len(orders)))


# ================================================================================ the six solvers
def _thresholder(
    thresholding: bool, ratio: float, max_value: float
) -> Callable[[Array], Array] | None:
    """``dynamic_threshold`` with these settings, or None when thresholding is off."""
    if not thresholding:
        return None
    return functools.partial(dynamic_threshold, ratio=ratio, max_value=max_value)


def _fast_step_orders(num_steps: int, orders: Sequence[int] | None) -> tuple[int, ...]:
    """DPM-Solver-fast's per-step orders: ``orders`` (one per step) or (3, ..., 3, 1)."""
    if orders is None:
        return _default_fast_orders(num_steps)
    orders = tuple(int(order) for order in orders)
    if len(orders) != num_steps:
        raise ValueError(
            f"sampler 'dpm_solver_fast': orders={orders} has {len(orders)} entries but the grid "
            f"has {num_steps} steps; give one order per step"
        )
    return orders


def _plan_fast(nfe: int, **options) -> tuple[int, dict[str, Any]]:
    """DPM-Solver-fast for exactly ``nfe`` evaluations: the paper's schedule unless orders are given."""
    require_int("nfe", nfe)
    options = get_sampler("dpm_solver_fast").check_options(options)
    if options["orders"] is None:
        options["orders"] = fast_orders(nfe)
    if sum(options["orders"]) != nfe:
        raise ValueError(
            f"sampler 'dpm_solver_fast': orders={options['orders']} spend "
            f"{sum(options['orders'])} evaluations, not nfe={nfe}"
        )
    return len(options["orders"]), options


@register_sampler(
    nfe=lambda num_steps, *, order, **_: order * num_steps,
    deterministic=True,
    reference="Lu et al. 2022, DPM-Solver: eq. 3.7 (order 1 = DDIM), Alg. 1 (order 2), Alg. 2 "
    "(order 3)",
    validate=_validate,
)
def dpm_solver(
    denoiser: Denoiser, key: Array, x_init: ArrayLike, times: ArrayLike, *, order: int = 3
) -> SampleResult:
    """Singlestep DPM-Solver-``order`` (Lu et al. 2022, eq. 3.7 for order 1 (= DDIM), Alg. 1, Alg. 2).

    Each grid interval is one step of ``order`` network evaluations with intermediate times at
    lambda fractions 1/2 (order 2) or 1/3, 2/3 (order 3): NFE = order * num_steps. Deterministic:
    ``key`` is unused.
    """
    del key
    orders = (order,) * num_steps_of(jnp.asarray(times))
    return _singlestep_sample(denoiser, x_init, times, orders, "eps")


@register_sampler(
    nfe=lambda num_steps, *, orders, **_: sum(_fast_step_orders(num_steps, orders)),
    deterministic=True,
    reference="Lu et al. 2022, DPM-Solver: DPM-Solver-fast, Sec. 3.4 and App. D.1",
    validate=_validate,
    plan=_plan_fast,
)
def dpm_solver_fast(
    denoiser: Denoiser,
    key: Array,
    x_init: ArrayLike,
    times: ArrayLike,
    *,
    orders: Sequence[int] | None = None,
) -> SampleResult:
    """DPM-Solver-fast (Lu et al. 2022, Sec. 3.4, App. D.1): singlestep steps of per-step ``orders``.

    ``orders`` has one entry in {1, 2, 3} per grid step (NFE = sum(orders)); None means
    (3, ..., 3, 1). The registry's ``plan(nfe)`` returns the paper's schedule (``fast_orders``) for an
    exact NFE; the paper uses a grid uniform in lambda ('uniform_log_snr'). Deterministic: ``key`` is
    unused.
    """
    del key
    step_orders = _fast_step_orders(num_steps_of(jnp.asarray(times)), orders)
    return _singlestep_sample(denoiser, x_init, times, step_orders, "eps")


@register_sampler(
    nfe=one_evaluation_per_step,
    deterministic=True,
    reference="Lu et al. 2022b, DPM-Solver++: multistep DPM-Solver in noise prediction, App. B",
    validate=_validate,
)
def dpm_solver_multistep(
    denoiser: Denoiser,
    key: Array,
    x_init: ArrayLike,
    times: ArrayLike,
    *,
    order: int = 3,
    lower_order_final: bool = True,
) -> SampleResult:
    """Multistep DPM-Solver-``order`` in noise prediction (Lu et al. 2022b, App. B): NFE = num_steps.

    See ``multistep_orders`` for the warm-up and final orders. Deterministic: ``key`` is unused.
    """
    del key
    orders = multistep_orders(num_steps_of(jnp.asarray(times)), order, lower_order_final)
    return _multistep_sample(denoiser, x_init, times, orders, "eps")


@register_sampler(
    nfe=two_evaluations_per_step,
    deterministic=True,
    reference="Lu et al. 2022b, DPM-Solver++: Alg. 1 (2S); dynamic thresholding of Saharia et al. "
    "2022",
    validate=_validate,
)
def dpm_solver_pp_2s(
    denoiser: Denoiser,
    key: Array,
    x_init: ArrayLike,
    times: ArrayLike,
    *,
    thresholding: bool = False,
    thresholding_ratio: float = 0.995,
    thresholding_max_value: float = 1.0,
) -> SampleResult:
    """DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1, r = 1/2): singlestep second order in data prediction.

    NFE = 2 num_steps. ``thresholding`` applies ``dynamic_threshold`` (percentile
    ``thresholding_ratio``) to every x0 prediction, for data in [-thresholding_max_value,
    thresholding_max_value]. Deterministic: ``key`` is unused.
    """
    del key
    threshold = _thresholder(thresholding, thresholding_ratio, thresholding_max_value)
    orders = (2,) * num_steps_of(jnp.asarray(times))
    return _singlestep_sample(denoiser, x_init, times, orders, "x0", threshold)


def _dpm_solver_pp_multistep(order: int) -> SamplerFn:
    """DPM-Solver++(``order``M): multistep in data prediction (Lu et al. 2022b, Alg. 2; App. B)."""

    def sampler(
        denoiser: Denoiser,
        key: Array,
        x_init: ArrayLike,
        times: ArrayLike,
        *,
        lower_order_final: bool = True,
        thresholding: bool = False,
        thresholding_ratio: float = 0.995,
        thresholding_max_value: float = 1.0,
    ) -> SampleResult:
        del key
        threshold = _thresholder(thresholding, thresholding_ratio, thresholding_max_value)
        orders = multistep_orders(num_steps_of(jnp.asarray(times)), order, lower_order_final)
        return _multistep_sample(denoiser, x_init, times, orders, "x0", threshold)

    sampler.__name__ = f"dpm_solver_pp_{order}m"
    sampler.__doc__ = (
        f"DPM-Solver++({order}M) (Lu et al. 2022b, {'Alg. 2' if order == 2 else 'App. B'}): "
        "multistep in data prediction, NFE = num_steps. Thresholding as in ``dpm_solver_pp_2s``; "
        "see ``multistep_orders`` for the warm-up and final orders. Deterministic: ``key`` is unused."
    )
    return sampler


dpm_solver_pp_2m = register_sampler(
    nfe=one_evaluation_per_step,
    deterministic=True,
    reference="Lu et al. 2022b, DPM-Solver++: Alg. 2 (2M); dynamic thresholding of Saharia et al. "
    "2022",
    validate=_validate,
)(_dpm_solver_pp_multistep(2))
dpm_solver_pp_3m = register_sampler(
    nfe=one_evaluation_per_step,
    deterministic=True,
    reference="Lu et al. 2022b, DPM-Solver++: multistep third order (3M), App. B; Saharia et al. "
    "2022",
    validate=_validate,
)(_dpm_solver_pp_multistep(3))
