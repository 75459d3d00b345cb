"""The model's reverse kernels p(x_s | x_t) = N(mean, variance) and the four reverse variances.

For a step t -> s (s < t) of any process the reverse mean is the posterior mean at the predicted
x_0, mean = coef_x0 x0_pred + coef_xt x_t (``Process.posterior``; Ho et al. 2020, eqs. 7 and 11). The
variance is one of (with beta = variance of q(x_t | x_s), beta-tilde = variance of q(x_s | x_t, x_0)):

* 'fixed_small': beta-tilde (Ho et al. 2020, Sec. 3.2; optimal for a point mass x_0);
* 'fixed_large': beta (Ho et al. 2020, Sec. 3.2; optimal for x_0 ~ N(0, I));
* 'learned': exp(v log beta + (1 - v) log beta-tilde) with v an extra network output per dimension
  (Nichol & Dhariwal 2021, eq. 15); see ``split_learned_variance_output``;
* 'analytic': beta-tilde + coef_x0^2 (sigma_t^2 / alpha_t^2)(1 - Gamma_t), Gamma_t = E||eps_pred||^2 / d
  (Bao et al. 2022, "Analytic-DPM", Thm. 1 with lambda_n^2 = beta-tilde_n): the KL-optimal variance
  of a Gaussian reverse kernel with this mean. The second term is coef_x0^2 times the mean
  posterior variance of x_0, E Var[x_0 | x_t] per dimension. Gamma_t is estimated once by Monte Carlo
  (``estimate_eps_sq_norm``) and cached; any step t -> s uses Gamma at t, so one table serves every
  sub-grid of the chain.

The last step, from the first chain state to the data (alpha = 1, sigma = 0), is the decoder
p(x_0 | x_{t_1}) with mean x0_pred (Ho et al. 2020, Sec. 3.3). Its beta-tilde is zero; like the
authors' code (Ho et al.'s diffusion_utils_2.py and Nichol & Dhariwal's gaussian_diffusion.py,
``posterior_log_variance_clipped``), 'fixed_small' and the lower end of 'learned' use the next step's
beta-tilde there. 'fixed_large' uses beta_1 = sigma_{t_1}^2 (Ho et al.'s sigma_1^2 = beta_1) and
'analytic' uses (sigma^2/alpha^2)(1 - Gamma) (Bao et al. 2022, Thm. 1 at n = 1, where coef_x0 = 1).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import Array
from jax.typing import ArrayLike

from diffusion.parameterization import (
    Denoiser,
    DenoiserViews,
    ReverseKernelDenoiser,
    eps_x0_from_prediction,
)
from diffusion.processes import Process
from diffusion.shapes import expand_to

__all__ = [
    "CHAIN_FREE_VARIANCES",
    "VARIANCES",
    "ReverseModel",
    "analytic_variance",
    "check_eps_sq_norm_table",
    "data_step_log_variances",
    "estimate_eps_sq_norm",
    "expected_x0_variance",
    "split_learned_variance_output",
    "step_log_variances",
]

VARIANCES = ("fixed_small", "fixed_large", "learned", "analytic")
# Variances whose decoder (last step to the data) needs no next chain time.
CHAIN_FREE_VARIANCES = ("fixed_large", "analytic")


def _check_variance(name: str, value: str, accepted: tuple[str, ...] = VARIANCES) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")


# ================================================================================ learned output
def split_learned_variance_output(output: ArrayLike) -> tuple[Array, Array]:
    """(prediction, v) from a network output of 2C channels on its last axis.

    The first C channels are the prediction in the denoiser's parameterization (eps, x0, v, ...),
    the last C the variance interpolation: v = (raw + 1) / 2, the map of Nichol & Dhariwal's code
    (``frac = (model_var_values + 1) / 2``), so that a zero-initialised output layer starts at the
    geometric mean of beta and beta-tilde. v is not clipped: eq. 15 of Nichol & Dhariwal 2021 leaves
    it unconstrained.
    """
    output = jnp.asarray(output)
    channels = output.shape[-1]
    if channels % 2:
        raise ValueError(
            f"a learned-variance network outputs 2C channels (prediction and v); its last axis "
            f"has {channels}"
        )
    prediction, raw = jnp.split(output, 2, axis=-1)
    return prediction, 0.5 * (raw + 1.0)


# ================================================================================ step variances
def step_log_variances(process: Process, s: ArrayLike, t: ArrayLike) -> tuple[Array, Array]:
    """(log beta, log beta-tilde) of the step t -> s: log variances of q(x_t | x_s), q(x_s | x_t, x_0).

    For DDPM's consecutive chain times these are log beta_t and log of Ho et al.'s eq. 7 variance.
    """
    _, transition_std = process.transition(s, t)
    _, _, posterior_std = process.posterior(s, t)
    return 2.0 * jnp.log(transition_std), 2.0 * jnp.log(posterior_std)


def data_step_log_variances(
    process: Process, t: ArrayLike, t_next: ArrayLike
) -> tuple[Array, Array]:
    """(log beta, clipped log beta-tilde) of the decoder step from t (the first chain state) to the data.

    beta = sigma_t^2, the variance of q(x_t | x_0); beta-tilde (zero) is replaced by that of the next
    step t_next -> t (the authors' ``posterior_log_variance_clipped``).
    """
    log_beta = 2.0 * process.log_sigma(t)
    _, log_beta_tilde_next = step_log_variances(process, t, t_next)
    return log_beta, log_beta_tilde_next


# ================================================================================ analytic variance
def expected_x0_variance(
    process: Process,
    t: ArrayLike,
    eps_sq_norm: ArrayLike,
    max_x0_variance: float | None = None,
) -> Array:
    """E Var[x_0 | x_t] per dimension from Gamma_t = E||eps_pred(x_t, t)||^2 / d.

    (sigma_t^2 / alpha_t^2)(1 - Gamma_t) (Bao et al. 2022, Thm. 1: eps = E[eps | x_t] gives
    E||eps - E[eps|x_t]||^2 / d = 1 - Gamma_t, and x_0 = (x_t - sigma eps)/alpha). 1 - Gamma is clipped to
    [0, 1], the range it has for any data (Bao et al. 2022, Thm. 2); ``max_x0_variance`` optionally
    caps the result, e.g. ((hi - lo)/2)^2 for data in [lo, hi] (Thm. 2's bounded-data bound).
    """
    unexplained = jnp.clip(1.0 - jnp.asarray(eps_sq_norm), 0.0, 1.0)
    variance = jnp.exp(-2.0 * process.log_snr(t)) * unexplained
    if max_x0_variance is not None:
        variance = jnp.minimum(variance, max_x0_variance)
    return variance


def analytic_variance(
    process: Process,
    s: ArrayLike,
    t: ArrayLike,
    eps_sq_norm: ArrayLike,
    max_x0_variance: float | None = None,
) -> Array:
    """The optimal reverse variance of the step t -> s (Bao et al. 2022, Thm. 1, lambda^2 = beta-tilde).

    beta-tilde + coef_x0^2 E Var[x_0 | x_t]: the variance of the Gaussian p(x_s | x_t) with the posterior
    mean at x0_pred that minimises the KL to q(x_s | x_t) (law of total variance).
    """
    coef_x0, _, posterior_std = process.posterior(s, t)
    return posterior_std**2 + coef_x0**2 * expected_x0_variance(
        process, t, eps_sq_norm, max_x0_variance
    )


def estimate_eps_sq_norm(
    denoiser: DenoiserViews, x0: ArrayLike, key: Array, times: ArrayLike, **model_kwargs
) -> Array:
    """Gamma_t = E ||eps_pred(x_t, t)||^2 / d at each of ``times``, by Monte Carlo over the batch x0.

    One x_t ~ q(x_t | x_0) per example and time (Bao et al. 2022, eq. 8: M samples of the training
    data, here the batch). Returns the (len(times),) batch means; for more samples average the results
    of several batches of equal size. Each time is one network evaluation of the batch.
    """
    x0 = jnp.asarray(x0)
    times = jnp.asarray(times)
    keys = jax.random.split(key, times.shape[0])

    def at_time(args):
        t, time_key = args
        x_t, _ = denoiser.process.sample_marginal(time_key, x0, jnp.full(x0.shape[:1], t))
        eps_pred = denoiser.eps(x_t, jnp.full(x0.shape[:1], t), **model_kwargs)
        return jnp.mean(eps_pred**2)

    return jax.lax.map(at_time, (times, keys))


# ================================================================================ the reverse model
@struct.dataclass
class ReverseModel(ReverseKernelDenoiser):
    """A denoiser with a reverse variance: the Gaussian kernels p(x_s | x_t) of ancestral sampling.

    Attributes:
      denoiser: the network as a ``Denoiser``; with ``variance='learned'`` its network outputs 2C
        channels (``split_learned_variance_output``).
      variance: one of VARIANCES (module docstring), for the steps between chain states.
      decoder_variance: the variance of the last step to the data (the decoder), one of VARIANCES
        (same as ``variance`` if None).
      eps_sq_norm: Gamma_t at ``eps_sq_norm_times`` (increasing), needed by 'analytic' (from
        ``estimate_eps_sq_norm``, cached with the checkpoint); linearly interpolated in t.
      max_x0_variance: optional cap on E Var[x_0 | x_t] for 'analytic' (``expected_x0_variance``).
      outputs_variance: the network outputs the 2C channels of a learned-variance model (implied by
        variance='learned'); set it to evaluate such a network with another variance rule.

    It is a ``DenoiserViews``: ``predict`` gives (eps, x0) from the first C channels of a
    learned-variance network, so every sampler accepts it. A pytree whose leaves are the denoiser's
    params and the Gamma table.
    """

    denoiser: Denoiser
    variance: str = struct.field(pytree_node=False, default="fixed_small")
    decoder_variance: str | None = struct.field(pytree_node=False, default=None)
    eps_sq_norm: Any = None
    eps_sq_norm_times: Any = None
    max_x0_variance: float | None = struct.field(pytree_node=False, default=None)
    outputs_variance: bool = struct.field(pytree_node=False, default=False)

    def __post_init__(self):
        _check_variance("variance", self.variance)
        if self.decoder_variance is not None:
            _check_variance("decoder_variance", self.decoder_variance)
        uses = {self.variance, self.decoder_variance_rule}
        if "learned" in uses and self.variance != "learned":
            raise ValueError(
                "decoder_variance='learned' needs variance='learned' (the network's v output)"
            )
        if "analytic" in uses and (self.eps_sq_norm is None or self.eps_sq_norm_times is None):
            raise ValueError(
                "the 'analytic' variance needs eps_sq_norm and eps_sq_norm_times "
                "(Gamma_t from estimate_eps_sq_norm)"
            )
        if "analytic" in uses and _is_concrete(self.eps_sq_norm, self.eps_sq_norm_times):
            check_eps_sq_norm_table(self.eps_sq_norm, self.eps_sq_norm_times)

    # ------------------------------------------------------------------ views
    @property
    def process(self) -> Process:
        return self.denoiser.process

    @property
    def decoder_variance_rule(self) -> str:
        """The variance rule of the decoder step."""
        return self.variance if self.decoder_variance is None else self.decoder_variance

    def predict_with_interpolation(
        self, x: ArrayLike, t: ArrayLike, **model_kwargs
    ) -> tuple[Array, Array, Array | None]:
        """(eps, x0, v) at (x, t) from one network evaluation; v is None unless the network outputs
        it (``outputs_variance`` or variance='learned')."""
        if not (self.outputs_variance or self.variance == "learned"):
            eps, x0 = self.denoiser.predict(x, t, **model_kwargs)
            return eps, x0, None
        x = jnp.asarray(x)
        prediction, interpolation = split_learned_variance_output(
            self.denoiser.network_output(x, t, **model_kwargs)
        )
        alpha = expand_to(self.process.alpha(t), x)
        sigma = expand_to(self.process.sigma(t), x)
        eps, x0 = eps_x0_from_prediction(
            prediction, self.denoiser.parameterization, x, alpha, sigma, self.denoiser.sigma_data
        )
        return eps, x0, interpolation

    def predict(self, x: ArrayLike, t: ArrayLike, **model_kwargs) -> tuple[Array, Array]:
        """(eps, x0) predictions at (x, t): one network evaluation."""
        return self.predict_with_interpolation(x, t, **model_kwargs)[:2]

    def eps_sq_norm_at(self, t: ArrayLike) -> Array:
        """Gamma_t, linear in t between the table's times (exact at them)."""
        return jnp.interp(jnp.asarray(t), self.eps_sq_norm_times, self.eps_sq_norm)

    # ------------------------------------------------------------------ variances
    def _combine(self, rule: str, log_beta: Array, log_beta_tilde: Array, interpolation, t, extra):
        if rule == "fixed_small":
            return log_beta_tilde
        if rule == "fixed_large":
            return log_beta
        if rule == "learned":
            # Nichol & Dhariwal 2021, eq. 15: exp(v log beta + (1 - v) log beta-tilde), per dimension.
            log_beta = expand_to(log_beta, interpolation)
            log_beta_tilde = expand_to(log_beta_tilde, interpolation)
            return interpolation * log_beta + (1.0 - interpolation) * log_beta_tilde
        return jnp.log(extra(self.eps_sq_norm_at(t)))  # analytic

    def step_log_variance(
        self, t: ArrayLike, s: ArrayLike, interpolation: Array | None = None
    ) -> Array:
        """log variance of p(x_s | x_t) for chain times s < t (per example, or per dimension if learned)."""
        log_beta, log_beta_tilde = step_log_variances(self.process, s, t)
        return self._combine(
            self.variance,
            log_beta,
            log_beta_tilde,
            interpolation,
            t,
            lambda gamma: analytic_variance(self.process, s, t, gamma, self.max_x0_variance),
        )

    def decoder_log_variance(
        self, t: ArrayLike, t_next: ArrayLike | None = None, interpolation: Array | None = None
    ) -> Array:
        """log variance of the decoder p(x_0 | x_t) from the first chain time t (module docstring).

        'fixed_small' and 'learned' need ``t_next``, the next chain time (for the clipped beta-tilde).
        """
        rule = self.decoder_variance_rule
        if rule in ("fixed_small", "learned") and t_next is None:
            raise ValueError(
                f"the decoder variance {rule!r} uses the next chain time's beta-tilde; give t_next "
                f"or use one of {', '.join(CHAIN_FREE_VARIANCES)}"
            )
        if t_next is None:
            log_beta = 2.0 * self.process.log_sigma(t)
            log_beta_tilde = jnp.full_like(log_beta, -jnp.inf)  # unused by the chain-free rules
        else:
            log_beta, log_beta_tilde = data_step_log_variances(self.process, t, t_next)
        return self._combine(
            rule,
            log_beta,
            log_beta_tilde,
            interpolation,
            t,
            lambda gamma: expected_x0_variance(self.process, t, gamma, self.max_x0_variance),
        )

    # ------------------------------------------------------------------ kernels
    def step_moments(
        self, x0_pred: Array, interpolation: Array | None, x: Array, t: ArrayLike, s: ArrayLike
    ) -> tuple[Array, Array]:
        """(mean, log variance) of p(x_s | x_t) given the predictions at (x, t); both broadcast to x."""
        coef_x0, coef_xt, _ = self.process.posterior(s, t)
        mean = expand_to(coef_x0, x) * x0_pred + expand_to(coef_xt, x) * x
        log_var = self.step_log_variance(t, s, interpolation)
        return mean, (log_var if self.variance == "learned" else expand_to(log_var, x))

    def reverse_moments(
        self, x: ArrayLike, t: ArrayLike, s: ArrayLike, **model_kwargs
    ) -> tuple[Array, Array]:
        """(mean, log variance) of p(x_s | x_t): one network evaluation."""
        x = jnp.asarray(x)
        _, x0_pred, interpolation = self.predict_with_interpolation(x, t, **model_kwargs)
        return self.step_moments(x0_pred, interpolation, x, t, s)

    def reverse_step(
        self, x: ArrayLike, t: ArrayLike, s: ArrayLike, key: Array, **model_kwargs
    ) -> tuple[Array, Array]:
        """(x_s ~ p(x_s | x_t) = N(mean, variance), x0_pred): one ancestral step, one network
        evaluation."""
        x = jnp.asarray(x)
        _, x0_pred, interpolation = self.predict_with_interpolation(x, t, **model_kwargs)
        mean, log_var = self.step_moments(x0_pred, interpolation, x, t, s)
        noise = jax.random.normal(key, x.shape, x.dtype)  # the samplers' noise convention
        return (mean + jnp.exp(0.5 * log_var) * noise).astype(x.dtype), x0_pred


def _is_concrete(*arrays) -> bool:
    """Whether every array holds values (not a tracer or a placeholder of a tree transformation)."""
    return all(
        isinstance(a, np.ndarray | jax.Array) and not isinstance(a, jax.core.Tracer) for a in arrays
    )


def check_eps_sq_norm_table(eps_sq_norm: ArrayLike, times: ArrayLike) -> None:
    """ValueError unless a Gamma table is finite, 1-D, as long as its increasing times."""
    eps_sq_norm, times = np.asarray(eps_sq_norm), np.asarray(times)
    if eps_sq_norm.ndim != 1 or eps_sq_norm.shape != times.shape:
        raise ValueError(
            f"eps_sq_norm {eps_sq_norm.shape} and its times {times.shape} must be 1-D of one length"
        )
    if not (np.all(np.isfinite(eps_sq_norm)) and np.all(np.diff(times) > 0)):
        raise ValueError("eps_sq_norm must be finite and its times strictly increasing")
