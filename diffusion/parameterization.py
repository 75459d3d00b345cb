"""What a network predicts: eps, x0, score, v or the EDM-preconditioned F, all views of one denoiser.

Given x = alpha x0 + sigma eps at one (x, t), every prediction in use is a linear combination of the
pair (eps, x0), so a parameterization is one table entry: the two coefficients of its regression
target

    F* = eps_coef(alpha, sigma) eps + x0_coef(alpha, sigma) x0

(plus, for EDM, the scale of the network's input). Everything else is derived from the entry, once,
for all of them: with x = alpha x0 + sigma eps and F = eps_coef eps + x0_coef x0, the 2x2 system

    [x]   [alpha     sigma   ] [x0 ]          eps = (alpha F - x0_coef x) / det
    [F] = [x0_coef   eps_coef] [eps],   so    x0  = (eps_coef x - sigma F) / det,
                                              det = alpha eps_coef - sigma x0_coef,

and the factor with ||eps - eps_hat||^2 = c ||F - F*||^2 that losses need is c = (alpha / det)^2.

| name     | eps_coef               | x0_coef                   | source                            |
|----------|------------------------|---------------------------|-----------------------------------|
| eps      | 1                      | 0                         | Ho et al. 2020, eq. 11            |
| x0       | 0                      | 1                         | Ho et al. 2020, Sec. 3.2          |
| score    | -1 / sigma             | 0                         | Song et al. 2021, eq. 7           |
| v        | alpha                  | -sigma                    | Salimans & Ho 2022, App. D        |
| edm      | -sd / sqrt(s^2 + sd^2) | s / (sd sqrt(s^2 + sd^2)) | Karras et al. 2022, eq. 7, Tab. 1 |
| velocity | 1                      | -1                        | Lipman et al. 2022, eq. 23        |

with s = sigma_hat = sigma / alpha = exp(-lambda) and sd = sigma_data. The EDM row is their target
F* = (x0 - c_skip x_hat) / c_out with x_hat = x / alpha = x0 + s eps, and their network sees
c_in x_hat = x / sqrt(sigma^2 + alpha^2 sd^2) (``input_scale``); its c_noise is the time input
'quarter_log_sigma'. The velocity row is what flow-matching models predict: u = eps - x0, the time
derivative of the straight path x_t = (1 - t) x0 + t eps of the 'flow' process.

The network's time input is a second, independent table (``TIME_INPUTS``). ``Denoiser`` wraps a network
``apply_fn(params, x, t_input)`` with a process, a parameterization and a time input, and exposes the
eps / x0 / score views that losses and solvers consume.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import struct
from jax import Array
from jax.typing import ArrayLike

from diffusion.processes import Process
from diffusion.shapes import expand_to

__all__ = [
    "PARAMETERIZATIONS",
    "TIME_INPUTS",
    "Denoiser",
    "DenoiserViews",
    "Parameterization",
    "ReverseKernelDenoiser",
    "edm_preconditioning",
    "eps_error_factor",
    "eps_x0_from_prediction",
    "get_parameterization",
    "network_time",
    "prediction_from_eps_x0",
]

Coefficient = Array | float  # a Python 0 or 1 is kept static, so e.g. eps = F exactly for 'eps'


def edm_preconditioning(
    sigma_hat: ArrayLike, sigma_data: float
) -> tuple[Array, Array, Array, Array]:
    """c_skip, c_out, c_in, c_noise of Karras et al. 2022, Table 1 ("Ours"), at noise level sigma_hat.

    c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2),
    c_noise = ln(s) / 4, with s = sigma_hat and sd = sigma_data.
    """
    sigma_hat = jnp.asarray(sigma_hat)
    total = jnp.sqrt(sigma_hat**2 + sigma_data**2)
    c_skip = sigma_data**2 / total**2
    c_out = sigma_hat * sigma_data / total
    c_in = 1.0 / total
    c_noise = 0.25 * jnp.log(sigma_hat)
    return c_skip, c_out, c_in, c_noise


@dataclasses.dataclass(frozen=True)
class Parameterization:
    """One entry of the parameterization table (module docstring).

    ``coefficients(alpha, sigma, sigma_data) -> (eps_coef, x0_coef)`` of the regression target
    F* = eps_coef eps + x0_coef x0; ``input_scale(alpha, sigma, sigma_data)`` the factor the network's
    input x is multiplied by (None: 1). Coefficients that are the numbers 0 or 1 are used as such.
    """

    name: str
    coefficients: Callable[[Array, Array, float], tuple[Coefficient, Coefficient]]
    reference: str
    input_scale: Callable[[Array, Array, float], Array] | None = None


def _edm_coefficients(alpha: Array, sigma: Array, sigma_data: float) -> tuple[Array, Array]:
    # (x0 - c_skip (x0 + s eps)) / c_out with Table 1's c_skip, c_out, written out.
    sigma_hat = sigma / alpha
    total = jnp.sqrt(sigma_hat**2 + sigma_data**2)
    return -sigma_data / total, sigma_hat / (sigma_data * total)


PARAMETERIZATIONS: dict[str, Parameterization] = {
    entry.name: entry
    for entry in (
        Parameterization("eps", lambda alpha, sigma, sd: (1.0, 0.0), "Ho et al. 2020, eq. 11"),
        Parameterization("x0", lambda alpha, sigma, sd: (0.0, 1.0), "Ho et al. 2020, Sec. 3.2"),
        Parameterization(
            "score", lambda alpha, sigma, sd: (-1.0 / sigma, 0.0), "Song et al. 2021, eq. 7"
        ),
        Parameterization(
            "v", lambda alpha, sigma, sd: (alpha, -sigma), "Salimans & Ho 2022, Sec. 4, App. D"
        ),
        Parameterization(
            "edm",
            _edm_coefficients,
            "Karras et al. 2022, eq. 7-8 and Table 1",
            input_scale=lambda alpha, sigma, sd: 1.0 / jnp.sqrt(sigma**2 + (alpha * sd) ** 2),
        ),
        Parameterization(
            "velocity",
            lambda alpha, sigma, sd: (1.0, -1.0),
            "Lipman et al. 2022, eq. 23; Liu et al. 2022, eq. 1",
        ),
    )
}


def get_parameterization(name: str) -> Parameterization:
    """The table entry called ``name``; ValueError listing the accepted names otherwise."""
    if name not in PARAMETERIZATIONS:
        raise ValueError(
            f"unknown parameterization {name!r}; accepted: {', '.join(PARAMETERIZATIONS)}"
        )
    return PARAMETERIZATIONS[name]


def _is_zero(coefficient: Coefficient) -> bool:
    return isinstance(coefficient, int | float) and coefficient == 0


def _divide(value: Array, coefficient: Coefficient) -> Array:
    """value / coefficient, skipping a division by the number 1 (exact views of the prediction)."""
    if isinstance(coefficient, int | float) and coefficient == 1:
        return value
    return value / coefficient


def eps_x0_from_prediction(
    prediction: ArrayLike,
    parameterization: str,
    x: ArrayLike,
    alpha: ArrayLike,
    sigma: ArrayLike,
    sigma_data: float = 0.5,
) -> tuple[Array, Array]:
    """(eps, x0) implied by a network's ``prediction`` at x = alpha x0 + sigma eps.

    Solves the 2x2 system of the module docstring; alpha and sigma must broadcast against x (see
    ``diffusion.shapes.expand_to``). Where one coefficient is 0 the division by ``det`` is cancelled
    symbolically, so e.g. the 'eps' view of an eps-prediction is the prediction itself, and x0 at
    alpha = 0 is never needed for it.
    """
    eps_coef, x0_coef = get_parameterization(parameterization).coefficients(
        alpha, sigma, sigma_data
    )
    prediction, x = jnp.asarray(prediction), jnp.asarray(x)
    if _is_zero(x0_coef):  # F = eps_coef eps
        eps = _divide(prediction, eps_coef)
        return eps, (x - sigma * eps) / alpha
    if _is_zero(eps_coef):  # F = x0_coef x0
        x0 = _divide(prediction, x0_coef)
        return (x - alpha * x0) / sigma, x0
    det = alpha * eps_coef - sigma * x0_coef
    return (alpha * prediction - x0_coef * x) / det, (eps_coef * x - sigma * prediction) / det


def prediction_from_eps_x0(
    eps: ArrayLike,
    x0: ArrayLike,
    parameterization: str,
    alpha: ArrayLike,
    sigma: ArrayLike,
    sigma_data: float = 0.5,
) -> Array:
    """The regression target F* = eps_coef eps + x0_coef x0 of ``parameterization``: the inverse of
    ``eps_x0_from_prediction`` (e.g. v = alpha eps - sigma x0, Salimans & Ho 2022)."""
    eps_coef, x0_coef = get_parameterization(parameterization).coefficients(
        alpha, sigma, sigma_data
    )
    terms = [coef * value for coef, value in ((eps_coef, eps), (x0_coef, x0)) if not _is_zero(coef)]
    return jnp.asarray(sum(terms))


def eps_error_factor(
    parameterization: str, process: Process, t: ArrayLike, *, sigma_data: float = 0.5
) -> Array:
    """c(t) with ||eps - eps_hat||^2 = c(t) ||F - F*||^2 for the network output F and its target F*.

    At fixed (x, t) eps is affine in F with slope alpha / det (module docstring), so
    c = (alpha / det)^2: 1 for eps, SNR for x0, sigma^2 for score, alpha^2 / (alpha^2 + sigma^2)^2
    for v, sigma_data^2 / (sigma_hat^2 + sigma_data^2) for EDM, alpha^2 / (alpha + sigma)^2 for the
    velocity.
    """
    t = jnp.asarray(t)
    alpha, sigma = process.alpha(t), process.sigma(t)
    eps_coef, x0_coef = get_parameterization(parameterization).coefficients(
        alpha, sigma, sigma_data
    )
    if _is_zero(x0_coef):
        return jnp.broadcast_to(jnp.asarray(eps_coef, t.dtype) ** -2, t.shape)
    return (alpha / (alpha * eps_coef - sigma * x0_coef)) ** 2


# ============================================================================ the time-input table
TIME_INPUTS: dict[str, Callable[[Process, Array], Array]] = {
    # t itself.
    "t": lambda process, t: t,
    # 999 t: score_sde's DDPM++ for the continuous VP / sub-VP SDEs.
    "999t": lambda process, t: 999.0 * t,
    # The chain's index: DDPM step i - 1 (Ho et al. 2020), NCSN level (Song & Ermon 2019).
    "index": lambda process, t: process.network_index(t),
    # sigma_hat = sigma / alpha = exp(-lambda): NCSN / VE's noise level itself.
    "sigma": lambda process, t: jnp.exp(-process.log_snr(t)),
    # log sigma_hat: NCSN++'s Fourier-feature input (Song et al. 2021).
    "log_sigma": lambda process, t: -process.log_snr(t),
    # ln(sigma_hat) / 4: EDM's c_noise (Karras et al. 2022, Table 1).
    "quarter_log_sigma": lambda process, t: -0.25 * process.log_snr(t),
}


def network_time(process: Process, t: ArrayLike, time_input: str) -> Array:
    """The number a network is conditioned on at time t (``TIME_INPUTS``)."""
    if time_input not in TIME_INPUTS:
        raise ValueError(f"unknown time_input {time_input!r}; accepted: {', '.join(TIME_INPUTS)}")
    return TIME_INPUTS[time_input](process, jnp.asarray(t))


class DenoiserViews(abc.ABC):
    """The eps / x0 / score views of anything with a ``process`` and a ``predict(x, t) -> (eps, x0)``.

    Samplers, losses and likelihoods use only ``process``, ``predict``, ``eps``, ``x0`` and ``score``,
    so a wrapper that changes the predictions (guidance, inpainting) subclasses this, defines
    ``process`` and ``predict``, and works with every sampler unchanged. Each view costs one call of
    ``predict``.
    """

    process: Process

    @abc.abstractmethod
    def predict(self, x: ArrayLike, t: ArrayLike, **model_kwargs) -> tuple[Array, Array]:
        """(eps, x0) predictions at (x, t); t is a scalar or (batch,)."""

    def eps(self, x: ArrayLike, t: ArrayLike, **model_kwargs) -> Array:
        """Predicted noise eps(x, t)."""
        return self.predict(x, t, **model_kwargs)[0]

    def x0(self, x: ArrayLike, t: ArrayLike, **model_kwargs) -> Array:
        """Predicted clean data x0(x, t) = E[x_0 | x_t = x] for an optimal network (Tweedie)."""
        return self.predict(x, t, **model_kwargs)[1]

    def score(self, x: ArrayLike, t: ArrayLike, **model_kwargs) -> Array:
        """Predicted score grad_x log p_t(x) = -eps / sigma (Song et al. 2021)."""
        eps = self.eps(x, t, **model_kwargs)
        return -eps / expand_to(self.process.sigma(t), eps)


class ReverseKernelDenoiser(DenoiserViews):
    """A denoiser that also has its own reverse kernel p(x_s | x_t), e.g. a learned or analytic
    variance (``diffusion.variational.ReverseModel``); ancestral sampling with ``variance='model'``
    draws from it."""

    @abc.abstractmethod
    def reverse_step(
        self, x: ArrayLike, t: ArrayLike, s: ArrayLike, key: Array
    ) -> tuple[Array, Array]:
        """(x_s ~ p(x_s | x_t), x0_pred): one ancestral step, one network evaluation; the noise is
        ``jax.random.normal(key, x.shape, x.dtype)`` (the samplers' noise convention)."""


@struct.dataclass
class Denoiser(DenoiserViews):
    """A network seen as a denoiser: eps, x0 and score predictions at (x, t) for a given process.

    ``apply_fn(params, x_in, t_in, **model_kwargs)`` is the raw network (e.g. a Flax module's
    ``apply``); ``parameterization`` names its entry in ``PARAMETERIZATIONS``; ``time_input`` names
    how its time input is computed from t (``TIME_INPUTS``). A ``Denoiser`` is a pytree whose only
    leaves are ``params``, so it passes through ``jax.jit`` and ``lax.scan`` like any other argument;
    ``denoiser.replace(params=...)`` gives the same denoiser with other parameters.
    """

    params: Any
    apply_fn: Callable[..., Array] = struct.field(pytree_node=False)
    process: Process = struct.field(pytree_node=False)
    parameterization: str = struct.field(pytree_node=False, default="eps")
    time_input: str = struct.field(pytree_node=False, default="t")
    sigma_data: float = struct.field(pytree_node=False, default=0.5)

    def __post_init__(self):
        if not isinstance(self.process, Process):
            raise ValueError(f"process must be a diffusion.processes.Process, got {self.process!r}")
        get_parameterization(self.parameterization)
        if self.time_input not in TIME_INPUTS:
            raise ValueError(
                f"unknown time_input {self.time_input!r}; accepted: {', '.join(TIME_INPUTS)}"
            )
        if self.time_input == "index" and not self.process.is_discrete:
            raise ValueError(
                f"time_input='index' needs a discrete chain (DDPM or SMLD); "
                f"{type(self.process).__name__} has no index"
            )
        if not (isinstance(self.sigma_data, float | int) and math.isfinite(self.sigma_data)):
            raise ValueError(f"sigma_data must be a finite number, got {self.sigma_data!r}")
        if self.sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {self.sigma_data!r}")

    def network_output(self, x: ArrayLike, t: ArrayLike, **model_kwargs) -> Array:
        """The raw network output at (x, t) (one network evaluation)."""
        x = jnp.asarray(x)
        t = jnp.broadcast_to(jnp.asarray(t, dtype=x.dtype), x.shape[:1])
        input_scale = get_parameterization(self.parameterization).input_scale
        if input_scale is not None:
            scale = input_scale(self.process.alpha(t), self.process.sigma(t), self.sigma_data)
            x = expand_to(scale, x) * x
        t_in = network_time(self.process, t, self.time_input)
        return self.apply_fn(self.params, x, t_in, **model_kwargs)

    def predict(self, x: ArrayLike, t: ArrayLike, **model_kwargs) -> tuple[Array, Array]:
        """(eps, x0) predictions at (x, t): one network evaluation. t is a scalar or (batch,)."""
        x = jnp.asarray(x)
        output = self.network_output(x, t, **model_kwargs)
        alpha = expand_to(self.process.alpha(t), x)
        sigma = expand_to(self.process.sigma(t), x)
        return eps_x0_from_prediction(
            output, self.parameterization, x, alpha, sigma, self.sigma_data
        )
