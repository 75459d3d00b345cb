"""The exponential integrator of the probability-flow ODE in log-SNR time, shared by its solvers.

With the half log-SNR lambda = log(alpha / sigma) as the time variable, the probability-flow ODE of every
linear-Gaussian process has an exactly solvable linear part. Its solution from s to t, h = lambda_t -
lambda_s > 0, is (Lu et al. 2022, "DPM-Solver", eq. 3.4; Lu et al. 2022, "DPM-Solver++", eq. 8)

    eps form: x_t = (alpha_t/alpha_s) x_s - alpha_t int_{lambda_s}^{lambda_t} e^{-lambda} eps dlambda
    x0 form:  x_t = (sigma_t/sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^{lambda} x0 dlambda

and the solvers built on it (DPM-Solver and DPM-Solver++ in ``dpm_solver``, UniPC, DEIS and the SDE
solvers in their modules) differ only in how they approximate the prediction inside the integral. A
Taylor term of degree n integrates exactly to the weight h phi_{n+1}(h) (eps form) or h phi_{n+1}(-h)
(x0 form) of the phi-functions (``phi``); the data-prediction form is the noise-prediction form under
the symmetry alpha <-> sigma, lambda -> -lambda, so one step function serves both
(``exponential_step``). Everything is written with the process's log alpha, log sigma and lambda and the
denoiser's (eps, x0) views, so every solver runs every process and parameterization.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

from diffusion.parameterization import DenoiserViews
from diffusion.processes import Process
from diffusion.shapes import expand_to

__all__ = [
    "AMPLIFICATION_LIMIT",
    "ModelFn",
    "Node",
    "dispatch",
    "dynamic_threshold",
    "exponential_step",
    "grid_steps",
    "model_fn",
    "multistep_orders",
    "node",
    "node_at_fraction",
    "phi",
    "thresholder",
]

# The largest growth of a multistep step's extrapolation that is accepted: a step of order k is taken
# only if (h_i / h_{i-1})^(k - 1) <= AMPLIFICATION_LIMIT, else at the highest order that passes
# (module docstring of dpm_solver); tuned on the oracle so that no grid's error grows with NFE
# (benchmarks/solver_accuracy).
AMPLIFICATION_LIMIT = 2.0


def multistep_orders(log_snrs: ArrayLike, order: int, lower_order_final: bool) -> Array:
    """Per-step orders of the multistep solvers on a grid of half log-SNRs (num_steps + 1,).

    Step i (0-based) has only i previous evaluations, so its order is min(order, i + 1) (warm-up, as
    Lu et al. 2022b, App. B). With ``lower_order_final`` a step much longer in lambda than the one
    before is taken at a lower order: the coefficients extrapolating the history over it grow like
    rho^(k - 1) with rho = h_i / h_{i-1}, so order k needs rho^(k - 1) <= AMPLIFICATION_LIMIT (order 2
    up to rho = 2, order 3 up to rho = sqrt(2)). A traced (num_steps,) int32 array: the grid decides.
    """
    log_snrs = jnp.asarray(log_snrs)
    steps = log_snrs[1:] - log_snrs[:-1]
    num_steps = steps.shape[0]
    orders = jnp.minimum(order, jnp.arange(1, num_steps + 1))
    if lower_order_final and num_steps > 1:
        ratios = jnp.concatenate([jnp.ones(1, steps.dtype), steps[1:] / steps[:-1]])
        allowed = jnp.ones_like(orders)
        for k in range(2, order + 1):  # the highest k whose amplification is accepted
            allowed = jnp.where(ratios ** (k - 1) <= AMPLIFICATION_LIMIT, k, allowed)
        orders = jnp.minimum(orders, allowed)
    return orders.astype(jnp.int32)


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
class Node(NamedTuple):
    """A time with its log alpha and log sigma (a pytree, so grids of nodes go through lax.scan)."""

    t: Array
    log_alpha: Array
    log_sigma: Array

    @property
    def log_snr(self) -> Array:
        return self.log_alpha - self.log_sigma


def node(process: Process, t: ArrayLike) -> Node:
    return Node(jnp.asarray(t), process.log_alpha(t), process.log_sigma(t))


def node_at_fraction(process: Process, start: Node, end: Node, fraction: float) -> Node:
    """The node at lambda_s + fraction * h, converted to time by the process's exact inverse."""
    log_snr = start.log_snr + fraction * (end.log_snr - start.log_snr)
    return node(process, process.t_from_log_snr(log_snr))


