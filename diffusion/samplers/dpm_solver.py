"""DPM-Solver and DPM-Solver++: exponential integrators of the probability-flow ODE in log-SNR time.

The integrator, its phi-functions and the step shared by every solver of this family are in
``diffusion.samplers.exponential``; the solvers here approximate the prediction inside its integral
by a Taylor polynomial in lambda whose coefficients are finite differences of network evaluations,
either inside the step (singlestep, Runge-Kutta-like) or from previous steps (multistep, Adams-like).

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

The multistep solvers warm up with lower orders on their first steps, and (``lower_order_final``) take
a step at a lower order when it is much longer in lambda than the one before
(``exponential.multistep_orders``): the coefficients that extrapolate the model over a step rho times
longer than the history it comes from grow like rho^(order - 1), which on a uniform-t grid (whose last
log-SNR step is about 4x the one before) made the errors of DPM-Solver's count rule (lower the order of
the last steps below 15 steps) grow with NFE.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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
from diffusion.samplers.exponential import (
    ModelFn,
    Node,
    dispatch,
    exponential_step,
    grid_steps,
    model_fn,
    multistep_orders,
    node,
    node_at_fraction,
    thresholder,
)

__all__ = [
    "ORDERS",
    "dpm_solver",
    "dpm_solver_fast",
    "dpm_solver_multistep",
    "dpm_solver_pp_2m",
    "dpm_solver_pp_2s",
    "dpm_solver_pp_3m",
    "fast_orders",
]

ORDERS = (1, 2, 3)
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


# ================================================================================ singlestep
def _singlestep_update(
    order: int,
    model: ModelFn,
    prediction: str,
    process: Process,
    x: Array,
    start: Node,
    end: Node,
    m_start: Array,
) -> Array:
    """One singlestep DPM-Solver step of ``order`` from start to end (``order`` network calls, the
    first, ``m_start``, made by the caller).

    Order 1 is DPM-Solver-1 = DDIM (Lu et al. 2022, eq. 3.7); order 2 is Alg. 1 (r1 = 1/2) and
    order 3 is Alg. 2 (r1 = 1/3, r2 = 2/3) of Lu et al. 2022 in noise prediction, and in data
    prediction order 2 is DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1). The intermediate nodes sit at
    fractions r of the lambda step; the realised ratios (exact up to the inverse t(lambda)) are used.
    """
    if order == 1:
        return exponential_step(prediction, x, start, end, [(0, m_start)])
    h = end.log_snr - start.log_snr
    if order == 2:
        (fraction,) = _SECOND_ORDER_FRACTIONS
        mid = node_at_fraction(process, start, end, fraction)
        r1 = (mid.log_snr - start.log_snr) / h
        x_mid = exponential_step(prediction, x, start, mid, [(0, m_start)])
        # m_s + (m_s1 - m_s) / (2 r1) integrated with the first-order weight (Lu et al. 2022, Alg. 1).
        combined = m_start + (model(x_mid, mid.t)[0] - m_start) / (2.0 * r1)
        return exponential_step(prediction, x, start, end, [(0, combined)])
    first, second = (node_at_fraction(process, start, end, f) for f in _THIRD_ORDER_FRACTIONS)
    r1 = (first.log_snr - start.log_snr) / h
    r2 = (second.log_snr - start.log_snr) / h
    x_first = exponential_step(prediction, x, start, first, [(0, m_start)])
    diff_first = model(x_first, first.t)[0] - m_start
    # u2 of Lu et al. 2022, Alg. 2: the step to s2 corrected by (r2/r1) D1 with weight h2 phi_2(h2).
    x_second = exponential_step(
        prediction, x, start, second, [(0, m_start), (1, (r2 / r1) * diff_first)]
    )
    diff_second = model(x_second, second.t)[0] - m_start
    return exponential_step(prediction, x, start, end, [(0, m_start), (1, diff_second / r2)])


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
    x_init = jnp.asarray(x_init)
    model = model_fn(denoiser, prediction, threshold)
    starts, ends = grid_steps(process, times)
    branches = [
        lambda x, s, t, m, order=order: _singlestep_update(
            order, model, prediction, process, x, s, t, m
        )
        for order in range(1, max(orders) + 1)
    ]

    def body(x, step):
        start, end, order = step
        m_start, x0_start = model(x, start.t)
        x_next = dispatch(branches, order, x, start, end, m_start)
        return x_next, (x_next, x0_start)

    steps = (starts, ends, jnp.asarray(orders, dtype=jnp.int32))
    samples, (states, denoised) = jax.lax.scan(body, x_init, steps)
    return SampleResult(
        samples=samples,
        nfe=constant_nfe(sum(orders)),
        trajectory=jnp.concatenate([x_init[None], states]),
        denoised=denoised,
    )


# ================================================================================ multistep
def _multistep_update(
    order: int,
    prediction: str,
    x: Array,
    start: Node,
    end: Node,
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
        return exponential_step(prediction, x, start, end, [(0, m_0)])
    r_0 = (log_snr_history[0] - log_snr_history[1]) / h
    diff_0 = (m_0 - model_history[1]) / r_0
    if order == 2:
        return exponential_step(prediction, x, start, end, [(0, m_0 + 0.5 * diff_0)])
    r_1 = (log_snr_history[1] - log_snr_history[2]) / h
    diff_1 = (model_history[1] - model_history[2]) / r_1
    first_derivative = diff_0 + r_0 / (r_0 + r_1) * (diff_0 - diff_1)
    # The official DPM-Solver code uses (D1_0 - D1_1) / (r_0 + r_1) here, half the quadratic's
    # h^2 m''; with that its 3M solvers converge with global order 2 only on Gaussian data.
    second_derivative = 2.0 * (diff_0 - diff_1) / (r_0 + r_1)
    terms = [(0, m_0), (1, first_derivative), (2, second_derivative)]
    return exponential_step(prediction, x, start, end, terms)


def _multistep_sample(
    denoiser: Denoiser,
    x_init: ArrayLike,
    times: ArrayLike,
    order: int,
    lower_order_final: bool,
    prediction: str,
    threshold: Callable[[Array], Array] | None = None,
) -> SampleResult:
    """Multistep DPM-Solver(++) of ``order`` (orders per step: ``multistep_orders``), one network call
    per step.

    The scan carries x and the last order - 1 model evaluations; step i evaluates the model at
    times[i] and steps to times[i + 1], so the evaluation at the final time is never made.
    """
    process = denoiser.process
    x_init = jnp.asarray(x_init)
    model = model_fn(denoiser, prediction, threshold)
    starts, ends = grid_steps(process, times)
    orders = multistep_orders(node(process, jnp.asarray(times)).log_snr, order, lower_order_final)
    depth = order
    branches = [
        lambda x, s, t, m, lam, order=order: _multistep_update(order, prediction, x, s, t, m, lam)
        for order in range(1, depth + 1)
    ]

    def body(carry, step):
        x, model_history, log_snr_history = carry
        start, end, step_order = step
        m_start, x0_start = model(x, start.t)
        models = (m_start, *model_history)
        log_snrs = (start.log_snr, *log_snr_history)
        x_next = dispatch(branches, step_order, x, start, end, models, log_snrs)
        return (x_next, models[: depth - 1], log_snrs[: depth - 1]), (x_next, x0_start)

    # Placeholders for the evaluations before the grid starts, which the warm-up orders never read:
    # zeros at lambdas extrapolated backwards with the first step (finite, distinct: no 0/0 anywhere).
    first_step = ends.log_snr[0] - starts.log_snr[0]
    initial = (
        x_init,
        tuple(jnp.zeros_like(x_init) for _ in range(depth - 1)),
        tuple(starts.log_snr[0] - k * first_step for k in range(1, depth)),
    )
    (samples, _, _), (states, denoised) = jax.lax.scan(body, initial, (starts, ends, orders))
    return SampleResult(
        samples=samples,
        nfe=constant_nfe(num_steps_of(times)),
        trajectory=jnp.concatenate([x_init[None], states]),
        denoised=denoised,
    )


# ================================================================================ the six solvers
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
    return _multistep_sample(denoiser, x_init, times, order, lower_order_final, "eps")


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
    threshold = thresholder(thresholding, thresholding_ratio, thresholding_max_value)
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
        threshold = thresholder(thresholding, thresholding_ratio, thresholding_max_value)
        return _multistep_sample(denoiser, x_init, times, order, lower_order_final, "x0", threshold)

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
