"""SA-Solver: the stochastic Adams predictor-corrector of Xue et al. 2023, in data prediction.

Xue et al. 2023 ("SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion Models", Sec. 4)
integrate the reverse SDEs of noise level tau, dx = [f x - (1 + tau^2)/2 g^2 score] dt + tau g dw,
whose data-prediction step from s to t with a constant tau (h = lambda_t - lambda_s) is (their eq. 13)

    x_t = (sigma_t/sigma_s) e^{-tau^2 h} x_s + alpha_t (1 + tau^2) int_0^h e^{-(1+tau^2)(h-u)} x0(u) du
          + sigma_t sqrt(1 - e^{-2 tau^2 h}) xi,

the family of ``predictor_corrector`` with eta = tau^2 (tau = 0: the probability-flow ODE; tau = 1:
the reverse SDE). x0(u) is replaced by the Lagrange polynomial in lambda through network evaluations
and integrated exactly (``taylor_terms`` then ``exponential_step`` at the SDE's node ``sde_end``):

* SA-Predictor (Adams-Bashforth, their eq. 15): the polynomial through the last ``predictor_order``
  evaluations m_i, ..., m_{i-p+1}, from x_i at t_i to x~_{i+1};
* SA-Corrector (Adams-Moulton, their eq. 18): the polynomial through m_{i+1} = x0(x~_{i+1}, t_{i+1})
  and the last ``corrector_order`` - 1 evaluations before it, from x_i again, with the same xi
  as the predictor. The next step reuses m_{i+1} (their PEC mode: one evaluation per step) and the
  last step is not corrected (their 'few steps' mode), so NFE = num_steps.

With tau = 0 the solver is a deterministic linear multistep method of global order
min(predictor_order + 1, corrector_order) (predictor_order without corrector), the Adams-Bashforth-
Moulton pair in PEC mode.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

from diffusion.parameterization import Denoiser
from diffusion.samplers.base import (
    SampleResult,
    one_evaluation_per_step,
    register_sampler,
    require_real,
)
from diffusion.samplers.exponential import Node, exponential_step, model_fn, multistep_orders, node
from diffusion.samplers.predictor_corrector import (
    Past,
    check_bool,
    check_order,
    pec_scan,
    sde_end,
    sde_noise_scale,
    taylor_terms,
)

__all__ = ["CORRECTOR_ORDERS", "PREDICTOR_ORDERS", "adams_step", "sa_solver", "step_orders"]

PREDICTOR_ORDERS = (1, 2, 3, 4)
CORRECTOR_ORDERS = (0, 1, 2, 3, 4)


def adams_step(
    x: Array,
    start: Node,
    end: Node,
    log_snrs: tuple[Array, ...],
    models: tuple[Array, ...],
    tau: float,
    noise: Array | None,
) -> Array:
    """The stochastic Adams step from start to end with the Lagrange polynomial in lambda through
    (log_snrs[k], models[k]) (module docstring; Xue et al. 2023, eqs. 13, 15, 18)."""
    h = end.log_snr - start.log_snr
    nodes = [(log_snr - start.log_snr) / h for log_snr in log_snrs]
    x_next = exponential_step(
        "x0", x, start, sde_end(start, end, tau**2), taylor_terms(nodes, models)
    )
    if noise is not None:
        x_next = x_next + sde_noise_scale(start, end, tau**2) * noise
    return x_next.astype(x.dtype)


def step_orders(
    log_snrs: Array, predictor_order: int, corrector_order: int, lower_order_final: bool
) -> tuple[Array, Array]:
    """(predictor orders, corrector orders) per step: the corrections made at t_i, i = 0..N-1.

    Predictor: ``multistep_orders`` (warm-up min(p, i + 1); a lower order on a step much longer in
    lambda than the one before). Corrector at t_i (i >= 1, none at t_0): min(c, i + 1) points, as Xue et al.'s
    warm-up, and at most p + 1 after a step that ``lower_order_final`` took at order p < its warm-up
    order.
    """
    predictor_orders = multistep_orders(log_snrs, predictor_order, lower_order_final)
    if corrector_order == 0:
        return predictor_orders, jnp.zeros_like(predictor_orders)
    num_steps = predictor_orders.shape[0]
    points = jnp.minimum(corrector_order, jnp.arange(1, num_steps + 1))  # m_0..m_i at t_i
    # A step that lower_order_final shortened is corrected with at most one point more than its
    # predictor used (the step's two ends at order 1), as UniC-p follows a step of order p.
    lowered = predictor_orders < multistep_orders(log_snrs, predictor_order, False)
    cap = jnp.where(lowered, predictor_orders + 1, corrector_order)
    corrector_orders = jnp.minimum(points, jnp.concatenate([jnp.zeros(1, jnp.int32), cap[:-1]]))
    corrector_orders = corrector_orders.at[0].set(0).astype(jnp.int32)
    return predictor_orders, corrector_orders


def _validate(**options: Any) -> None:
    check_order("predictor_order", options["predictor_order"], PREDICTOR_ORDERS)
    check_order("corrector_order", options["corrector_order"], CORRECTOR_ORDERS)
    require_real("tau", options["tau"], low=0.0)
    check_bool("lower_order_final", options["lower_order_final"])


@register_sampler(
    nfe=one_evaluation_per_step,
    deterministic=False,
    reference="Xue et al. 2023, SA-Solver: SA-Predictor (eq. 15) and SA-Corrector (eq. 18) in data "
    "prediction, PEC mode, constant tau",
    validate=_validate,
    deterministic_if=lambda *, tau, **_: tau == 0,
)
def sa_solver(
    denoiser: Denoiser,
    key: Array,
    x_init: ArrayLike,
    times: ArrayLike,
    *,
    predictor_order: int = 3,
    corrector_order: int = 4,
    tau: float = 1.0,
    lower_order_final: bool = True,
) -> SampleResult:
    """SA-Solver (Xue et al. 2023): stochastic Adams-Bashforth predictor of ``predictor_order`` (1-4)
    and Adams-Moulton corrector of ``corrector_order`` (1-4 points; 0: none) in data prediction.

    ``tau`` >= 0 is the noise level (0: deterministic; 1: the reverse SDE). NFE = num_steps; one
    Gaussian draw per step, shared by the step's predictor and its correction. Defaults: the
    authors' (3, 4).
    """
    process = denoiser.process
    times = jnp.asarray(times)
    predictor_orders, corrector_orders = step_orders(
        node(process, times).log_snr, predictor_order, corrector_order, lower_order_final
    )

    def predictor(order):
        def predict(x, start, end, past: Past, noise, data):
            return adams_step(x, start, end, past.log_snrs[:order], past.models[:order], tau, noise)

        return predict

    def corrector(order):
        def correct(x_previous, x_predicted, previous, start, past: Past, noise, data):
            return adams_step(
                x_previous, previous, start, past.log_snrs[:order], past.models[:order], tau, noise
            )

        return correct

    return pec_scan(
        model_fn(denoiser, "x0", None),
        process,
        x_init,
        times,
        predictors=[predictor(p) for p in range(1, predictor_order + 1)],
        predictor_orders=predictor_orders,
        depth=max(predictor_order, corrector_order) - 1,
        correctors=[corrector(c) for c in range(1, corrector_order + 1)],
        corrector_orders=corrector_orders if corrector_order else None,
        key=None if tau == 0 else key,
    )