def phi(h: Array, n: int) -> Array:
    """h phi_{n+1}(h) = h^{-n} int_0^h e^{h - tau} tau^n / n! dtau: the weight of the Taylor term of degree n.

    phi_1(h) = (e^h - 1)/h and phi_{k+1}(h) = (phi_k(h) - 1/k!)/h are the exponential-integrator
    phi-functions; h phi_1 = expm1(h), h phi_2 = expm1(h)/h - 1, h phi_3 = expm1(h)/h^2 - 1/h - 1/2
    (Lu et al. 2022, eq. 3.6; Lu et al. 2022b, App. B).
    """
    weight = jnp.expm1(h)
    for k in range(1, n + 1):
        weight = weight / h - 1.0 / math.factorial(k)
    return weight


def exponential_step(
    prediction: str, x: Array, start: Node, end: Node, terms: Sequence[tuple[int, Array]]
) -> Array:
    """x at ``end`` from x at ``start`` given Taylor terms (n, D_n), D_n ~ h^n d^n m / dlambda^n.

    noise prediction: x_t = (alpha_t/alpha_s) x_s - sigma_t sum_n h phi_{n+1}(h) D_n
    (Lu et al. 2022, eq. 3.6); data prediction: x_t = (sigma_t/sigma_s) x_s + alpha_t sum_n
    h phi_{n+1}(-h) D_n (Lu et al. 2022b, eq. 9), with h = lambda_t - lambda_s. In terms of
    ``phi(s, n)`` = s phi_{n+1}(s) both are ``scale x - weight sum_n phi(+-h, n) D_n``.
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
    update = sum(phi(signed_h, n) * derivative for n, derivative in terms)
    return (scale * x - weight * update).astype(x.dtype)


ModelFn = Callable[[Array, Array], tuple[Array, Array]]


def model_fn(
    denoiser: DenoiserViews, prediction: str, threshold: Callable[[Array], Array] | None
) -> ModelFn:
    """(m, x0)(x, t): m the eps prediction, or the (optionally thresholded) x0 prediction, and x0 the
    x0 prediction the solver stands on (thresholded where m is): one network call."""

    def model(x: Array, t: Array) -> tuple[Array, Array]:
        eps, x0 = denoiser.predict(x, t)
        if threshold is not None:
            x0 = threshold(x0)
        m = eps if prediction == "eps" else x0
        return m.astype(x.dtype), x0.astype(x.dtype)

    return model


def grid_steps(process: Process, times: ArrayLike) -> tuple[Node, Node]:
    """The start and end nodes of every step of a time grid, stacked for lax.scan."""
    nodes = node(process, jnp.asarray(times))
    starts = jax.tree_util.tree_map(lambda a: a[:-1], nodes)
    ends = jax.tree_util.tree_map(lambda a: a[1:], nodes)
    return starts, ends


def dispatch(branches: Sequence[Callable[..., Array]], order: Array, *operands) -> Array:
    """branches[order - 1](*operands): a direct call for a single branch, else one lax.switch."""
    if len(branches) == 1:
        return branches[0](*operands)
    return jax.lax.switch(order - 1, branches, *operands)


def thresholder(
    thresholding: bool, ratio: float, max_value: float
) -> Callable[[Array], Array] | None:
    """``dynamic_threshold`` with these settings, or None when thresholding is off."""
    if not thresholding:
        return None
    return functools.partial(dynamic_threshold, ratio=ratio, max_value=max_value)
