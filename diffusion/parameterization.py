"""What a network predicts: eps, x0, score, v or the EDM-preconditioned F, all views of one denoiser.

Given x = alpha x0 + sigma eps at one (x, t), the predictions are affine in one another:

    x0 = (x - sigma eps) / alpha,   score = -eps / sigma,   v = alpha eps - sigma x0

(Ho et al. 2020, eq. 11; Song et al. 2021; Salimans & Ho 2022, "Progressive distillation", Sec. 4 and
App. D for v). The EDM parameterization (Karras et al. 2022, eq. 7 and Table 1) writes the denoiser of
x_hat = x / alpha, whose noise level is sigma_hat = sigma / alpha = exp(-lambda), as
D = c_skip x_hat + c_out F(c_in x_hat, c_noise).

``Denoiser`` wraps a network ``apply_fn(params, x, t_input)`` with a process, a parameterization and
the way the network's time input is computed from t, and exposes eps / x0 / score predictions. Losses
and solvers consume those views only.
"""

from __future__ import annotations

import abc
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
    "edm_preconditioning",
    "eps_x0_from_prediction",
    "network_time",
    "prediction_from_eps_x0",
]

PARAMETERIZATIONS = ("eps", "x0", "score", "v", "edm")
TIME_INPUTS = ("t", "999t", "index", "sigma", "log_sigma", "quarter_log_sigma")


def _check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"unknown parameterization {parameterization!r}; accepted: {', '.join(PARAMETERIZATIONS)}"
        )


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


def eps_x0_from_prediction(
    prediction: ArrayLike,
    parameterization: str,
    x: ArrayLike,
    alpha: ArrayLike,
    sigma: ArrayLike,
    sigma_data: float = 0.5,
) -> tuple[Array, Array]:
    """(eps, x0) implied by a network's ``prediction`` at x = alpha x0 + sigma eps.

    alpha and sigma must broadcast against x (see ``diffusion.shapes.expand_to``). Each view is
    computed from the prediction by its most direct formula (no round trip through another view).
    """
    _check_parameterization(parameterization)
    x = jnp.asarray(x)
    if parameterization == "eps":
        eps = prediction
        return eps, (x - sigma * eps) / alpha
    if parameterization == "x0":
        x0 = prediction
        return (x - alpha * x0) / sigma, x0
    if parameterization == "score":
        # score = -eps / sigma (Song et al. 2021, eq. 7 with the Gaussian kernel's score).
        eps = -sigma * prediction
        return eps, (x + sigma**2 * prediction) / alpha
    if parameterization == "v":
        # Invert [x; v] = [[alpha, sigma], [-sigma, alpha]] [x0; eps]; det = alpha^2 + sigma^2.
        det = alpha**2 + sigma**2
        return (sigma * x + alpha * prediction) / det, (alpha * x - sigma * prediction) / det
    # EDM: x0 = D(x_hat) = c_skip x_hat + c_out F (Karras et al. 2022, eq. 7), x_hat = x / alpha.
    c_skip, c_out, _, _ = edm_preconditioning(sigma / alpha, sigma_data)
    x0 = c_skip * (x / alpha) + c_out * prediction
    return (x - alpha * x0) / sigma, x0


def prediction_from_eps_x0(
    eps: ArrayLike,
    x0: ArrayLike,
    parameterization: str,
    x: ArrayLike,
    alpha: ArrayLike,
    sigma: ArrayLike,
    sigma_data: float = 0.5,
) -> Array:
    """The network output that ``parameterization`` assigns to the pair (eps, x0): a regression target.

    The inverse of ``eps_x0_from_prediction``: e.g. v = alpha eps - sigma x0 (Salimans & Ho 2022) and
    the EDM target F = (x0 - c_skip x_hat) / c_out (Karras et al. 2022, eq. 8).
    """
    _check_parameterization(parameterization)
    if parameterization == "eps":
        return jnp.asarray(eps)
    if parameterization == "x0":
        return jnp.asarray(x0)
    if parameterization == "score":
        return -jnp.asarray(eps) / sigma
    if parameterization == "v":
        return alpha * eps - sigma * x0
    c_skip, c_out, _, _ = edm_preconditioning(sigma / alpha, sigma_data)
    return (x0 - c_skip * (jnp.asarray(x) / alpha)) / c_out


def network_time(process: Process, t: ArrayLike, time_input: str) -> Array:
    """The number a network is conditioned on at time t, as each literature does it.

    't': t itself; '999t': 999 t (score_sde's DDPM++ for continuous VP / sub-VP); 'index': the
    discrete chain's index (DDPM step i - 1, Ho et al. 2020; NCSN level, Song & Ermon 2019); 'sigma':
    sigma_hat = sigma / alpha (NCSN / VE: the noise level itself); 'log_sigma': log sigma_hat (NCSN++'s
    Fourier-feature input); 'quarter_log_sigma': ln(sigma_hat) / 4 (EDM's c_noise, Karras et al. 2022).
    """
    if time_input == "t":
        return jnp.asarray(t)
    if time_input == "999t":
        return 999.0 * jnp.asarray(t)
    if time_input == "index":
        return process.network_index(t)
    log_sigma_hat = -process.log_snr(t)
    if time_input == "sigma":
        return jnp.exp(log_sigma_hat)
    if time_input == "log_sigma":
        return log_sigma_hat
    if time_input == "quarter_log_sigma":
        return 0.25 * log_sigma_hat
    raise ValueError(f"unknown time_input {time_input!r}; accepted: {', '.join(TIME_INPUTS)}")


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


@struct.dataclass
class Denoiser(DenoiserViews):
    """A network seen as a denoiser: eps, x0 and score predictions at (x, t) for a given process.

    ``apply_fn(params, x_in, t_in, **model_kwargs)`` is the raw network (e.g. a Flax module's
    ``apply``); ``parameterization`` names what it predicts; ``time_input`` names how its time input
    is computed from t (see ``network_time``). A ``Denoiser`` is a pytree whose only leaves are
    ``params``, so it can be passed through ``jax.jit`` and ``lax.scan`` like any other argument.
    With parameterization 'edm' the network sees c_in x_hat (Karras et al. 2022, eq. 7); otherwise it
    sees x itself.
    """

    params: Any
    apply_fn: Callable[..., Array] = struct.field(pytree_node=False)
    process: Process = struct.field(pytree_node=False)
    parameterization: str = struct.field(pytree_node=False, default="eps")
    time_input: str = struct.field(pytree_node=False, default="t")
    sigma_data: float = struct.field(pytree_node=False, default=0.5)

    def __post_init__(self):
        _check_parameterization(self.parameterization)
        if self.time_input not in TIME_INPUTS:
            raise ValueError(
                f"unknown time_input {self.time_input!r}; accepted: {', '.join(TIME_INPUTS)}"
            )
        if self.time_input == "index" and not hasattr(self.process, "network_index"):
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
        if self.parameterization == "edm":
            alpha, sigma = self.process.alpha(t), self.process.sigma(t)
            _, _, c_in, c_noise = edm_preconditioning(sigma / alpha, self.sigma_data)
            x_in = expand_to(c_in / alpha, x) * x
            return self.apply_fn(self.params, x_in, c_noise, **model_kwargs)
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
