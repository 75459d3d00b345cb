"""DEIS: the time-polynomial Adams-Bashforth exponential integrator of Zhang & Chen 2023 (tAB-DEIS).

Zhang & Chen 2023 ("Fast Sampling of Diffusion Models with Exponential Integrator", Sec. 4 and eq. 14)
solve the probability-flow ODE exactly in its linear part and approximate the noise prediction by
the polynomial in t through the last k evaluations (Adams-Bashforth in t, not in lambda):

    eps(tau) ~ sum_j l_j(tau) eps_{i-j},   l_j(tau) = prod_{l != j} (tau - t_{i-l}) / (t_{i-j} - t_{i-l}),

j, l = 0..k-1, so that from s = t_i to t = t_{i+1} (h = lambda_t - lambda_s; the eps form of the
exponential integrator, Lu et al. 2022, eq. 3.4)

    x_t = (alpha_t/alpha_s) x_s - sigma_t int_0^h e^{h-u} eps(tau(lambda_s + u)) du
        = DDIM(x_s, eps_i) - sigma_t sum_{j>=1} W_ij (eps_{i-j} - eps_i),
    W_ij = int_0^h e^{h-u} l_j(tau(lambda_s + u)) du,

using sum_j l_j = 1, so that the constant part is integrated in closed form (the DDIM step, and
order 1 is DDIM exactly) and only the weights W_ij of the differences need quadrature. The paper's
C_ij (its eq. 14) are the coefficients of eps_{i-j} in this sum. tau(lambda) is the process's exact
inverse of lambda(t) (``Process.t_from_log_snr``); W_ij is computed for every step at once, inside the
compiled program (the grid is traced), with ``QUADRATURE_NODES``-point Gauss-Legendre in lambda, whose
integrand e^{h-u} l_j(tau) is smooth on every continuous process: relative error far below float64
round-off at the step sizes samplers use (DEIS's own code sums 10,000 rectangles in t instead).

Order k (1..3) is the paper's tAB with a polynomial of degree r = k - 1: global order k (its Fig. 3).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

from diffusion.parameterization import Denoiser
from diffusion.processes import Process
from diffusion.samplers.base import (
    SampleResult,
    num_steps_of,
    one_evaluation_per_step,
    register_sampler,
)
from diffusion.samplers.exponential import exponential_step, model_fn, multistep_orders, node
from diffusion.samplers.predictor_corrector import Past, check_bool, check_order, pec_scan

__all__ = ["ORDERS", "QUADRATURE_NODES", "deis", "tab_weights"]

ORDERS = (1, 2, 3)
QUADRATURE_NODES = 16


def _lagrange_basis(tau: Array, nodes: Array, j: int) -> Array:
    """l_j(tau) = prod_{l != j} (tau - nodes[l]) / (nodes[j] - nodes[l]) over the last axis of nodes."""
    count = nodes.shape[-1]
    value = jnp.ones_like(tau)
    for other in range(count):
        if other != j:
            value = value * (tau - nodes[..., other]) / (nodes[..., j] - nodes[..., other])
    return value


def tab_weights(process: Process, times: ArrayLike, order: int) -> Array:
    """W_ij of tAB-DEIS of ``order`` on a grid (module docstring): (num_steps, order).

    Row i holds W_ij for j = 0..order-1 (W_i0 is unused: 0). The nodes t_{i-j} before the grid's
    start are extrapolated backwards with the first step (finite and distinct); the orders of the
    first steps never use their weights (``multistep_orders``).
    """
    times = jnp.asarray(times)
    num_steps = num_steps_of(times)
    first_step = times[0] - times[1]
    before = times[0] + first_step * jnp.arange(order - 1, 0, -1, dtype=times.dtype)
    extended = jnp.concatenate([before, times])  # extended[i + order - 1] = times[i]
    # nodes[i, j] = t_{i-j}, j = 0..order-1
    nodes = jnp.stack(
        [extended[order - 1 - j : order - 1 - j + num_steps] for j in range(order)], -1
    )
    log_snrs = process.log_snr(times)
    h = (log_snrs[1:] - log_snrs[:-1])[:, None]  # (num_steps, 1)
    abscissae, weights = np.polynomial.legendre.leggauss(QUADRATURE_NODES)
    u = 0.5 * h * (1.0 + jnp.asarray(abscissae, times.dtype))  # (num_steps, nodes)
    tau = process.t_from_log_snr(log_snrs[:-1, None] + u)
    kernel = 0.5 * h * jnp.asarray(weights, times.dtype) * jnp.exp(h - u)
    columns = [jnp.zeros(num_steps, times.dtype)] + [
        jnp.sum(kernel * _lagrange_basis(tau, nodes[:, None, :], j), axis=-1)
        for j in range(1, order)
    ]
    return jnp.stack(columns, -1)


def _validate(**options: Any) -> None:
    check_order("order", options["order"], ORDERS)
    check_bool("lower_order_final", options["lower_order_final"])


@register_sampler(
    nfe=one_evaluation_per_step,
    deterministic=True,
    reference="Zhang & Chen 2023, DEIS: tAB-DEIS (Sec. 4, eq. 14), polynomial of degree order - 1 "
    "in t; order 1 = DDIM",
    validate=_validate,
)
def deis(
    denoiser: Denoiser,
    key: Array,
    x_init: ArrayLike,
    times: ArrayLike,
    *,
    order: int = 3,
    lower_order_final: bool = True,
) -> SampleResult:
    """tAB-DEIS of ``order`` 1..3 (Zhang & Chen 2023, Sec. 4): multistep in t on the noise prediction.

    One network evaluation per step (NFE = num_steps); the first steps warm up with lower orders and
    ``lower_order_final`` lowers the order of a step much longer in lambda than the one before
    (``multistep_orders``). Order 1 is DDIM. Deterministic: ``key`` is unused.
    """
    del key
    process = denoiser.process
    times = jnp.asarray(times)
    model = model_fn(denoiser, "eps", None)
    orders = multistep_orders(node(process, times).log_snr, order, lower_order_final)
    # Each step's weights for the order it takes (the Lagrange basis depends on the node count).
    all_weights = [tab_weights(process, times, k) for k in range(1, order + 1)]
    padded = jnp.stack([jnp.pad(w, ((0, 0), (0, order - w.shape[1]))) for w in all_weights])
    step_weights = padded[orders - 1, jnp.arange(num_steps_of(times))]  # (num_steps, order)

    def predict(x, start, end, past: Past, noise, weights):
        eps_start = past.models[0]
        ddim = exponential_step("eps", x, start, end, [(0, eps_start)])
        sigma_end = jnp.exp(end.log_sigma)
        differences = sum(weights[j] * (past.models[j] - eps_start) for j in range(1, order))
        return (ddim - sigma_end * differences).astype(x.dtype)

    return pec_scan(
        model,
        process,
        x_init,
        times,
        predictors=[predict],
        predictor_orders=jnp.ones_like(orders),
        depth=order - 1,
        step_data=step_weights,
    )
