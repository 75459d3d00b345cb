"""Exact log-likelihoods through the probability-flow ODE, and bits/dim of 8-bit images.

The probability-flow ODE dx/dt = v(x, t) = f(t) x - g(t)^2/2 score(x, t) (Song et al. 2021, eq. 13)
transports p_t0 to p_T. By the instantaneous change of variables (Chen et al. 2018, "Neural ODEs",
Theorem 1), d/dt log p_t(x(t)) = -div v(x(t), t) along a trajectory, hence (Song et al. 2021,
Sec. 4.3 and App. D.2)

    log p_t0(x) = log p_T(x(T)) + int_t0^T div v(x(t), t) dt,      x(t0) = x.

``ode_log_likelihood`` integrates the pair [x, int div v] from t0 to T with an adaptive Runge-Kutta
solver of diffrax (Dormand-Prince 5(4) or Tsitouras 5(4)), in-graph, so the whole computation jits.
The divergence is either exact (the trace of the Jacobian, one forward-mode product per dimension) or
the Hutchinson-Skilling estimate probe^T (dv/dx) probe (Hutchinson 1989; Skilling 1989) with a probe
drawn once per trajectory and kept fixed along it (Grathwohl et al. 2019, "FFJORD", Sec. 3.1), which
makes the log-likelihood estimate unbiased.

Conventions (score_sde's ``likelihood.py``, except for the last two):

* the whole batch is one ODE, so the adaptive step sizes are shared by its examples and the NFE is per
  batch; the network must treat examples independently (no cross-batch layers such as batch norm);
* t0 defaults to ``process.t_min``: 1e-5 for VP, sub-VP, VE and cosine, score_sde's ``eps = 1e-5``;
  1/N for the DDPM chain and sigma_min for EDM;
* tolerances default to rtol = atol = 1e-5 (score_sde's defaults); the error norm is the RMS over the
  whole state (diffrax's default);
* the solver steps in t by default; ``time_variable='log_snr'`` steps in minus the half log-SNR
  instead (as DPM-Solver does), which the DDPM chain needs (see ``ode_log_likelihood``);
* the NFE is the exact number of evaluations of the ODE's vector field, i.e. of network calls (each
  call also yields the divergence by forward-mode differentiation of that same call), read from the
  solver's step counts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import Array
from jax.typing import ArrayLike

from diffusion.data import check_data_range
from diffusion.flow import ADAPTIVE_SOLVERS, TIME_VARIABLES, probability_flow, solve_adaptive
from diffusion.parameterization import Denoiser
from diffusion.processes import Process
from diffusion.shapes import sum_except_batch

__all__ = [
    "DIVERGENCES",
    "PROBES",
    "LikelihoodResult",
    "bits_per_dim_from_log_prob",
    "dequantize",
    "exact_divergence",
    "hutchinson_divergence",
    "image_bits_per_dim",
    "ode_log_likelihood",
    "sample_probes",
]

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


def _unknown(kind: str, value: object, accepted: Sequence[str]) -> ValueError:
    return ValueError(f"unknown {kind} {value!r}; accepted: {', '.join(map(repr, accepted))}")


@struct.dataclass
class LikelihoodResult:
    """Per-example log-density (nats) of the data at t0, its two terms, the latent x_T and the NFE.

    log_prob = prior_log_prob + delta_log_prob, where prior_log_prob = log p_T(x_T) under the prior
    used and delta_log_prob = int_t0^T div v dt.
    """

    log_prob: Array  # (batch,)
    prior_log_prob: Array  # (batch,)
    delta_log_prob: Array  # (batch,)
    latent: Array  # x_T, the probability-flow ODE's state at T (the data's latent code)
    nfe: Array  # int32 scalar: vector-field (network) evaluations for the whole batch


# ================================================================================ divergences
def _quadratic_forms(fn: Callable[[Array], Array], x: Array, probes: Array) -> tuple[Array, Array]:
    """fn(x) and probe^T (d fn / dx) probe per example, for each of the probes (num_probes, *x.shape).

    One linearisation of fn at x, then one Jacobian-vector product per probe (forward mode). Examples
    are assumed independent, so one probe of the whole batch probes every example's Jacobian at once.
    """
    value, jvp_fn = jax.linearize(fn, x)
    jacobian_probes = jax.vmap(jvp_fn)(probes)
    return value, jax.vmap(sum_except_batch)(probes * jacobian_probes)


def exact_divergence(fn: Callable[[Array], Array], x: Array) -> tuple[Array, Array]:
    """fn(x) and the exact per-example divergence tr(d fn / dx) = sum_j e_j^T (d fn / dx) e_j.

    Costs one forward-mode product per data dimension (all of them batched together): for low
    dimension only. fn maps a batch (batch, ...) to a batch of the same shape, example by example.
    """
    event_shape = x.shape[1:]
    dim = math.prod(event_shape)
    basis = jnp.eye(dim, dtype=x.dtype).reshape((dim, 1, *event_shape))
    value, forms = _quadratic_forms(fn, x, jnp.broadcast_to(basis, (dim, *x.shape)))
    return value, forms.sum(axis=0)


def hutchinson_divergence(
    fn: Callable[[Array], Array], x: Array, probes: Array
) -> tuple[Array, Array]:
    """fn(x) and the Hutchinson-Skilling divergence estimate mean_k probe_k^T (d fn / dx) probe_k.

    Unbiased for tr(d fn / dx) whenever E[probe probe^T] = I (Hutchinson 1989; Skilling 1989;
    Grathwohl et al. 2019, Sec. 3.1). ``probes`` has shape (num_probes, *x.shape).
    """
    value, forms = _quadratic_forms(fn, x, probes)
    return value, forms.mean(axis=0)


def sample_probes(key: Array, shape: tuple[int, ...], probe: str, dtype=None) -> Array:
    """Probes of zero mean and identity covariance: Rademacher (+-1) or standard Gaussian entries."""
    dtype = dtype or jnp.result_type(float)
    if probe == "rademacher":
        return jax.random.rademacher(key, shape, dtype=dtype)
    if probe == "gaussian":
        return jax.random.normal(key, shape, dtype=dtype)
    raise _unknown("probe", probe, PROBES)


# ================================================================================ the ODE
def _check_options(
    process: Process,
    t0: float,
    divergence: str,
    probe: str,
    solver: str,
    time_variable: str,
    rtol: float,
    atol: float,
    num_probes: int,
    max_steps: int,
) -> None:
    if divergence not in DIVERGENCES:
        raise _unknown("divergence", divergence, DIVERGENCES)
    if probe not in PROBES:
        raise _unknown("probe", probe, PROBES)
    if solver not in ADAPTIVE_SOLVERS:
        raise _unknown("solver", solver, tuple(ADAPTIVE_SOLVERS))
    if time_variable not in TIME_VARIABLES:
        raise _unknown("time_variable", time_variable, TIME_VARIABLES)
    if not (isinstance(rtol, float | int) and math.isfinite(rtol) and rtol > 0):
        raise ValueError(f"rtol must be a finite number > 0, got {rtol!r}")
    if not (isinstance(atol, float | int) and math.isfinite(atol) and atol >= 0):
        raise ValueError(f"atol must be a finite number >= 0, got {atol!r}")
    if not (isinstance(num_probes, int) and num_probes >= 1):
        raise ValueError(f"num_probes must be an integer >= 1, got {num_probes!r}")
    if not (isinstance(max_steps, int) and max_steps >= 1):
        raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
    if not (isinstance(t0, float | int) and process.t_min <= t0 < process.T):
        raise ValueError(
            f"t0={t0!r} must be a number in [t_min, T) = [{process.t_min!r}, {process.T!r}) "
            f"({type(process).__name__})"
        )


@dataclasses.dataclass(frozen=True)
class _AugmentedField:
    """d/dt [x, delta] = [v(x, t), div_x v(x, t)], v the probability-flow drift (Song et al. 2021,
    eq. 13; Chen et al. 2018, Thm 1). args = (denoiser, probes or None, model_kwargs)."""

    def __call__(self, t: Array, state: tuple[Array, Array], args) -> tuple[Array, Array]:
        denoiser, probes, model_kwargs = args

        def velocity(x_in: Array) -> Array:
            return probability_flow(denoiser, x_in, t, **model_kwargs)

        x_t, _ = state
        if probes is None:
            return exact_divergence(velocity, x_t)
        return hutchinson_divergence(velocity, x_t, probes)


@functools.partial(
    jax.jit, static_argnames=("t0", "time_variable", "solver", "rtol", "atol", "max_steps")
)
def _solve_flow(
    denoiser: Denoiser,
    x: Array,
    probes: Array | None,
    model_kwargs: dict[str, Any],
    *,
    t0: float,
    time_variable: str,
    solver: str,
    rtol: float,
    atol: float,
    max_steps: int,
) -> tuple[Array, Array, Array]:
    """(x_T, int div v, NFE): the augmented probability-flow ODE solved from (x, 0) at t0 to T."""
    process = denoiser.process
    (x_T, delta_log_prob), nfe = solve_adaptive(
        _AugmentedField(),
        (x, jnp.zeros(x.shape[:1], x.dtype)),
        jnp.asarray(t0, x.dtype),
        jnp.asarray(process.T, x.dtype),
        (denoiser, probes, model_kwargs),
        process=process,
        time_variable=time_variable,
        solver=solver,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
    )
    return x_T, delta_log_prob, nfe


def ode_log_likelihood(
    denoiser: Denoiser,
    x: ArrayLike,
    key: Array | None = None,
    *,
    t0: float | None = None,
    divergence: str = "exact",
    probe: str = "rademacher",
    num_probes: int = 1,
    solver: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    time_variable: str = "t",
    max_steps: int = 16384,
    prior_logp: Callable[[Array], Array] | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> LikelihoodResult:
    """log p_t0(x) by the probability-flow ODE (Song et al. 2021, Sec. 4.3, App. D.2; Chen et al. 2018).

    Solves d/dt [x, delta] = [v(x, t), div v(x, t)] with v = f x - g^2/2 score (Song et al. 2021,
    eq. 13) from (x, 0) at t0 to T, and returns log p_t0(x) = prior_logp(x_T) + delta(T).

    Args:
      denoiser: the model; its process defines f, g, t_min and T, its ``score`` the vector field.
      x: data at t0, batch first (batch, ...).
      key: PRNG key for the Hutchinson probes (needed only with divergence='hutchinson').
      t0: start time in [t_min, T); default ``process.t_min`` (score_sde's eps = 1e-5 for the SDEs).
      divergence: 'exact' (Jacobian trace, D forward-mode products per call) or 'hutchinson'.
      probe: 'rademacher' or 'gaussian': the Hutchinson probe distribution (fixed along the ODE).
      num_probes: Hutchinson probes averaged per trajectory (FFJORD and score_sde use 1).
      solver: 'dopri5' (score_sde's scipy RK45 is the same tableau) or 'tsit5'.
      rtol, atol: the adaptive step-size controller's tolerances.
      time_variable: the variable the solver steps in: 't' (score_sde) or 'log_snr' (minus the half
        log-SNR, as DPM-Solver). The log-density is the same; 'log_snr' is the one to use for the
        DDPM chain, whose piecewise-linear log alpha(t) makes the t-drift jump at every step time
        (an adaptive solver in t then converges only slowly) while the drift is smooth in lambda.
      max_steps: the solver's step budget; exceeding it is an error.
      prior_logp: log-density of x_T, (batch, ...) -> (batch,); default ``process.prior_logp``.
      model_kwargs: extra keyword arguments of the network (e.g. class labels).

    Returns:
      A ``LikelihoodResult``; ``nfe`` is exact: 1 + 6 per attempted step for both solvers.

    Raises:
      ValueError: for an unknown divergence / probe / solver / time_variable name, rtol <= 0,
        atol < 0, t0 outside [t_min, T), num_probes or max_steps < 1, or a missing key for
        Hutchinson probes.
    """
    process = denoiser.process
    t0 = process.t_min if t0 is None else t0
    _check_options(
        process, t0, divergence, probe, solver, time_variable, rtol, atol, num_probes, max_steps
    )
    if divergence == "hutchinson" and key is None:
        raise ValueError("divergence='hutchinson' needs a PRNG key for its probes; got key=None")
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must be a batch (batch, ...) of at least 2 axes, got shape {x.shape}")
    probes = (
        sample_probes(key, (num_probes, *x.shape), probe, x.dtype)
        if divergence == "hutchinson"
        else None
    )
    x_T, delta_log_prob, nfe = _solve_flow(
        denoiser,
        x,
        probes,
        model_kwargs or {},
        t0=float(t0),
        time_variable=time_variable,
        solver=solver,
        rtol=float(rtol),
        atol=float(atol),
        max_steps=max_steps,
    )
    prior_log_prob = (process.prior_logp if prior_logp is None else prior_logp)(x_T)
    return LikelihoodResult(
        log_prob=prior_log_prob + delta_log_prob,
        prior_log_prob=prior_log_prob,
        delta_log_prob=delta_log_prob,
        latent=x_T,
        nfe=nfe,
    )


# ================================================================================ bits per dimension
def dequantize(key: Array, images: ArrayLike, data_range: Sequence[float] = (-1.0, 1.0)) -> Array:
    """Uniformly dequantised 8-bit images in data_range = (lo, hi): lo + (hi - lo) (x + u) / 256.

    u ~ U[0, 1)^D (Theis et al. 2016, Sec. 3.1; score_sde's (x * 255 + u) / 256), the same map as
    ``diffusion.data.uint8_to_float`` with noise, in JAX and in the default float dtype.
    """
    lo, hi = check_data_range(data_range)
    images = jnp.asarray(images)
    if not jnp.issubdtype(images.dtype, jnp.integer):
        raise ValueError(f"images must be integer (uint8) pixels, got dtype {images.dtype}")
    dtype = jnp.result_type(float)
    noise = jax.random.uniform(key, images.shape, dtype)
    return lo + (hi - lo) * (images.astype(dtype) + noise) / 256.0


def bits_per_dim_from_log_prob(
    log_prob: ArrayLike, dim: int, data_range: Sequence[float] = (-1.0, 1.0)
) -> Array:
    """Bits/dim of 8-bit data from the continuous log-density (nats) of its scaled dequantisation.

    A pixel y = x + u in [0, 256) is mapped to lo + (hi - lo) y / 256, so
    log p_y = log p_data + D log((hi - lo)/256) and

        bits/dim = -log p_data / (D ln 2) + 8 - log2(hi - lo)

    (+7 for [-1, 1], +8 for [0, 1]; docs/references.md #bits-per-dimension-of-8-bit-data;
    score_sde's ``offset = 7 - inverse_scaler(-1)``).
    By Jensen, -E_u log2 p_y(x + u) / D bounds the discrete model's -log2 P(x) / D (Theis et al.
    2016, Sec. 3.1).
    """
    lo, hi = check_data_range(data_range)
    if not (isinstance(dim, int | np.integer) and dim >= 1):
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
    return -jnp.asarray(log_prob) / (dim * math.log(2.0)) + 8.0 - math.log2(hi - lo)


def image_bits_per_dim(
    denoiser: Denoiser,
    images: ArrayLike,
    key: Array,
    *,
    data_range: Sequence[float] = (-1.0, 1.0),
    **ode_options,
) -> tuple[Array, Array]:
    """Per-example bits/dim of 8-bit images through the probability-flow ODE, and the NFE.

    What is reported (score_sde's convention, Song et al. 2021, Table 2): the dequantised
    continuous-density bound -log2 p(x + u)/D + 8 - log2(hi - lo) for one draw u ~ U[0, 1)^D per image
    (its expectation over u upper-bounds the discrete NLL in bits/dim), with log p from
    ``ode_log_likelihood`` at t0 (not the t = 0 density).

    Args:
      denoiser: the model, trained on data scaled to data_range.
      images: integer (uint8) pixels in [0, 255], dequantised here with ``key``; or floats already
        dequantised and scaled to data_range (e.g. ``diffusion.data.image_batch(dequantize=True)``).
      key: PRNG key; ``jax.random.split(key)`` gives the dequantisation key, then the probes' key.
      data_range: (-1, 1) or (0, 1), the range the model's data was scaled to.
      **ode_options: keyword options of ``ode_log_likelihood`` (divergence, rtol, ...).

    Returns:
      (bits_per_dim of shape (batch,), nfe).
    """
    check_data_range(data_range)
    images = jnp.asarray(images)
    key_dequantize, key_probes = jax.random.split(key)
    data = (
        dequantize(key_dequantize, images, data_range)
        if jnp.issubdtype(images.dtype, jnp.integer)
        else images
    )
    result = ode_log_likelihood(denoiser, data, key_probes, **ode_options)
    dim = math.prod(data.shape[1:])
    return bits_per_dim_from_log_prob(result.log_prob, dim, data_range), result.nfe
