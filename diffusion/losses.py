"""Denoising score matching for any process, any parameterization, any weighting of noise levels.

Every loss here is an estimator of one objective,

    L = E_{t ~ U[t_min, T]} E_{x_0, eps} [ w(t) ||eps - eps_hat(alpha_t x_0 + sigma_t eps, t)||^2 ]

(Vincent 2011; Song & Ermon 2019; Ho et al. 2020; Song et al. 2021, eq. 7), or of its
discrete-chain / EDM variants where t is drawn from another law (``time_sampling``). The weighting
is always stated as a weight w(t) on the eps-MSE; the literature states it on the MSE of whatever
the network predicts, converted here with the identities of docs/references.md ("Loss conversions":
||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2 = sigma^2 ||s - s_hat||^2, SNR = alpha^2 / sigma^2,
sigma_hat = sigma / alpha):

    'simple'      w = 1                                 Ho et al. 2020, eq. 14 (L_simple)
    'sigma_sq'    w = 1                                 lambda(t) = sigma^2 on the score MSE (Song &
                                                        Ermon 2019, eq. 6; Song et al. 2021, eq. 7),
                                                        since ||s - s_hat||^2 = ||eps - eps_hat||^2 / sigma^2
    'likelihood'  w = g^2 / sigma^2 = -2 dlambda/dt     lambda(t) = g^2 on the score MSE (Song, Durkan,
                                                        Murray & Ermon 2021, Thm. 1)
    'snr'         w = 1                                 SNR(t) on the x0-MSE (Hang et al. 2023, "Efficient
                                                        Diffusion Training via Min-SNR Weighting Strategy",
                                                        Sec. 3: the SNR weighting that eps-prediction
                                                        implies), as ||eps - eps_hat||^2 =
                                                        SNR ||x0 - x0_hat||^2
    'min_snr'     w = min(SNR, gamma) / SNR             min(SNR, gamma) on the x0-MSE (Hang et al. 2023,
                                                        Sec. 3, Min-SNR-gamma; gamma = 5)
    'v'           w = (alpha^2 + sigma^2)^2 / alpha^2   the v-MSE (Salimans & Ho 2022, Sec. 4 and App. D):
                                                        ||v - v_hat||^2 = ((alpha^2 + sigma^2)/alpha)^2
                                                        ||eps - eps_hat||^2; (1 + SNR)/SNR for VP
    'edm'         w = (sigma_hat^2 + sigma_data^2)      lambda(sigma) = (sigma^2 + sigma_data^2) /
                      / sigma_data^2                    (sigma sigma_data)^2 on the D (= x0) MSE at
                                                        sigma = sigma_hat (Karras et al. 2022, eq. 8);
                                                        ||x0 - x0_hat||^2 = sigma_hat^2 ||eps - eps_hat||^2
    'velocity'    w = (1 + sigma_hat)^2                 the flow-matching MSE of u = eps - x0 (Lipman et
                                                        al. 2022, eq. 23): u - u_hat = (eps - eps_hat)
                                                        (alpha + sigma) / alpha

The loss is computed from the network's raw output F against its own regression target F*
(``diffusion.parameterization.prediction_from_eps_x0``) as ``w(t) c(t) ||F - F*||^2``, where c(t) is
the exact factor with ||eps - eps_hat||^2 = c(t) ||F - F*||^2 that the parameterization table gives
(``diffusion.parameterization.eps_error_factor``). Its value equals w(t) ||eps - eps_hat||^2 for
every parameterization, without dividing by a small sigma or alpha.

Convention: no factor 1/2 anywhere (as score_sde). Song & Ermon's NCSN objective (their eqs. 5-6,
with lambda(sigma) = sigma^2 and the factor 1/2) is half of 'sigma_sq' with 'discrete' sampling on SMLD
and reduction 'sum'; Ho et al.'s Alg. 1 is 'simple' with 'discrete' sampling on DDPM, reduction 'sum'.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

from diffusion.parameterization import Denoiser, eps_error_factor, prediction_from_eps_x0
from diffusion.processes import Process
from diffusion.shapes import expand_to, sum_except_batch

__all__ = [
    "REDUCTIONS",
    "TIME_SAMPLINGS",
    "WEIGHTINGS",
    "DenoisingLoss",
    "drop_labels",
    "eps_loss_weight",
    "sample_time",
]

REDUCTIONS = ("mean", "sum")


def _check_choice(name: str, value: str, accepted: Mapping[str, Any] | tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")


# ================================================================================ weights
def _inverse_snr(process: Process, t: Array) -> Array:
    """1 / SNR(t) = sigma_hat^2 = exp(-2 lambda(t))."""
    return jnp.exp(-2.0 * process.log_snr(t))


def _likelihood_weight(process: Process, t: Array) -> Array:
    """g(t)^2 / sigma(t)^2 = -2 dlambda/dt (Song, Durkan, Murray & Ermon 2021, Thm. 1, in eps form)."""
    return process.diffusion_sq(t) * jnp.exp(-2.0 * process.log_sigma(t))


@dataclasses.dataclass(frozen=True)
class _WeightOptions:
    sigma_data: float
    min_snr_gamma: float


# w(t) on the eps-MSE of each weighting (the table of the module docstring).
WEIGHTINGS: dict[str, Callable[[Process, Array, _WeightOptions], Array]] = {
    # L_simple (Ho et al. 2020, eq. 14).
    "simple": lambda process, t, o: jnp.ones_like(t),
    # lambda = sigma^2 on the score MSE (Song et al. 2021, eq. 7) is the eps-MSE itself.
    "sigma_sq": lambda process, t, o: jnp.ones_like(t),
    # lambda = g^2 on the score MSE (Song, Durkan, Murray & Ermon 2021, Thm. 1).
    "likelihood": lambda process, t, o: _likelihood_weight(process, t),
    # SNR on the x0-MSE (Hang et al. 2023, Sec. 3) is the eps-MSE itself.
    "snr": lambda process, t, o: jnp.ones_like(t),
    # min(SNR, gamma) on the x0-MSE (Hang et al. 2023, Sec. 3, Min-SNR-gamma).
    "min_snr": lambda process, t, o: jnp.minimum(1.0, o.min_snr_gamma * _inverse_snr(process, t)),
    # The v-MSE (Salimans & Ho 2022): (alpha^2 + sigma^2)^2 / alpha^2 = alpha^2 (1 + 1/SNR)^2.
    "v": lambda process, t, o: (
        jnp.exp(2.0 * process.log_alpha(t)) * (1.0 + _inverse_snr(process, t)) ** 2
    ),
    # lambda(sigma_hat) sigma_hat^2 with EDM's lambda (Karras et al. 2022, eq. 8).
    "edm": lambda process, t, o: 1.0 + _inverse_snr(process, t) / o.sigma_data**2,
    # The flow-matching loss ||u - u_hat||^2 on the velocity u = eps - x0 (Lipman et al. 2022,
    # eq. 23; Liu et al. 2022, eq. 1): ((alpha + sigma) / alpha)^2 = (1 + sigma_hat)^2, which is
    # 1 / (1 - t)^2 on the flow process.
    "velocity": lambda process, t, o: (1.0 + jnp.exp(-process.log_snr(t))) ** 2,
}


def eps_loss_weight(
    weighting: str,
    process: Process,
    t: ArrayLike,
    *,
    sigma_data: float = 0.5,
    min_snr_gamma: float = 5.0,
) -> Array:
    """The weight w(t) of ``weighting`` on the eps-MSE ||eps - eps_hat||^2 (``WEIGHTINGS``).

    'simple' (Ho et al. 2020, eq. 14), 'sigma_sq' (Song et al. 2021, eq. 7 with lambda = sigma^2) and
    'snr' (Hang et al. 2023, Sec. 3) are all w = 1; 'likelihood' is g^2/sigma^2 (Song, Durkan et al.
    2021, Thm. 1); 'min_snr' is min(1, gamma/SNR) (Hang et al. 2023, Sec. 3); 'v' is
    (alpha^2 + sigma^2)^2/alpha^2 (Salimans & Ho 2022); 'edm' is (sigma_hat^2 + sigma_data^2) /
    sigma_data^2 (Karras et al. 2022, eq. 8).
    """
    _check_choice("weighting", weighting, WEIGHTINGS)
    options = _WeightOptions(sigma_data=sigma_data, min_snr_gamma=min_snr_gamma)
    return WEIGHTINGS[weighting](process, jnp.asarray(t), options)


# ================================================================================ time sampling
@dataclasses.dataclass(frozen=True)
class _TimeOptions:
    log_normal_mean: float
    log_normal_std: float
    logit_normal_mean: float
    logit_normal_std: float


def _uniform_times(process: Process, key: Array, shape, dtype, options) -> tuple[Array, Array]:
    # t = t_min + (T - t_min) U, U ~ U[0, 1); weight 1.
    t = process.t_min + (process.T - process.t_min) * jax.random.uniform(key, shape, dtype)
    return t, jnp.ones(shape, dtype)


def _log_normal_times(process: Process, key: Array, shape, dtype, options) -> tuple[Array, Array]:
    # ln sigma_hat ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1); weight 1 (EDM's objective).
    log_sigma_hat = options.log_normal_mean + options.log_normal_std * jax.random.normal(
        key, shape, dtype
    )
    t = process.t_from_log_snr(-log_sigma_hat)
    return jnp.clip(t, process.t_min, process.T).astype(dtype), jnp.ones(shape, dtype)


def _logit_normal_times(process: Process, key: Array, shape, dtype, options) -> tuple[Array, Array]:
    # The fraction u = (t - t_min) / (T - t_min) ~ sigmoid(N(m, s^2)) (Esser et al. 2024, Sec. 3.1:
    # logit-normal, m = 0, s = 1); weight 1 (this changes the objective, as EDM's law does).
    normal = options.logit_normal_mean + options.logit_normal_std * jax.random.normal(
        key, shape, dtype
    )
    t = process.t_min + (process.T - process.t_min) * jax.nn.sigmoid(normal)
    return t.astype(dtype), jnp.ones(shape, dtype)


def _importance_times(process: Process, key: Array, shape, dtype, options) -> tuple[Array, Array]:
    # lambda ~ U[lambda(T), lambda(t_min)]: density proportional to g^2/sigma^2 (Song, Durkan et al.
    # 2021, Sec. 5); weight (lambda_max - lambda_min) / ((T - t_min) (-dlambda/dt)) keeps the
    # estimator unbiased for the uniform-in-t objective.
    log_snr_max = process.log_snr(process.t_min)
    log_snr_min = process.log_snr(process.T)
    log_snr = jax.random.uniform(key, shape, dtype, minval=log_snr_min, maxval=log_snr_max)
    t = jnp.clip(process.t_from_log_snr(log_snr), process.t_min, process.T).astype(dtype)
    log_snr_rate = 0.5 * _likelihood_weight(process, t)
    weight = (log_snr_max - log_snr_min) / ((process.T - process.t_min) * log_snr_rate)
    return t, weight.astype(dtype)


def _discrete_times(process: Process, key: Array, shape, dtype, options) -> tuple[Array, Array]:
    # Uniform over the chain's states (Ho et al. 2020, Alg. 1; Song & Ermon 2019, eq. 6); weight 1.
    index = jax.random.randint(key, shape, 0, len(process.chain_times))
    return jnp.asarray(process.chain_times, dtype)[index], jnp.ones(shape, dtype)


TIME_SAMPLINGS: dict[str, Callable[..., tuple[Array, Array]]] = {
    "uniform": _uniform_times,
    "log_normal": _log_normal_times,
    "logit_normal": _logit_normal_times,
    "importance": _importance_times,
    "discrete": _discrete_times,
}


def sample_time(
    time_sampling: str,
    process: Process,
    key: Array,
    batch_size: int,
    dtype: Any = None,
    *,
    log_normal_mean: float = -1.2,
    log_normal_std: float = 1.2,
    logit_normal_mean: float = 0.0,
    logit_normal_std: float = 1.0,
) -> tuple[Array, Array]:
    """Draw (batch_size,) times and their importance weights u(t)/p(t) for the uniform objective.

    'uniform': t ~ U[t_min, T); weight 1. 'log_normal': ln sigma_hat ~ N(log_normal_mean,
    log_normal_std^2) (Karras et al. 2022, Table 1: -1.2, 1.2), t = t(lambda = -ln sigma_hat) clipped
    to [t_min, T]; weight 1 (this changes the objective, as EDM does). 'logit_normal': the fraction
    (t - t_min) / (T - t_min) is sigmoid(N(logit_normal_mean, logit_normal_std^2)) (Esser et al.
    2024, Sec. 3.1); weight 1. 'importance': lambda uniform,
    density proportional to g^2/sigma^2 (Song, Durkan et al. 2021, Sec. 5), weight keeping the
    uniform-in-t objective unbiased (constant for the 'likelihood' weighting). 'discrete': uniform over
    ``process.chain_times`` (Ho et al. 2020, Alg. 1); needs a discrete chain.
    """
    _check_choice("time_sampling", time_sampling, TIME_SAMPLINGS)
    options = _TimeOptions(
        log_normal_mean=log_normal_mean,
        log_normal_std=log_normal_std,
        logit_normal_mean=logit_normal_mean,
        logit_normal_std=logit_normal_std,
    )
    dtype = dtype or jnp.result_type(float)
    return TIME_SAMPLINGS[time_sampling](process, key, (batch_size,), dtype, options)


# ================================================================================ labels
def drop_labels(key: Array, labels: ArrayLike, probability: float, num_classes: int) -> Array:
    """Replace each label by the null label ``num_classes`` with the given probability.

    Classifier-free guidance training (Ho & Salimans 2022, Alg. 1): the models reserve index
    ``num_classes`` of their label embedding as the null (unconditional) label.
    """
    labels = jnp.asarray(labels)
    dropped = jax.random.bernoulli(key, probability, labels.shape)
    return jnp.where(dropped, jnp.asarray(num_classes, labels.dtype), labels)


# ================================================================================ the loss
def _reduce(squared_error: Array, reduction: str) -> Array:
    """Per-example reduction over every data dimension: mean (score_sde reduce_mean=True) or sum."""
    if reduction == "mean":
        return squared_error.reshape(squared_error.shape[0], -1).mean(axis=-1)
    return sum_except_batch(squared_error)


def _data_from_batch(batch: Mapping[str, Array], needs_label: bool) -> Array:
    """The batch's data ('image' or 'x'); checks that 'label' is there if the model needs it."""
    if needs_label and "label" not in batch:
        raise ValueError(
            f"a conditional model needs a 'label' entry; the batch has {sorted(batch)}"
        )
    for name in ("image", "x"):
        if name in batch:
            return jnp.asarray(batch[name])
    raise ValueError(f"batch needs an 'image' or 'x' entry, got keys {sorted(batch)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DenoisingLoss:
    """Denoising score matching loss; an instance is the pure loss function of a train step.

    ``DenoisingLoss(denoiser=..., weighting=...)`` validates the combination (ValueError naming the
    bad value) and returns the callable

        loss_fn(params, batch, key, *, train=True) -> (loss, {'eps_mse': ...})

    which evaluates ``denoiser.replace(params=params)``: the denoiser (process, parameterization,
    time input, network) is built once, by the caller, and shared with the samplers. ``batch`` holds
    'image' (NHWC) or 'x' (any batch-first array) and optionally 'label' (B,) ints, given to the
    network as ``y`` only when ``num_classes`` is set (conditional model). ``key`` is split once into
    (time, noise, dropout, label) keys: t and its weight come from ``sample_time(time_sampling,
    process, key_time, B, x.dtype)``, eps from ``process.sample_marginal(key_noise, x0, t)``. With
    ``train=True`` the network is called with ``train=True, rngs={'dropout': key_dropout}`` (Flax
    Linen ``apply``), with ``train=False`` with no extra keywords. The loss is the batch mean of
    importance_weight(t) w(t) c(t) ||F - F*||^2 reduced over data dimensions by ``reduction`` (see the
    module doc); 'eps_mse' is the batch mean of the unweighted c(t) ||F - F*||^2 = ||eps - eps_hat||^2
    with the same reduction.

    Attributes:
      denoiser: the network as a denoiser of its process (its params are replaced at each call).
      weighting: one of WEIGHTINGS.
      time_sampling: one of TIME_SAMPLINGS; 'discrete' needs a discrete chain and is refused with the
        'likelihood' weighting, which is defined for continuous time.
      reduction: 'mean' or 'sum' over data dimensions.
      min_snr_gamma: gamma of 'min_snr' (Hang et al. 2023 use 5).
      log_normal_mean, log_normal_std: P_mean, P_std of 'log_normal' (Karras et al. 2022: -1.2, 1.2).
      logit_normal_mean, logit_normal_std: m, s of 'logit_normal' (Esser et al. 2024: 0, 1).
      num_classes: None for an unconditional network (labels in the batch are ignored); else the
        number of classes, labels being passed as ``y``.
      label_dropout: probability of replacing a label by the null label ``num_classes`` when
        ``train=True`` (classifier-free guidance, Ho & Salimans 2022); needs ``num_classes``.
    """

    denoiser: Denoiser
    weighting: str
    time_sampling: str = "uniform"
    reduction: str = "mean"
    min_snr_gamma: float = 5.0
    log_normal_mean: float = -1.2
    log_normal_std: float = 1.2
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    num_classes: int | None = None
    label_dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.denoiser, Denoiser):
            raise ValueError(
                f"denoiser must be a diffusion.parameterization.Denoiser, got {self.denoiser!r}"
            )
        _check_choice("weighting", self.weighting, WEIGHTINGS)
        _check_choice("time_sampling", self.time_sampling, TIME_SAMPLINGS)
        _check_choice("reduction", self.reduction, REDUCTIONS)
        if self.time_sampling == "discrete":
            if not self.process.is_discrete:
                raise ValueError(
                    "time_sampling='discrete' needs a discrete chain (DDPM or SMLD); "
                    f"{type(self.process).__name__} is continuous"
                )
            if self.weighting == "likelihood":
                raise ValueError(
                    "weighting='likelihood' (g^2 on the score loss) is defined for continuous time "
                    "and cannot be used with time_sampling='discrete'; use 'uniform' or 'importance'"
                )
        if not (math.isfinite(self.min_snr_gamma) and self.min_snr_gamma > 0):
            raise ValueError(f"min_snr_gamma must be > 0, got {self.min_snr_gamma!r}")
        for law in ("log_normal", "logit_normal"):
            mean, std = getattr(self, f"{law}_mean"), getattr(self, f"{law}_std")
            if not (math.isfinite(mean) and math.isfinite(std)):
                raise ValueError(f"{law}_mean and {law}_std must be finite, got {mean!r}, {std!r}")
            if std <= 0:
                raise ValueError(f"{law}_std must be > 0, got {std!r}")
        if self.num_classes is not None and not (
            isinstance(self.num_classes, int) and self.num_classes >= 1
        ):
            raise ValueError(f"num_classes must be None or an int >= 1, got {self.num_classes!r}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout must be in [0, 1], got {self.label_dropout!r}")
        if self.label_dropout > 0 and self.num_classes is None:
            raise ValueError(
                f"label_dropout={self.label_dropout!r} needs num_classes (the null label's index)"
            )

    @property
    def process(self) -> Process:
        return self.denoiser.process

    def _model_kwargs(
        self, batch: Mapping[str, Array], key_dropout: Array, key_label: Array, train: bool
    ) -> dict[str, Any]:
        model_kwargs: dict[str, Any] = {}
        if self.num_classes is not None:
            labels = batch["label"]
            if train and self.label_dropout > 0:
                labels = drop_labels(key_label, labels, self.label_dropout, self.num_classes)
            model_kwargs["y"] = labels
        if train:
            model_kwargs.update(train=True, rngs={"dropout": key_dropout})
        return model_kwargs

    def __call__(
        self, params: Any, batch: Mapping[str, Array], key: Array, *, train: bool = True
    ) -> tuple[Array, dict[str, Array]]:
        """(loss, {'eps_mse': ...}) on one batch; pure, so it can be jitted, sharded, differentiated."""
        x0 = _data_from_batch(batch, needs_label=self.num_classes is not None)
        key_time, key_noise, key_dropout, key_label = jax.random.split(key, 4)
        process, denoiser = self.process, self.denoiser
        t, importance_weight = sample_time(
            self.time_sampling,
            process,
            key_time,
            x0.shape[0],
            x0.dtype,
            log_normal_mean=self.log_normal_mean,
            log_normal_std=self.log_normal_std,
            logit_normal_mean=self.logit_normal_mean,
            logit_normal_std=self.logit_normal_std,
        )
        x_t, eps = process.sample_marginal(key_noise, x0, t)
        model_kwargs = self._model_kwargs(batch, key_dropout, key_label, train)
        output = denoiser.replace(params=params).network_output(x_t, t, **model_kwargs)
        alpha = expand_to(process.alpha(t), x0)
        sigma = expand_to(process.sigma(t), x0)
        target = prediction_from_eps_x0(
            eps, x0, denoiser.parameterization, alpha, sigma, denoiser.sigma_data
        )
        # ||eps - eps_hat||^2 per example, from the raw output's own error.
        eps_squared_error = eps_error_factor(
            denoiser.parameterization, process, t, sigma_data=denoiser.sigma_data
        ) * _reduce((output - target) ** 2, self.reduction)
        weight = importance_weight * eps_loss_weight(
            self.weighting,
            process,
            t,
            sigma_data=denoiser.sigma_data,
            min_snr_gamma=self.min_snr_gamma,
        )
        loss = jnp.mean(weight * eps_squared_error)
        return loss, {"eps_mse": jnp.mean(eps_squared_error)}
