"""The variational bound of a diffusion model, in discrete time and in continuous time.

Discrete time (Sohl-Dickstein et al. 2015; Ho et al. 2020, eq. 5). For chain states at increasing
times t_1 < ... < t_K of any process (DDPM's ``chain_times``, SMLD's, or any grid of a continuous
process) and the data x_0 (alpha = 1, sigma = 0),

    -log p(x_0) <= L = L_prior + sum_{k=2}^{K} L_{k-1} + L_0,
    L_prior = KL(q(x_{t_K} | x_0) || N(0, prior_std^2 I)),
    L_{k-1} = E_{q(x_{t_k} | x_0)} KL(q(x_{t_{k-1}} | x_{t_k}, x_0) || p(x_{t_{k-1}} | x_{t_k})),
    L_0     = -E_{q(x_{t_1} | x_0)} log p(x_0 | x_{t_1}),

with the model's Gaussian reverse kernels p of ``ReverseModel`` and, for L_0, Ho et al.'s
discretised Gaussian decoder (8-bit data, their Sec. 3.3) or a Gaussian decoder (continuous data).
Each KL is in closed form; the expectation over x_{t_k} is one draw per term. Term k (0-based, ``index``)
is L_0 for k = 0 and L_k (the step t_{k+1} -> t_k) for k >= 1: it uses the state at ``times[k]``.

Where it is defined. Any chain whose forward kernels are Gaussian and whose reverse kernels are
Gaussian: DDPM (Ho et al. 2020) and SMLD's chain x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z
(Song et al. 2021, eq. 8, with sigma_0 = 0 for the data) with the ancestral reverse kernels of Song et
al. 2021 (eq. 47, 'fixed_small' here). It bounds the likelihood of that ancestral model, not of
annealed Langevin sampling (Song & Ermon 2019), whose kernel has no tractable density. For SMLD the
prior term KL(N(x_0, sigma_max^2 I) || N(0, sigma_max^2 I)) = ||x_0||^2 / (2 sigma_max^2) is small only
when sigma_max is large against the data (Song & Ermon 2020, technique 1).

Continuous time (Kingma et al. 2021, "Variational Diffusion Models", eqs. 11-17). As K -> infinity
with the 'fixed_small' kernels the diffusion terms tend to

    L_diffusion = 1/2 int_{t_min}^{T} -d log SNR/dt E ||eps - eps_hat(x_t, t)||^2 dt,

their eq. 17 with ||x - x_hat||^2 SNR = ||eps - eps_hat||^2. In the DenoisingLoss convention (a weight
w(t) on the summed eps-MSE, no factor 1/2) this is the 'likelihood' weighting w = -2 dlambda/dt =
g^2 / sigma^2 (Song, Durkan et al. 2021, Thm. 1), and L_diffusion = (T - t_min)/2 times the
DenoisingLoss(weighting='likelihood', reduction='sum', time_sampling='uniform') value.

Importance sampling over the discrete terms (Nichol & Dhariwal 2021, Sec. 3.3): L = L_prior +
E_{k ~ p}[L_k / p_k], unbiased for any p > 0, with p_k proportional to sqrt(E[L_k^2]) estimated from a
history of the last 10 values of each term (``TermHistory``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import Array
from jax.typing import ArrayLike

from diffusion.likelihood import bits_per_dim_from_log_prob
from diffusion.losses import eps_loss_weight, sample_time
from diffusion.parameterization import Denoiser, DenoiserViews, eps_x0_from_prediction
from diffusion.processes import Process
from diffusion.shapes import expand_to, sum_except_batch
from diffusion.variational.gaussian import (
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    normal_kl,
)
from diffusion.variational.reverse import (
    CHAIN_FREE_VARIANCES,
    ReverseModel,
    split_learned_variance_output,
)

__all__ = [
    "CONTINUOUS_TIME_SAMPLINGS",
    "DECODERS",
    "ContinuousVLBEstimate",
    "HybridLoss",
    "TermHistory",
    "VLBEstimate",
    "continuous_diffusion_integrand",
    "continuous_vlb",
    "decoder_nll",
    "discrete_vlb",
    "init_term_history",
    "prior_kl",
    "second_moment_probabilities",
    "term_probabilities",
    "update_term_history",
    "vlb_bits_per_dim",
    "vlb_chain_times",
    "vlb_term",
]

DECODERS = ("discretized_gaussian", "gaussian")
CONTINUOUS_TIME_SAMPLINGS = ("uniform", "importance")


def _check_choice(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")


# ================================================================================ the chain
def vlb_chain_times(process: Process, times: ArrayLike | None = None) -> np.ndarray:
    """The increasing chain times t_1 < ... < t_K of the bound: ``process.chain_times`` by default.

    A continuous process has no chain: give ``times`` (any increasing grid in [t_min, T], e.g. K
    uniform steps as in Kingma et al. 2021's discrete-time model).
    """
    if times is None:
        if not process.is_discrete:
            raise ValueError(
                f"{type(process).__name__} is a continuous process; give the chain's times "
                "explicitly"
            )
        times = process.chain_times
    times = np.asarray(times, dtype=np.float64)
    if times.ndim != 1 or times.size < 1 or not np.all(np.diff(times) > 0):
        raise ValueError(f"chain times must be a non-empty increasing 1-D array, got {times}")
    process.check_times(times[0], times[-1])
    return times


def _check_decoder(model: ReverseModel, decoder: str, num_states: int) -> None:
    _check_choice("decoder", decoder, DECODERS)
    if not isinstance(model, ReverseModel):
        raise ValueError(
            f"the bound needs a ReverseModel (a denoiser and its variance), got {model!r}"
        )
    rule = model.decoder_variance_rule
    if num_states < 2 and rule not in CHAIN_FREE_VARIANCES:
        raise ValueError(
            f"a chain of one state has no next time for the decoder variance {rule!r}; "
            f"use decoder_variance in {CHAIN_FREE_VARIANCES}"
        )


# ================================================================================ terms
def prior_kl(process: Process, x0: ArrayLike, t: ArrayLike | None = None) -> Array:
    """KL(q(x_t | x_0) || N(0, prior_std^2 I)) per example (nats), at t = T by default (L_T)."""
    x0 = jnp.asarray(x0)
    t = process.T if t is None else t
    mean, _ = process.marginal(x0, t)
    prior_log_var = 2.0 * math.log(process.prior_std)
    return sum_except_batch(
        normal_kl(mean, 2.0 * process.log_sigma(t), 0.0, prior_log_var) * jnp.ones_like(x0)
    )


def decoder_nll(decoder: str, x0: ArrayLike, mean: ArrayLike, log_var: ArrayLike) -> Array:
    """-log p(x_0 | x_1) per example (nats): 'discretized_gaussian' (Ho et al. 2020, eq. 13; x_0 on
    the 8-bit grid of [-1, 1]) or 'gaussian' (a density, for continuous data)."""
    _check_choice("decoder", decoder, DECODERS)
    log_likelihood = (
        discretized_gaussian_log_likelihood
        if decoder == "discretized_gaussian"
        else gaussian_log_likelihood
    )
    x0 = jnp.asarray(x0)
    return -sum_except_batch(log_likelihood(x0, mean, log_var) * jnp.ones_like(x0))


def _term_from_prediction(
    model: ReverseModel,
    x0: Array,
    x_t: Array,
    x0_pred: Array,
    interpolation: Array | None,
    index: Array,
    times: Array,
    decoder: str,
) -> Array:
    """Term ``index`` (B,) of the bound given the predictions at (x_t, times[index]) (nats, (B,)).

    Both branches are computed from finite arguments and the one not wanted is discarded: the KL branch
    at index 0 is evaluated on the step t_2 -> t_1, the decoder branch always at t_1.
    """
    process = model.process
    num_states = times.shape[0]
    t_next = times[1] if num_states > 1 else None
    log_var = model.decoder_log_variance(times[0], t_next, interpolation)
    reconstruction = decoder_nll(decoder, x0, x0_pred, expand_to(log_var, x0))
    if num_states == 1:
        return reconstruction
    s_step = times[jnp.maximum(index - 1, 0)]
    t_step = times[jnp.maximum(index, 1)]
    coef_x0, coef_xt, posterior_std = process.posterior(s_step, t_step)
    posterior_mean = expand_to(coef_x0, x0) * x0 + expand_to(coef_xt, x0) * x_t
    model_mean, model_log_var = model.step_moments(x0_pred, interpolation, x_t, t_step, s_step)
    kl = sum_except_batch(
        normal_kl(
            posterior_mean, expand_to(2.0 * jnp.log(posterior_std), x0), model_mean, model_log_var
        )
        * jnp.ones_like(x0)
    )
    return jnp.where(index == 0, reconstruction, kl)


def vlb_term(
    model: ReverseModel,
    x0: ArrayLike,
    eps: ArrayLike,
    index: ArrayLike,
    times: ArrayLike,
    *,
    decoder: str = "discretized_gaussian",
    **model_kwargs,
) -> Array:
    """Term ``index`` of the bound (module docstring) at x_{t} = alpha_t x_0 + sigma_t eps, t = times[index].

    ``index`` is a scalar or (B,) ints in [0, K): 0 is the decoder term L_0, k >= 1 the KL of the step
    times[k] -> times[k - 1]. ``eps`` is the noise of that state, so that the expectation over it can be
    taken by any rule (Monte Carlo, quadrature). Returns (B,) nats; one network evaluation.
    """
    x0, eps, times = jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(times)
    index = jnp.broadcast_to(jnp.asarray(index), x0.shape[:1])
    t = times[index]
    mean, std = model.process.marginal(x0, t)
    x_t = mean + expand_to(std, x0) * eps
    _, x0_pred, interpolation = model.predict_with_interpolation(x_t, t, **model_kwargs)
    return _term_from_prediction(model, x0, x_t, x0_pred, interpolation, index, times, decoder)


# ================================================================================ the discrete bound
@struct.dataclass
class VLBEstimate:
    """A per-example estimate of the discrete bound (nats).

    total = prior + sum of ``terms`` (all terms) or prior + mean of terms / p (importance sampling).
    ``terms`` (B, n) are the evaluated L_k and ``indices`` (B, n) their k; ``num_terms_evaluated`` = n
    is the number of network evaluations per example.
    """

    total: Array
    prior: Array
    terms: Array
    indices: Array
    num_terms_evaluated: int = struct.field(pytree_node=False)


def discrete_vlb(
    model: ReverseModel,
    x0: ArrayLike,
    key: Array,
    *,
    times: ArrayLike | None = None,
    decoder: str = "discretized_gaussian",
    num_terms: int | None = None,
    probabilities: ArrayLike | None = None,
    **model_kwargs,
) -> VLBEstimate:
    """The discrete bound L (module docstring) per example: all K terms, or an unbiased estimate.

    With ``num_terms=None`` every term is evaluated once (K network evaluations per example, one noise
    draw per term). With ``num_terms=n``, n term indices per example are drawn from ``probabilities``
    (uniform if None; e.g. ``term_probabilities(history)``) and L = L_prior + mean_j L_{k_j} / p_{k_j}
    (Nichol & Dhariwal 2021, Sec. 3.3), unbiased for every p > 0.
    """
    chain = vlb_chain_times(model.process, times)
    num_states = chain.size
    _check_decoder(model, decoder, num_states)
    if num_terms is not None and not (isinstance(num_terms, int) and num_terms >= 1):
        raise ValueError(f"num_terms must be None (all terms) or an int >= 1, got {num_terms!r}")
    if probabilities is not None:
        if num_terms is None:
            raise ValueError("probabilities are for an importance-sampled estimate: give num_terms")
        probabilities = jnp.asarray(probabilities)
        if probabilities.shape != (num_states,):
            raise ValueError(
                f"probabilities must have one entry per term ({num_states}), got "
                f"{probabilities.shape}"
            )
    x0 = jnp.asarray(x0)
    batch = x0.shape[0]
    times = jnp.asarray(chain, dtype=x0.dtype)
    prior = prior_kl(model.process, x0, times[-1])

    def evaluate(args):
        index, noise_key = args
        eps = jax.random.normal(noise_key, x0.shape, x0.dtype)
        return vlb_term(model, x0, eps, index, times, decoder=decoder, **model_kwargs)

    if num_terms is None:
        indices = jnp.broadcast_to(jnp.arange(num_states)[:, None], (num_states, batch))
        keys = jax.random.split(key, num_states)
        terms = jax.lax.map(evaluate, (indices, keys)).T  # (B, K)
        return VLBEstimate(prior + terms.sum(axis=1), prior, terms, indices.T, num_states)
    key_index, key_noise = jax.random.split(key)
    log_p = (
        jnp.full((num_states,), -math.log(num_states))
        if probabilities is None
        else jnp.log(probabilities)
    )
    indices = jax.random.categorical(key_index, log_p, shape=(num_terms, batch))
    terms = jax.lax.map(evaluate, (indices, jax.random.split(key_noise, num_terms))).T
    weighted = terms / jnp.exp(log_p)[indices.T]
    return VLBEstimate(prior + weighted.mean(axis=1), prior, terms, indices.T, num_terms)


def vlb_bits_per_dim(
    nats: ArrayLike,
    dim: int,
    decoder: str,
    data_range: Sequence[float] | None = None,
) -> Array:
    """Bits/dim of a bound in nats over ``dim`` dimensions.

    'discretized_gaussian' bounds a discrete likelihood: nats / (dim ln 2) (Ho et al. 2020, Table 2).
    'gaussian' bounds a density: nats / (dim ln 2) for continuous data (data_range None), or, for
    uniformly dequantised 8-bit data scaled to data_range, the bits/dim of the discrete data
    (``diffusion.likelihood.bits_per_dim_from_log_prob``: + 8 - log2(hi - lo)).
    """
    _check_choice("decoder", decoder, DECODERS)
    if decoder == "gaussian" and data_range is not None:
        return bits_per_dim_from_log_prob(-jnp.asarray(nats), dim, data_range)
    return jnp.asarray(nats) / (dim * math.log(2.0))


# ================================================================================ importance sampling
@struct.dataclass
class TermHistory:
    """The last ``history`` values of each of K terms (Nichol & Dhariwal 2021, Sec. 3.3).

    values: (K, history), oldest first once full; counts: (K,) values recorded (at most history).
    """

    values: Array
    counts: Array


def init_term_history(num_terms: int, history: int = 10, dtype: Any = None) -> TermHistory:
    """An empty history of ``history`` values per term (Nichol & Dhariwal 2021 keep 10)."""
    if not (
        isinstance(num_terms, int) and num_terms >= 1 and isinstance(history, int) and history >= 1
    ):
        raise ValueError(
            f"need integers num_terms >= 1 and history >= 1, got {num_terms!r}, {history!r}"
        )
    dtype = dtype or jnp.result_type(float)
    return TermHistory(
        values=jnp.zeros((num_terms, history), dtype), counts=jnp.zeros((num_terms,), jnp.int32)
    )


def update_term_history(state: TermHistory, indices: ArrayLike, losses: ArrayLike) -> TermHistory:
    """Record losses[i] as the newest value of term indices[i], in batch order (pure, jit-able)."""
    indices, losses = jnp.ravel(jnp.asarray(indices)), jnp.ravel(jnp.asarray(losses))
    history = state.values.shape[1]

    def record(i, current: TermHistory) -> TermHistory:
        k, loss = indices[i], losses[i].astype(current.values.dtype)
        count = current.counts[k]
        row = current.values[k]
        shifted = jnp.roll(row, -1).at[-1].set(loss)  # full: drop the oldest
        row = jnp.where(count < history, row.at[jnp.minimum(count, history - 1)].set(loss), shifted)
        return TermHistory(
            values=current.values.at[k].set(row),
            counts=current.counts.at[k].set(jnp.minimum(count + 1, history)),
        )

    return jax.lax.fori_loop(0, indices.shape[0], record, state)


def second_moment_probabilities(second_moments: ArrayLike, uniform_mix: float = 0.001) -> Array:
    """p_k proportional to sqrt(E[L_k^2]), mixed with the uniform law: (1 - u) p + u / K.

    The mixture (u = 0.001 in Nichol & Dhariwal's code, ``LossSecondMomentResampler``) keeps every
    p_k > 0, which unbiasedness needs.
    """
    if not 0.0 < uniform_mix <= 1.0:
        raise ValueError(f"uniform_mix must be in (0, 1], got {uniform_mix!r}")
    weights = jnp.sqrt(jnp.asarray(second_moments))
    weights = weights / jnp.sum(weights)
    return (1.0 - uniform_mix) * weights + uniform_mix / weights.shape[0]


def term_probabilities(state: TermHistory, uniform_mix: float = 0.001) -> Array:
    """Sampling law of the terms: uniform until every term has a full history, then
    ``second_moment_probabilities`` of the history's mean squares (Nichol & Dhariwal 2021, Sec. 3.3)."""
    num_terms, history = state.values.shape
    warm = jnp.all(state.counts == history)
    learned = second_moment_probabilities(jnp.mean(state.values**2, axis=1), uniform_mix)
    return jnp.where(warm, learned, jnp.full((num_terms,), 1.0 / num_terms, learned.dtype))


# ================================================================================ hybrid loss
def _batch_data(batch: Mapping[str, Array]) -> Array:
    for name in ("image", "x"):
        if name in batch:
            return jnp.asarray(batch[name])
    raise ValueError(f"batch needs an 'image' or 'x' entry, got keys {sorted(batch)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HybridLoss:
    """L_hybrid = L_simple + lambda L_vlb for a learned-variance network (Nichol & Dhariwal 2021, Sec. 3.1).

    ``loss_fn(params, batch, key, *, train=True) -> (loss, aux)`` like ``DenoisingLoss``: it evaluates
    ``denoiser.replace(params=params)``, whose network outputs 2C channels, the prediction and the
    variance interpolation v (``split_learned_variance_output``). Per example: a chain index
    k ~ U{0..K-1} (t = chain_times[k]), x_t ~ q(x_t | x_0), and

      L_simple = mean_d (eps - eps_hat)^2, the eps-MSE averaged over dimensions (Ho et al. 2020,
                 eq. 14), eps_hat the eps view of the prediction,
      L_vlb    = K L_k in bits per dimension: the uniform-t estimate of sum_k L_k (L_prior has no
                 parameters), with the mean's gradient stopped so that L_vlb trains v only (Sec. 3.1).

    lambda = 0.001 (Nichol & Dhariwal 2021); with these units it is the authors' code's
    ``vb * num_timesteps / 1000`` added to the mean-over-dimensions MSE.

    Attributes:
      denoiser: the network as a ``Denoiser`` (2C output channels) of a discrete chain (DDPM, SMLD),
        whose chain_times are the terms; its params are replaced at each call.
      decoder: 'discretized_gaussian' (8-bit data in [-1, 1]) or 'gaussian' (continuous data).
      lambda_vlb: weight of L_vlb.
      num_classes: None (unconditional) or the number of classes (labels passed as ``y``).
    """

    denoiser: Denoiser
    decoder: str = "discretized_gaussian"
    lambda_vlb: float = 0.001
    num_classes: int | None = None

    def __post_init__(self):
        if not isinstance(self.denoiser, Denoiser):
            raise ValueError(
                f"denoiser must be a diffusion.parameterization.Denoiser, got {self.denoiser!r}"
            )
        times = vlb_chain_times(self.process)
        _check_decoder(self._model(None), self.decoder, times.size)
        if not (math.isfinite(self.lambda_vlb) and self.lambda_vlb >= 0):
            raise ValueError(f"lambda_vlb must be a finite number >= 0, got {self.lambda_vlb!r}")
        if self.num_classes is not None and not (
            isinstance(self.num_classes, int) and self.num_classes >= 1
        ):
            raise ValueError(f"num_classes must be None or an int >= 1, got {self.num_classes!r}")

    @property
    def process(self) -> Process:
        return self.denoiser.process

    def _model(self, params: Any) -> ReverseModel:
        return ReverseModel(denoiser=self.denoiser.replace(params=params), variance="learned")

    def __call__(
        self, params: Any, batch: Mapping[str, Array], key: Array, *, train: bool = True
    ) -> tuple[Array, dict[str, Array]]:
        """(loss, {'eps_mse', 'vlb_bpd'}): 'vlb_bpd' estimates sum_k L_k in bits/dim (no L_prior)."""
        x0 = _batch_data(batch)
        batch_size, dim = x0.shape[0], math.prod(x0.shape[1:])
        key_index, key_noise, key_dropout = jax.random.split(key, 3)
        times = jnp.asarray(vlb_chain_times(self.process), x0.dtype)
        num_states = times.shape[0]
        index = jax.random.randint(key_index, (batch_size,), 0, num_states)
        t = times[index]
        x_t, eps = self.process.sample_marginal(key_noise, x0, t)
        model_kwargs: dict[str, Any] = {}
        if self.num_classes is not None:
            model_kwargs["y"] = batch["label"]
        if train:
            model_kwargs.update(train=True, rngs={"dropout": key_dropout})
        model = self._model(params)
        prediction, interpolation = split_learned_variance_output(
            model.denoiser.network_output(x_t, t, **model_kwargs)
        )
        alpha = expand_to(self.process.alpha(t), x0)
        sigma = expand_to(self.process.sigma(t), x0)
        parameterization, sigma_data = self.denoiser.parameterization, self.denoiser.sigma_data
        eps_pred, _ = eps_x0_from_prediction(
            prediction, parameterization, x_t, alpha, sigma, sigma_data
        )
        simple = jnp.mean((eps - eps_pred).reshape(batch_size, -1) ** 2, axis=1)
        # Nichol & Dhariwal 2021, Sec. 3.1: L_vlb sees the mean through a stop-gradient.
        _, x0_pred = eps_x0_from_prediction(
            jax.lax.stop_gradient(prediction), parameterization, x_t, alpha, sigma, sigma_data
        )
        term = _term_from_prediction(
            model, x0, x_t, x0_pred, interpolation, index, times, self.decoder
        )
        vlb_bits = num_states * term / (dim * math.log(2.0))
        loss = jnp.mean(simple + self.lambda_vlb * vlb_bits)
        return loss, {"eps_mse": jnp.mean(simple), "vlb_bpd": jnp.mean(vlb_bits)}


# ================================================================================ continuous time
def continuous_diffusion_integrand(
    denoiser: DenoiserViews, x0: ArrayLike, t: ArrayLike, eps: ArrayLike, **model_kwargs
) -> Array:
    """1/2 (-d log SNR/dt) ||eps - eps_hat(x_t, t)||^2 per example (nats per unit time), (B,).

    The integrand of Kingma et al. 2021's continuous diffusion loss (eq. 17: -1/2 SNR'(t) ||x - x_hat||^2
    = 1/2 gamma'(t) ||eps - eps_hat||^2 with gamma = -log SNR) at x_t = alpha_t x_0 + sigma_t eps; the
    weight is the 'likelihood' weighting of ``diffusion.losses`` (-d log SNR/dt = g^2 / sigma^2).
    """
    x0, eps = jnp.asarray(x0), jnp.asarray(eps)
    t = jnp.broadcast_to(jnp.asarray(t, x0.dtype), x0.shape[:1])
    process = denoiser.process
    mean, std = process.marginal(x0, t)
    eps_pred = denoiser.eps(mean + expand_to(std, x0) * eps, t, **model_kwargs)
    weight = eps_loss_weight("likelihood", process, t)
    return 0.5 * weight * sum_except_batch((eps - eps_pred) ** 2)


@struct.dataclass
class ContinuousVLBEstimate:
    """Per-example continuous-time bound (nats): total = prior + diffusion + reconstruction.

    ``num_terms_evaluated`` is the number of network evaluations per example.
    """

    total: Array
    prior: Array
    diffusion: Array
    reconstruction: Array
    num_terms_evaluated: int = struct.field(pytree_node=False)


def continuous_vlb(
    model: ReverseModel,
    x0: ArrayLike,
    key: Array,
    *,
    decoder: str = "discretized_gaussian",
    num_time_samples: int = 1,
    time_sampling: str = "uniform",
    **model_kwargs,
) -> ContinuousVLBEstimate:
    """Kingma et al. 2021's continuous-time bound on [t_min, T] per example (nats).

    prior KL at T + L_diffusion (Monte Carlo over ``num_time_samples`` times per example, drawn by
    ``diffusion.losses.sample_time``: 'uniform' in t or 'importance', uniform in log-SNR, each with its
    weight) + the decoder term -log p(x_0 | x_{t_min}) with the model's decoder variance
    ('fixed_large' or 'analytic': no chain, so no next time). The limit of ``discrete_vlb`` with
    'fixed_small' steps on finer and finer grids from t_min to T with the same decoder.
    """
    _check_choice("time_sampling", time_sampling, CONTINUOUS_TIME_SAMPLINGS)
    _check_decoder(model, decoder, 1)
    if not (isinstance(num_time_samples, int) and num_time_samples >= 1):
        raise ValueError(f"num_time_samples must be an int >= 1, got {num_time_samples!r}")
    process = model.process
    x0 = jnp.asarray(x0)
    batch = x0.shape[0]
    key_decoder, key_times = jax.random.split(key)
    prior = prior_kl(process, x0)
    reconstruction = vlb_term(
        model,
        x0,
        jax.random.normal(key_decoder, x0.shape, x0.dtype),
        0,
        jnp.asarray([process.t_min], x0.dtype),
        decoder=decoder,
        **model_kwargs,
    )

    def sample(sample_key):
        key_t, key_eps = jax.random.split(sample_key)
        t, weight = sample_time(time_sampling, process, key_t, batch, x0.dtype)
        eps = jax.random.normal(key_eps, x0.shape, x0.dtype)
        integrand = continuous_diffusion_integrand(model, x0, t, eps, **model_kwargs)
        return (process.T - process.t_min) * weight * integrand

    diffusion = jax.lax.map(sample, jax.random.split(key_times, num_time_samples)).mean(axis=0)
    return ContinuousVLBEstimate(
        total=prior + diffusion + reconstruction,
        prior=prior,
        diffusion=diffusion,
        reconstruction=reconstruction,
        num_terms_evaluated=num_time_samples + 1,
    )
