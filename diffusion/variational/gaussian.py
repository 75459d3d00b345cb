"""Gaussian densities, KLs and decoders of the variational bound, elementwise and in nats.

* ``normal_kl``: KL(N(m_1, v_1) || N(m_2, v_2)) per coordinate, the term every L_{t-1} of the
  DDPM bound is made of (Ho et al. 2020, eq. 5: "all KL divergences ... are comparisons between
  Gaussians, so they can be calculated in a Rao-Blackwellized fashion with closed form expressions").
* ``gaussian_log_likelihood``: log N(x; m, v), the decoder p(x_0 | x_1) for continuous data.
* ``discretized_gaussian_log_likelihood``: Ho et al. 2020, eq. 13: the Gaussian's mass over the
  pixel's bin [x - 1/255, x + 1/255] of 8-bit data scaled to [-1, 1], the edge bins extended to
  -inf and +inf, so that the 256 probabilities sum to one.

Variances are passed as log-variances: the learned variance of Nichol & Dhariwal 2021 (eq. 15) is an
interpolation in log space, and the posterior variance of the first step (zero) never reaches these
functions as a log.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import Array
from jax.scipy.special import log_ndtr
from jax.typing import ArrayLike

__all__ = [
    "NUM_BINS",
    "discretized_gaussian_log_likelihood",
    "gaussian_log_likelihood",
    "log_normal_interval_mass",
    "normal_kl",
]

NUM_BINS = 256  # 8-bit data


def normal_kl(
    mean_q: ArrayLike, log_var_q: ArrayLike, mean_p: ArrayLike, log_var_p: ArrayLike
) -> Array:
    """KL(N(mean_q, exp(log_var_q)) || N(mean_p, exp(log_var_p))) per coordinate, in nats.

    1/2 [log v_p - log v_q + v_q / v_p + (m_q - m_p)^2 / v_p - 1] (the univariate case of the
    Gaussian KL, e.g. Kingma & Welling 2014, App. B; Ho et al. 2020, eq. 5).
    """
    log_var_q, log_var_p = jnp.asarray(log_var_q), jnp.asarray(log_var_p)
    squared_gap = (jnp.asarray(mean_q) - jnp.asarray(mean_p)) ** 2
    return 0.5 * (
        log_var_p
        - log_var_q
        + jnp.exp(log_var_q - log_var_p)
        + squared_gap * jnp.exp(-log_var_p)
        - 1.0
    )


def gaussian_log_likelihood(x: ArrayLike, mean: ArrayLike, log_var: ArrayLike) -> Array:
    """log N(x; mean, exp(log_var)) per coordinate, in nats."""
    log_var = jnp.asarray(log_var)
    squared_gap = (jnp.asarray(x) - jnp.asarray(mean)) ** 2
    return -0.5 * (math.log(2.0 * math.pi) + log_var + squared_gap * jnp.exp(-log_var))


def log_normal_interval_mass(lower: ArrayLike, upper: ArrayLike) -> Array:
    """log (Phi(upper) - Phi(lower)) for the standard normal CDF Phi, for finite lower < upper.

    Computed on the side of zero where the interval's mass is not a difference of two numbers close
    to one: an interval in the upper half is reflected, Phi(u) - Phi(l) = Phi(-l) - Phi(-u), and then
    log Phi(u) + log(1 - exp(log Phi(l) - log Phi(u))).
    """
    lower, upper = jnp.asarray(lower), jnp.asarray(upper)
    reflect = lower + upper > 0.0
    low = jnp.where(reflect, -upper, lower)
    high = jnp.where(reflect, -lower, upper)
    log_high = log_ndtr(high)
    return log_high + jnp.log(-jnp.expm1(log_ndtr(low) - log_high))


def discretized_gaussian_log_likelihood(
    x: ArrayLike, mean: ArrayLike, log_var: ArrayLike, num_bins: int = NUM_BINS
) -> Array:
    """log P(x) per coordinate for Ho et al. 2020's discretised Gaussian decoder (eq. 13), in nats.

    x holds 8-bit values scaled to [-1, 1] (x = 2 k / (num_bins - 1) - 1); the probability of x is the
    mass of N(mean, exp(log_var)) over [x - delta, x + delta], delta = 1 / (num_bins - 1), with the
    lowest bin extended to -inf and the highest to +inf. Each case is computed from finite arguments
    (no infinities, so no NaN gradients in the branches jnp.where discards).
    """
    x, mean = jnp.asarray(x), jnp.asarray(mean)
    inv_std = jnp.exp(-0.5 * jnp.asarray(log_var))
    half_width = 1.0 / (num_bins - 1)
    lower = (x - half_width - mean) * inv_std
    upper = (x + half_width - mean) * inv_std
    lowest_bin = log_ndtr(upper)  # x = -1: mass of (-inf, x + delta]
    highest_bin = log_ndtr(-lower)  # x = +1: mass of [x - delta, +inf)
    # Inner bins: for the edge bins evaluate at a harmless interval (their value is discarded).
    is_lowest, is_highest = x < -1.0 + half_width, x > 1.0 - half_width
    inner = log_normal_interval_mass(
        jnp.where(is_lowest | is_highest, -1.0, lower),
        jnp.where(is_lowest | is_highest, 1.0, upper),
    )
    return jnp.where(is_lowest, lowest_bin, jnp.where(is_highest, highest_bin, inner))
