"""Variational diffusion models (Kingma et al. 2021): the learned noise schedule and the VDM loss.

The schedule is gamma(t) = -log SNR(t) of a variance-preserving process, alpha^2 = sigmoid(-gamma),
sigma^2 = sigmoid(gamma) (Kingma et al. 2021, Sec. 3.2). gamma is a monotone network (their App. H,
``NoiseSchedule_NNet``): a linear layer plus a 1024-unit sigmoid layer, every weight made positive by
an absolute value, so gamma-tilde(t) is increasing in t; its end points are fixed by the affine map

    gamma(t) = gamma_min + (gamma_max - gamma_min) (gamma-tilde(t) - gamma-tilde(0))
                                                  / (gamma-tilde(1) - gamma-tilde(0))

(Kingma et al. 2021, Sec. 5.1: the continuous-time VLB depends on the schedule only through
SNR_min and SNR_max (their eq. 20), so with fixed end points the schedule's interior is free to
minimise the variance of the VLB estimator instead). ``LearnedSchedule`` is that process: a
``Process`` whose alpha and sigma come from the network, so every sampler and loss accepts it.

Design (processes are static fields of a ``Denoiser``, hashed by jit): a ``LearnedSchedule`` holds
its parameters as arrays and compares and hashes by their values (a frozen snapshot: build it from
trained parameters, then sample or evaluate with any sampler unchanged; equal parameters reuse the
compiled program). Inside a traced training step it is built from traced parameters and never hashed.
It is also a pytree whose leaves are its parameters.

``VDMLoss`` is the VDM objective in bits per dimension: prior + reconstruction + diffusion, the last
in continuous time (their eq. 17 via the 'likelihood' weighting) or with T discrete steps (their
eq. 11-13: 1/2 T (SNR(s)/SNR(t) - 1) ||eps - eps_hat||^2 at t = i/T, s = (i - 1)/T). With a learned
schedule the denoiser receives the gradient of E[L] and the schedule the gradient of E[L_diffusion^2],
which minimises the estimator's variance since E[L] does not depend on the schedule's interior
(Kingma et al. 2021, Sec. 5.2). Both come from one backward pass: the schedule parameters are copied
per example, so the per-example cotangent can be scaled by 2 L_i before it reaches them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

from diffusion.losses import eps_loss_weight
from diffusion.parameterization import Denoiser
from diffusion.processes import Process
from diffusion.shapes import expand_to
from diffusion.variational.vlb import DECODERS, decoder_nll, prior_kl

__all__ = [
    "GAMMA_MAX",
    "GAMMA_MIN",
    "SCHEDULE_PARAM_NAMES",
    "LearnedSchedule",
    "VDMLoss",
    "init_schedule_params",
    "linear_schedule_params",
    "monotone_gamma",
    "schedule_gamma",
]

# Kingma et al. 2021's end points for CIFAR-10 (their configs: gamma_min = -13.3, gamma_max = 5).
GAMMA_MIN = -13.3
GAMMA_MAX = 5.0
SCHEDULE_PARAM_NAMES = (
    "linear_weight",
    "hidden_weight",
    "hidden_bias",
    "output_weight",
)


# ================================================================================ the network
def init_schedule_params(
    key: Array, num_hidden: int = 1024, stddev: float = 0.01, dtype: Any = None
) -> dict[str, Array]:
    """Parameters of the monotone schedule network (Kingma et al. 2021, App. H).

    As their ``NoiseSchedule_NNet``: the linear weight starts at 1 (their gamma_max - gamma_min; only
    ratios matter after the end-point map) and the hidden and output weights at N(0, stddev^2), so the
    schedule starts close to linear in t; hidden biases start at 0.
    """
    if not (isinstance(num_hidden, int) and num_hidden >= 1):
        raise ValueError(f"num_hidden must be an int >= 1, got {num_hidden!r}")
    dtype = dtype or jnp.result_type(float)
    key_hidden, key_output = jax.random.split(key)
    return {
        "linear_weight": jnp.ones((), dtype),
        "hidden_weight": stddev * jax.random.normal(key_hidden, (num_hidden,), dtype),
        "hidden_bias": jnp.zeros((num_hidden,), dtype),
        "output_weight": stddev * jax.random.normal(key_output, (num_hidden,), dtype),
    }


def linear_schedule_params(num_hidden: int = 1024, dtype: Any = None) -> dict[str, Array]:
    """Parameters whose schedule is exactly linear, gamma(t) = gamma_min + (gamma_max - gamma_min) t.

    Kingma et al. 2021's fixed schedule (their ``NoiseSchedule_FixedLinear``): the output weights are
    zero, so the sigmoid layer contributes nothing.
    """
    dtype = dtype or jnp.result_type(float)
    return {
        "linear_weight": jnp.ones((), dtype),
        "hidden_weight": jnp.ones((num_hidden,), dtype),
        "hidden_bias": jnp.zeros((num_hidden,), dtype),
        "output_weight": jnp.zeros((num_hidden,), dtype),
    }


def monotone_gamma(params: Mapping[str, Array], t: ArrayLike) -> Array:
    """gamma-tilde(t) = |w_1| t + sum_j |w3_j| phi(|w2_j| (2t - 1) + b2_j) / H, increasing in t.

    phi(u) = 2 sigmoid(u) - 1 (Kingma et al. 2021, App. H: monotone linear layers with positive
    weights, their ``DenseMonotone``, and a sigmoid layer in between; input scaled to [-1, 1]).
    """
    t = jnp.asarray(t)
    hidden = jnp.abs(params["hidden_weight"]) * (2.0 * t[..., None] - 1.0) + params["hidden_bias"]
    features = 2.0 * jax.nn.sigmoid(hidden) - 1.0
    nonlinear = features @ jnp.abs(params["output_weight"]) / params["output_weight"].shape[-1]
    return jnp.abs(params["linear_weight"]) * t + nonlinear


def schedule_gamma(
    params: Mapping[str, Array], t: ArrayLike, gamma_min: float, gamma_max: float
) -> Array:
    """gamma(t) with the fixed end points gamma(0) = gamma_min, gamma(1) = gamma_max (module doc)."""
    at_zero = monotone_gamma(params, jnp.zeros(()))
    at_one = monotone_gamma(params, jnp.ones(()))
    fraction = (monotone_gamma(params, t) - at_zero) / (at_one - at_zero)
    return gamma_min + (gamma_max - gamma_min) * fraction


# ================================================================================ the process
def _leaf_fingerprint(leaf: Any) -> tuple:
    if isinstance(leaf, jax.core.Tracer):
        raise TypeError(
            "a LearnedSchedule with traced parameters cannot be hashed or compared; build the "
            "process inside the traced function, or from concrete (trained) parameters"
        )
    array = np.asarray(leaf)
    return (array.shape, array.dtype.str, array.tobytes())


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class LearnedSchedule(Process):
    """Variance-preserving process with a learned monotone gamma(t) = -log SNR(t) on [0, 1].

    alpha(t) = sqrt(sigmoid(-gamma(t))), sigma(t) = sqrt(sigmoid(gamma(t))) (Kingma et al. 2021,
    Sec. 3.2), gamma from ``schedule_gamma(params, t, gamma_min, gamma_max)``. The prior is N(0, I).
    Equality and hashing are by parameter values (module docstring).
    """

    name: ClassVar[str] = "learned"
    params: Mapping[str, Array]
    gamma_min: float = GAMMA_MIN
    gamma_max: float = GAMMA_MAX
    t_min: float = 0.0
    T: float = 1.0

    def __post_init__(self):
        if not (
            math.isfinite(self.gamma_min)
            and math.isfinite(self.gamma_max)
            and self.gamma_min < self.gamma_max
        ):
            raise ValueError(
                f"LearnedSchedule: need finite gamma_min < gamma_max, got gamma_min="
                f"{self.gamma_min!r}, gamma_max={self.gamma_max!r}"
            )
        if (self.t_min, self.T) != (0.0, 1.0):
            raise ValueError(
                f"LearnedSchedule: the schedule spans t in [0, 1]; got t_min={self.t_min!r}, "
                f"T={self.T!r}"
            )
        if not isinstance(self.params, Mapping) or set(self.params) != set(SCHEDULE_PARAM_NAMES):
            keys = sorted(self.params) if isinstance(self.params, Mapping) else self.params
            raise ValueError(
                f"LearnedSchedule: params must be a mapping with keys "
                f"{', '.join(SCHEDULE_PARAM_NAMES)}; got {keys!r}"
            )

    # ------------------------------------------------------------------ value semantics
    def _static(self) -> tuple:
        return (self.gamma_min, self.gamma_max, self.t_min, self.T)

    def _fingerprint(self) -> tuple:
        return tuple((name, _leaf_fingerprint(self.params[name])) for name in SCHEDULE_PARAM_NAMES)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._static() == other._static() and self._fingerprint() == other._fingerprint()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._static(), self._fingerprint()))

    # ------------------------------------------------------------------ the schedule
    def gamma(self, t: ArrayLike) -> Array:
        """gamma(t) = -log SNR(t), increasing from gamma_min at t = 0 to gamma_max at t = 1."""
        return schedule_gamma(self.params, t, self.gamma_min, self.gamma_max)

    def log_alpha(self, t: ArrayLike) -> Array:
        # log sqrt(sigmoid(-gamma)) = -softplus(gamma) / 2.
        return -0.5 * jax.nn.softplus(self.gamma(t))

    def log_sigma(self, t: ArrayLike) -> Array:
        return -0.5 * jax.nn.softplus(-self.gamma(t))

    def log_snr(self, t: ArrayLike) -> Array:
        """lambda = log(alpha/sigma) = -gamma/2 exactly."""
        return -0.5 * self.gamma(t)

    @property
    def sampling_t_end(self) -> float:
        return self.t_min

    @property
    def prior_std(self) -> float:
        """1: the process is variance preserving (sigmoid(-gamma) + sigmoid(gamma) = 1)."""
        return 1.0


def _flatten_schedule(process: LearnedSchedule):
    return (process.params,), process._static()


def _unflatten_schedule(static: tuple, children: tuple) -> LearnedSchedule:
    # No validation: tree transformations rebuild the process with placeholder leaves.
    process = object.__new__(LearnedSchedule)
    for name, value in zip(("gamma_min", "gamma_max", "t_min", "T"), static, strict=True):
        object.__setattr__(process, name, value)
    object.__setattr__(process, "params", children[0])
    return process


jax.tree_util.register_pytree_node(LearnedSchedule, _flatten_schedule, _unflatten_schedule)


# ================================================================================ the loss
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _schedule_gets_squared_loss_gradient(per_example_loss, denoiser_params, schedule, inputs):
    """per_example_loss(...) = (L, aux), both (B,); the cotangent of L reaches the per-example
    ``schedule`` copies (leading axis B) scaled by 2 L_i: the gradient of sum_i c_i L_i^2 for them and
    of sum_i c_i L_i for the denoiser (Kingma et al. 2021, Sec. 5.2). aux must carry no gradient."""
    return per_example_loss(denoiser_params, schedule, inputs)


def _squared_forward(per_example_loss, denoiser_params, schedule, inputs):
    losses, pullback = jax.vjp(per_example_loss, denoiser_params, schedule, inputs)
    return losses, (losses, pullback)


def _squared_backward(per_example_loss, residuals, cotangent):
    del per_example_loss
    (losses, _), pullback = residuals
    grad_denoiser, grad_schedule, grad_inputs = pullback(cotangent)
    grad_schedule = jax.tree.map(lambda g: g * expand_to(2.0 * losses, g), grad_schedule)
    return grad_denoiser, grad_schedule, grad_inputs


_schedule_gets_squared_loss_gradient.defvjp(_squared_forward, _squared_backward)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VDMLoss:
    """Kingma et al. 2021's VLB as a training loss, in bits per dimension.

    ``loss_fn(params, batch, key, *, train=True) -> (loss, aux)`` like ``DenoisingLoss``: it evaluates
    ``denoiser.replace(params=...)`` (the denoiser is built once by the caller and shared with the
    samplers). Per example (nats, then / (D ln 2)):

      prior          KL(q(z_T | x) || N(0, prior_std^2 I))          (their eq. 8 / ``loss_klz``)
      reconstruction -log p(x | z_{t_min}), the decoder of their Sec. 3.3 built from q(z_{t_min} | x):
                     mean z / alpha, variance sigma^2 / alpha^2 (no network: 'gaussian' is their
                     decoder for continuous data; 'discretized_gaussian' integrates it over 8-bit
                     bins where they normalise it over the 256 values)
      diffusion      continuous (num_steps = 0): (T - t_min)/2 w(t) ||eps - eps_hat||^2, t ~ U[t_min, T],
                     w = -d log SNR/dt (their eq. 17; the 'likelihood' weighting);
                     discrete (num_steps = N): 1/2 N (SNR(s)/SNR(t) - 1) ||eps - eps_hat||^2 at t = t_i,
                     s = t_{i-1} of N uniform steps (their eq. 13 with eq. 11's KLs)

    Times are antithetic by default (t_i = (u + i/B) mod 1 mapped to [t_min, T], their
    ``antithetic_time_sampling``). The key is split once into (time, noise, decoder, dropout) keys;
    eps = normal(noise key, x.shape). ``params`` is the network's parameters, or with
    ``train_schedule=True`` (the denoiser's process a ``LearnedSchedule``, whose end points are kept)
    ``{'denoiser': ..., 'schedule': ...}``: the schedule is the process with params['schedule'] and
    receives the gradient of E[L_diffusion^2] when ``variance_gradient`` (module docstring; E[L]
    otherwise).

    aux: 'bpd' and its parts 'bpd_prior', 'bpd_reconstruction', 'bpd_diffusion', and 'eps_mse'.
    """

    denoiser: Denoiser
    train_schedule: bool = False
    num_steps: int = 0
    decoder: str = "gaussian"
    antithetic: bool = True
    variance_gradient: bool = True
    num_classes: int | None = None

    def __post_init__(self):
        if not isinstance(self.denoiser, Denoiser):
            raise ValueError(
                f"denoiser must be a diffusion.parameterization.Denoiser, got {self.denoiser!r}"
            )
        if self.train_schedule and not isinstance(self.denoiser.process, LearnedSchedule):
            raise ValueError(
                "train_schedule=True needs the denoiser's process to be a LearnedSchedule, got "
                f"{type(self.denoiser.process).__name__}"
            )
        if not (isinstance(self.num_steps, int) and self.num_steps >= 0):
            raise ValueError(
                f"num_steps must be an int >= 0 (0: continuous time), got {self.num_steps!r}"
            )
        if self.decoder not in DECODERS:
            raise ValueError(f"unknown decoder {self.decoder!r}; accepted: {', '.join(DECODERS)}")
        if self.num_classes is not None and not (
            isinstance(self.num_classes, int) and self.num_classes >= 1
        ):
            raise ValueError(f"num_classes must be None or an int >= 1, got {self.num_classes!r}")

    # ------------------------------------------------------------------ pieces
    @property
    def learned(self) -> bool:
        return self.train_schedule

    def _process(self, schedule_params: Any) -> Process:
        if not self.learned:
            return self.denoiser.process
        return dataclasses.replace(self.denoiser.process, params=schedule_params)

    def _denoiser(self, params: Any, process: Process) -> Denoiser:
        return self.denoiser.replace(params=params, process=process)

    def _split_params(self, params: Any) -> tuple[Any, Any]:
        if not self.learned:
            return params, None
        if not (isinstance(params, Mapping) and set(params) == {"denoiser", "schedule"}):
            raise ValueError(
                "with train_schedule=True params must be {'denoiser': ..., 'schedule': ...}"
            )
        return params["denoiser"], params["schedule"]

    def _sample_times(self, key: Array, batch_size: int, dtype) -> Array:
        """Unit-interval fractions u (antithetic or i.i.d.), one per example."""
        if self.antithetic:
            offset = jax.random.uniform(key, (), dtype)
            return jnp.mod(offset + jnp.arange(batch_size, dtype=dtype) / batch_size, 1.0)
        return jax.random.uniform(key, (batch_size,), dtype)

    def _example_diffusion(self, denoiser_params, schedule_params, example) -> tuple[Array, Array]:
        """(diffusion term in nats, eps-MSE) of one example; vmapped over the batch."""
        x0, eps, fraction, label, dropout_key = example
        process = self._process(schedule_params)
        span = process.T - process.t_min
        x0, eps = x0[None], eps[None]
        if self.num_steps == 0:
            t = process.t_min + span * fraction[None]
            weight = span * eps_loss_weight("likelihood", process, t)
        else:
            step = jnp.floor(fraction * self.num_steps)[None]  # i - 1 in {0, ..., N - 1}
            t = process.t_min + span * (step + 1.0) / self.num_steps
            s = process.t_min + span * step / self.num_steps
            # SNR(s)/SNR(t) - 1 = expm1(2 (lambda_s - lambda_t)) (Kingma et al. 2021, eq. 13).
            weight = self.num_steps * jnp.expm1(2.0 * (process.log_snr(s) - process.log_snr(t)))
        model_kwargs: dict[str, Any] = {}
        if label is not None:
            model_kwargs["y"] = label[None]
        if dropout_key is not None:
            model_kwargs.update(train=True, rngs={"dropout": dropout_key})
        mean, std = process.marginal(x0, t)
        x_t = mean + expand_to(std, x0) * eps
        eps_pred = self._denoiser(denoiser_params, process).eps(x_t, t, **model_kwargs)
        squared_error = (eps - eps_pred) ** 2
        return 0.5 * weight[0] * jnp.sum(squared_error), jnp.mean(squared_error)

    def per_example(
        self, params: Any, batch: Mapping[str, Array], key: Array, *, train: bool = True
    ) -> dict[str, Array]:
        """Per-example terms in bits/dim ('prior', 'reconstruction', 'diffusion') and 'eps_mse',
        with plain gradients for every parameter: the reference for ``__call__``'s gradients."""
        return self._terms(params, batch, key, train=train, variance_gradient=False)

    def _terms(self, params, batch, key, *, train: bool, variance_gradient: bool):
        denoiser_params, schedule_params = self._split_params(params)
        x0 = next((jnp.asarray(batch[k]) for k in ("image", "x") if k in batch), None)
        if x0 is None:
            raise ValueError(f"batch needs an 'image' or 'x' entry, got keys {sorted(batch)}")
        batch_size, dim = x0.shape[0], math.prod(x0.shape[1:])
        bits = 1.0 / (dim * math.log(2.0))
        key_time, key_noise, key_decoder, key_dropout = jax.random.split(key, 4)

        # End points are fixed: prior and decoder do not depend on the schedule's parameters.
        end_process = self._process(jax.lax.stop_gradient(schedule_params))
        prior = prior_kl(end_process, x0)
        z_mean, z_std = end_process.marginal(x0, end_process.t_min)
        z = z_mean + z_std * jax.random.normal(key_decoder, x0.shape, x0.dtype)
        reconstruction = decoder_nll(
            self.decoder,
            x0,
            z * jnp.exp(-end_process.log_alpha(end_process.t_min)),
            -2.0 * end_process.log_snr(end_process.t_min) * jnp.ones_like(x0),
        )

        # Diffusion, one example at a time so that each carries its own copy of the schedule.
        examples = (
            x0,
            jax.random.normal(key_noise, x0.shape, x0.dtype),
            self._sample_times(key_time, batch_size, x0.dtype),
            jnp.asarray(batch["label"]) if self.num_classes is not None else None,
            jax.random.split(key_dropout, batch_size) if train else None,
        )

        def diffusion_bits(denoiser_params, schedules, examples):
            nats, eps_mse = jax.vmap(
                lambda schedule, example: self._example_diffusion(
                    denoiser_params, schedule, example
                )
            )(schedules, examples)
            return nats * bits, jax.lax.stop_gradient(eps_mse)

        schedules = None
        if self.learned:
            schedules = jax.tree.map(
                lambda p: jnp.broadcast_to(p, (batch_size, *jnp.shape(p))), schedule_params
            )
        if self.learned and variance_gradient:
            diffusion, eps_mse = _schedule_gets_squared_loss_gradient(
                diffusion_bits, denoiser_params, schedules, examples
            )
        else:
            diffusion, eps_mse = diffusion_bits(denoiser_params, schedules, examples)
        return {
            "prior": prior * bits,
            "reconstruction": reconstruction * bits,
            "diffusion": diffusion,
            "eps_mse": eps_mse,
        }

    def __call__(
        self, params: Any, batch: Mapping[str, Array], key: Array, *, train: bool = True
    ) -> tuple[Array, dict[str, Array]]:
        """(mean bits/dim of the bound, aux) for one batch; pure, for jit / pmap / grad."""
        terms = self._terms(
            params, batch, key, train=train, variance_gradient=self.variance_gradient
        )
        total = terms["prior"] + terms["reconstruction"] + terms["diffusion"]
        aux = {
            "bpd": jnp.mean(total),
            "bpd_prior": jnp.mean(terms["prior"]),
            "bpd_reconstruction": jnp.mean(terms["reconstruction"]),
            "bpd_diffusion": jnp.mean(terms["diffusion"]),
            "eps_mse": jnp.mean(terms["eps_mse"]),
        }
        return jnp.mean(total), aux
