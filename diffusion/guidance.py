"""Conditional sampling as denoiser wrappers: classifier-free and classifier guidance, inpainting.

Every wrapper here is a ``DenoiserViews`` (a ``process`` and a ``predict(x, t) -> (eps, x0)``) and a
flax struct dataclass whose arrays (the inner denoiser's parameters, labels, guidance scales, known
values) are pytree leaves, so a wrapped denoiser passes through ``jax.jit`` and ``lax.scan`` like a
``Denoiser`` and every registered sampler runs it unchanged. Changing the labels or the scale of a
wrapper therefore never recompiles a sampler program. Wrappers compose (e.g. inpainting of a
classifier-free guided denoiser).

Conventions
-----------
* Labels are integers in [0, num_classes); the index ``num_classes`` is the null label of the
  networks' label embedding (``diffusion.models.embeddings.ConditioningEmbedding``), i.e. the
  unconditional model of classifier-free guidance (Ho & Salimans 2022), which label dropout
  (``diffusion.losses.drop_labels``) trains.
* Guidance scale w (classifier-free): eps = eps_uncond + w (eps_cond - eps_uncond), so w = 1 is plain
  conditional sampling and w = 0 unconditional. Ho & Salimans 2022 (eq. 6) write
  (1 + w') eps_cond - w' eps_uncond: their w' = w - 1.
* Classifier scale s: score = score_uncond + s grad_x log p(y | x_t) (Dhariwal & Nichol 2021, Alg.
  1-2 in score form). With the exact unconditional score and classifier, s = w gives exactly
  classifier-free guidance with the exact conditional score at scale w, since
  grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x).
* NFE: samplers count one evaluation per ``predict`` call. ``evaluations_per_call(denoiser)`` is the
  number of network evaluations one call costs: 2 for classifier-free guidance (the conditional
  and the unconditional prediction, computed by one pass on a doubled batch or by two passes;
  either way twice the work of one evaluation on the batch), times that of the inner denoiser.
  So the network evaluations of a guided run are ``result.nfe * evaluations_per_call(denoiser)``.
  Classifier guidance adds one classifier forward and backward pass per call
  (``ClassifierGuidance.classifier_gradients_per_call``).

Inpainting
----------
``Inpainting`` pins the known part of the data: its x0 prediction there is the known value y and
its eps there is (x - alpha y) / sigma, so every sampler moves the known coordinates of its state
as the reverse process of the point mass at y. For ancestral 'beta_tilde' steps, DDIM and the
probability-flow ODE that reverse process is exact: (x_t - alpha_t y) / sigma_t is constant along
DDIM and the ODE, and the ancestral step draws from q(x_s | x_t, x_0 = y), so the known coordinates
stay distributed as the noised copy q(x_t | x_0 = y) (given x_T from it, which the prior matches up
to alpha_T y). The unknown coordinates are predicted by the inner denoiser at the sampler's
state, whose known part is that noised copy: this is score_sde's replacement (Song et al. 2021,
App. I.2), with the noised copy carried by the sampler instead of redrawn. With ``replacement_key``
the network instead sees a fresh copy alpha_t y + sigma_t z at every call (score_sde's literal
scheme; z is a deterministic function of (key, t), for stochastic samplers only, since it makes the
ODE's vector field jump in t). Replacement is exact when the unknown coordinates are independent of
the known ones, and biased otherwise; ``repaint`` adds RePaint's resampling (Lugmayr et al. 2022,
Alg. 1), which reduces the bias.
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
import optax
from flax import struct
from jax import Array
from jax.typing import ArrayLike

from diffusion.losses import sample_time
from diffusion.parameterization import TIME_INPUTS, DenoiserViews, network_time
from diffusion.processes import Process
from diffusion.samplers.api import final_denoise
from diffusion.samplers.base import SampleResult, get_sampler, num_steps_of, require_int
from diffusion.shapes import expand_to

__all__ = [
    "INTERVAL_VARIABLES",
    "MASKS",
    "RESCALE_PREDICTIONS",
    "Classifier",
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "Inpainting",
    "check_labels",
    "coordinate_mask",
    "evaluations_per_call",
    "init_classifier",
    "inpainting_mask",
    "noisy_classifier_loss",
    "repaint",
    "sampling_labels",
    "train_noisy_classifier",
]

INTERVAL_VARIABLES = ("sigma", "log_snr")
RESCALE_PREDICTIONS = ("x0", "eps")


# ================================================================================ helpers
def _is_concrete(value: Any) -> bool:
    """Whether ``value`` holds actual numbers (not a tracer, nor a placeholder of a pytree op)."""
    if isinstance(value, jax.core.Tracer):
        return False
    return isinstance(value, np.ndarray | np.generic | jax.Array | int | float | list | tuple)


def _is_user_leaf(value: Any) -> bool:
    """Whether a wrapper's leaf, seen in ``__post_init__``, is a value to validate.

    Pytree operations rebuild wrappers with placeholder leaves (tracers, None, ``object()``, and
    equinox's Python booleans, e.g. inside diffrax), which must pass through unchecked; ``predict``
    checks the labels' dtype again at trace time.
    """
    return _is_concrete(value) and not isinstance(value, bool | np.bool_)


def check_labels(labels: ArrayLike, num_classes: int, *, allow_null: bool = False) -> Array:
    """``labels`` as an integer array; ValueError for a non-integer dtype or a value out of range.

    Accepted values are 0..num_classes-1, plus the null label ``num_classes`` with ``allow_null``.
    The dtype is checked always, the values whenever they are concrete (not under ``jax.jit``).
    """
    if not isinstance(labels, jax.core.Tracer):
        labels = np.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if _is_concrete(labels) and labels.size:
        high = num_classes if allow_null else num_classes - 1
        low_value, high_value = int(labels.min()), int(labels.max())
        if low_value < 0 or high_value > high:
            accepted = f"0..{high}" + (f" ({num_classes} is the null label)" if allow_null else "")
            bad = low_value if low_value < 0 else high_value
            raise ValueError(f"label {bad} is out of range; accepted: {accepted}")
    return jnp.asarray(labels)


def _require_real(name: str, value: Any, low: float = -math.inf, high: float = math.inf) -> None:
    """ValueError unless a concrete ``value`` is a finite real in [low, high] (tracers pass)."""
    if not _is_concrete(value):
        return
    array = np.asarray(value)
    if array.ndim != 0 or not np.issubdtype(array.dtype, np.number) or array.dtype == bool:
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not (math.isfinite(float(array)) and low <= float(array) <= high):
        raise ValueError(f"{name}={float(array)!r} must be a finite number in [{low}, {high}]")


def sampling_labels(spec: int | Sequence[int] | str, num_classes: int, num: int) -> np.ndarray:
    """(num,) int32 labels for a conditional sampling run, grouped by class.

    ``spec``: one label (every row), a sequence of labels (an equal share of each, in that order),
    or 'all' (an equal share of every class, 0..num_classes-1). Shares differ by at most one row
    (the first classes get the extra rows), and each class's rows are contiguous, so a grid with
    num // len(classes) columns shows one class per row.
    """
    if isinstance(spec, str):
        if spec != "all":
            raise ValueError(f"labels must be 'all', one label or a list of labels, got {spec!r}")
        classes = np.arange(num_classes)
    else:
        classes = np.asarray(spec).reshape(-1)
        if classes.size == 0:
            raise ValueError("labels must name at least one class")
    classes = np.asarray(check_labels(classes, num_classes))
    if not (isinstance(num, int | np.integer) and num >= 1):
        raise ValueError(f"num must be an integer >= 1, got {num!r}")
    counts = [len(part) for part in np.array_split(np.arange(num), len(classes))]
    return np.repeat(classes, counts).astype(np.int32)


def evaluations_per_call(denoiser: Any) -> int:
    """Network evaluations that one ``predict`` call of ``denoiser`` costs (1 for a plain one).

    A sampler's ``nfe`` counts ``predict`` calls; multiply by this for the network evaluations of a
    guided run (see the module docstring).
    """
    return int(getattr(denoiser, "evaluations_per_call", 1))


def _coefficients(process: Process, t: ArrayLike, x: Array) -> tuple[Array, Array, Array]:
    """(t as (B,), alpha, sigma broadcastable against x)."""
    t_batch = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    return t_batch, expand_to(process.alpha(t_batch), x), expand_to(process.sigma(t_batch), x)


def _std_per_example(values: Array) -> Array:
    """Standard deviation over every axis but the batch axis, kept broadcastable."""
    axes = tuple(range(1, values.ndim))
    return jnp.std(values, axis=axes, keepdims=True)


# ================================================================================ classifier-free
@struct.dataclass
class ClassifierFreeGuidance(DenoiserViews):
    """Classifier-free guidance (Ho & Salimans 2022) of a class-conditional denoiser.

    eps = eps(x, t, y = null) + w(t) (eps(x, t, y) - eps(x, t, y = null)), and the same combination
    of the x0 predictions (it is the x0 implied by that eps, since the weights sum to 1).

    Fields: ``denoiser`` (its network takes labels as the keyword ``y``, the label ``num_classes``
    being the null label), ``labels`` ((B,) or scalar ints in [0, num_classes)), ``guidance_scale``
    w (w = 1 conditional, w = 0 unconditional; a pytree leaf, so a sweep over w compiles once).
    Options (static):

    * ``interval``: (low, high) where guidance is applied, plain conditional (w = 1) outside
      (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves sample and
      distribution quality in diffusion models"). With ``interval_variable='sigma'`` it is
      the EDM noise level sigma_hat = sigma / alpha = exp(-lambda) in (low, high] (the paper's
      convention, so its numbers transfer to every process); with 'log_snr' the half log-SNR lambda
      in [low, high), the same set for low = -log(high_sigma), high = -log(low_sigma).
    * ``rescale``: phi of rescaled CFG (Lin et al. 2024, "Common diffusion noise schedules and
      sample steps are flawed", Sec. 3.4): the guided prediction is scaled per example
      to the standard deviation of the conditional one and mixed, phi rescaled + (1 - phi) guided
      (phi = 0.7 in the paper; 0 disables). ``rescale_prediction`` says which prediction is
      rescaled: 'x0' (the image whose over-exposure the paper corrects) or 'eps' (as diffusers
      does); the other view follows from x = alpha x0 + sigma eps.
    * ``doubled_batch``: one network pass on the batch [x; x] with labels [y; null] (default, the
      usual choice on accelerators) or two passes (less peak memory). Same values, same cost:
      ``evaluations_per_call`` = 2 x the inner denoiser's.
    """

    denoiser: DenoiserViews
    labels: Array
    guidance_scale: Array | float
    num_classes: int = struct.field(pytree_node=False)
    interval: tuple[float, float] | None = struct.field(pytree_node=False, default=None)
    interval_variable: str = struct.field(pytree_node=False, default="sigma")
    rescale: float = struct.field(pytree_node=False, default=0.0)
    rescale_prediction: str = struct.field(pytree_node=False, default="x0")
    doubled_batch: bool = struct.field(pytree_node=False, default=True)

    def __post_init__(self):
        if not (isinstance(self.num_classes, int) and self.num_classes >= 1):
            raise ValueError(f"num_classes must be an integer >= 1, got {self.num_classes!r}")
        if self.interval_variable not in INTERVAL_VARIABLES:
            raise ValueError(
                f"interval_variable={self.interval_variable!r} is not one of "
                f"{', '.join(INTERVAL_VARIABLES)}"
            )
        if self.interval is not None:
            low, high = (float(bound) for bound in self.interval)
            if not low < high or math.isnan(low) or math.isnan(high):
                raise ValueError(
                    f"interval must be (low, high) with low < high, got {self.interval}"
                )
            if self.interval_variable == "sigma" and low < 0:
                raise ValueError(f"a sigma interval needs low >= 0, got {self.interval}")
        _require_real("rescale", self.rescale, 0.0, 1.0)
        if self.rescale_prediction not in RESCALE_PREDICTIONS:
            raise ValueError(
                f"rescale_prediction={self.rescale_prediction!r} is not one of "
                f"{', '.join(RESCALE_PREDICTIONS)}"
            )
        if not isinstance(self.doubled_batch, bool):
            raise ValueError(f"doubled_batch must be True or False, got {self.doubled_batch!r}")
        if _is_user_leaf(self.labels):
            check_labels(self.labels, self.num_classes)
        if _is_user_leaf(self.guidance_scale):
            _require_real("guidance_scale", self.guidance_scale)

    @property
    def process(self) -> Process:
        return self.denoiser.process

    @property
    def evaluations_per_call(self) -> int:
        """Network evaluations per ``predict`` call: conditional + unconditional."""
        return 2 * evaluations_per_call(self.denoiser)

    def guidance_weight(self, t: ArrayLike) -> Array:
        """w(t): ``guidance_scale`` inside the interval (everywhere without one), 1 outside."""
        if self.interval is None:
            return jnp.asarray(self.guidance_scale)
        low, high = self.interval
        log_snr = self.process.log_snr(t)
        if self.interval_variable == "sigma":
            sigma_hat = jnp.exp(-log_snr)  # EDM's noise level sigma / alpha (Karras et al. 2022)
            inside = (sigma_hat > low) & (sigma_hat <= high)
        else:
            inside = (log_snr >= low) & (log_snr < high)
        return jnp.where(inside, self.guidance_scale, 1.0)

    def conditional_and_unconditional(
        self, x: ArrayLike, t: ArrayLike, **model_kwargs
    ) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
        """((eps, x0) given the labels, (eps, x0) given the null label) at (x, t)."""
        x = jnp.asarray(x)
        batch = x.shape[0]
        labels = jnp.broadcast_to(check_labels(self.labels, self.num_classes), (batch,))
        null = jnp.full_like(labels, self.num_classes)
        if not self.doubled_batch:
            conditional = self.denoiser.predict(x, t, y=labels, **model_kwargs)
            unconditional = self.denoiser.predict(x, t, y=null, **model_kwargs)
            return conditional, unconditional
        t_batch = jnp.broadcast_to(jnp.asarray(t, x.dtype), (batch,))
        eps, x0 = self.denoiser.predict(
            jnp.concatenate([x, x]),
            jnp.concatenate([t_batch, t_batch]),
            y=jnp.concatenate([labels, null]),
            **model_kwargs,
        )
        return (eps[:batch], x0[:batch]), (eps[batch:], x0[batch:])

    def predict(self, x: ArrayLike, t: ArrayLike, **model_kwargs) -> tuple[Array, Array]:
        """Guided (eps, x0) at (x, t): ``evaluations_per_call`` network evaluations."""
        x = jnp.asarray(x)
        (eps_cond, x0_cond), (eps_uncond, x0_uncond) = self.conditional_and_unconditional(
            x, t, **model_kwargs
        )
        t_batch, alpha, sigma = _coefficients(self.process, t, x)
        weight = expand_to(jnp.broadcast_to(self.guidance_weight(t_batch), t_batch.shape), x)
        # Ho & Salimans 2022, eq. 6 with (1 + w') = w.
        eps = eps_uncond + weight * (eps_cond - eps_uncond)
        x0 = x0_uncond + weight * (x0_cond - x0_uncond)
        if self.rescale == 0.0:
            return eps, x0
        # Lin et al. 2024, Sec. 3.4: rescale to the conditional prediction's std, mix with phi.
        guided, conditional = (x0, x0_cond) if self.rescale_prediction == "x0" else (eps, eps_cond)
        std_guided = _std_per_example(guided)  # 0 only for constant (e.g. 1-D) predictions
        ratio = _std_per_example(conditional) / jnp.where(std_guided > 0, std_guided, 1.0)
        rescaled = guided * jnp.where(std_guided > 0, ratio, 1.0)
        mixed = self.rescale * rescaled + (1.0 - self.rescale) * guided
        if self.rescale_prediction == "x0":
            return (x - alpha * mixed) / sigma, mixed
        return mixed, (x - sigma * mixed) / alpha


# ================================================================================ classifier guidance
@struct.dataclass
class Classifier:
    """A noise-conditional classifier p(y | x_t, t) seen as ``logits(x, t)`` for a process.

    ``apply_fn(params, x, t_in)`` returns (B, num_classes) logits; ``time_input`` names how its time
    input is computed from t (``diffusion.parameterization.network_time``). Like ``Denoiser``, a
    pytree whose only leaves are ``params``. The classifier must treat examples independently (no
    batch statistics), so that the gradient of the summed log-likelihoods is each example's own.
    """

    params: Any
    apply_fn: Callable[..., Array] = struct.field(pytree_node=False)
    process: Process = struct.field(pytree_node=False)
    num_classes: int = struct.field(pytree_node=False)
    time_input: str = struct.field(pytree_node=False, default="t")

    def __post_init__(self):
        if not (isinstance(self.num_classes, int) and self.num_classes >= 1):
            raise ValueError(f"num_classes must be an integer >= 1, got {self.num_classes!r}")
        if self.time_input not in TIME_INPUTS:
            raise ValueError(
                f"unknown time_input {self.time_input!r}; accepted: {', '.join(TIME_INPUTS)}"
            )

    def logits(self, x: ArrayLike, t: ArrayLike) -> Array:
        """(B, num_classes) logits of p(y | x_t = x, t)."""
        x = jnp.asarray(x)
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        return self.apply_fn(self.params, x, network_time(self.process, t, self.time_input))

    def log_prob(self, x: ArrayLike, t: ArrayLike, labels: ArrayLike) -> Array:
        """log p(y = labels | x_t = x, t) per row, (B,)."""
        x = jnp.asarray(x)
        labels = jnp.broadcast_to(check_labels(labels, self.num_classes), x.shape[:1])
        log_probs = jax.nn.log_softmax(self.logits(x, t), axis=-1)
        return jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]

    def log_prob_gradient(self, x: ArrayLike, t: ArrayLike, labels: ArrayLike) -> Array:
        """grad_x log p(y | x_t = x, t) per row: one forward and one backward pass."""
        return jax.grad(lambda inputs: jnp.sum(self.log_prob(inputs, t, labels)))(jnp.asarray(x))


@struct.dataclass
class ClassifierGuidance(DenoiserViews):
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 1-2) in score form, for every sampler.

    score = score(x, t) + s grad_x log p(y | x_t, t). Since score = -eps / sigma, the eps prediction
    becomes eps - s sigma grad (their Alg. 2, eps_hat = eps - sqrt(1 - abar) grad, sigma =
    sqrt(1 - abar) for VP), and the x0 prediction (x - sigma eps) / alpha becomes
    x0 + s (sigma^2 / alpha) grad. Through the ancestral step's posterior mean this shifts the mean
    by coef_x0 s (sigma^2 / alpha) grad, which is their Alg. 1's s Sigma grad to first order in the
    step size (for DDPM's step t -> t - 1: s beta_t / sqrt(1 - beta_t) grad vs s beta_t grad).

    ``denoiser`` is any denoiser (unconditional, or e.g. a ``ClassifierFreeGuidance`` with w = 1 for
    a conditional model, as Dhariwal & Nichol also do); ``classifier`` a ``Classifier`` on the
    same process; ``labels`` (B,) or scalar ints; ``classifier_scale`` s (a pytree leaf).
    """

    denoiser: DenoiserViews
    classifier: Classifier
    labels: Array
    classifier_scale: Array | float

    def __post_init__(self):
        if self.classifier.process != self.denoiser.process:
            raise ValueError(
                f"the classifier's process {self.classifier.process!r} differs from the "
                f"denoiser's {self.denoiser.process!r}"
            )
        if _is_user_leaf(self.labels):
            check_labels(self.labels, self.classifier.num_classes)
        if _is_user_leaf(self.classifier_scale):
            _require_real("classifier_scale", self.classifier_scale)

    @property
    def process(self) -> Process:
        return self.denoiser.process

    @property
    def evaluations_per_call(self) -> int:
        """Denoiser network evaluations per call (the classifier's are counted separately)."""
        return evaluations_per_call(self.denoiser)

    @property
    def classifier_gradients_per_call(self) -> int:
        """Classifier forward + backward passes per ``predict`` call."""
        return 1

    def predict(self, x: ArrayLike, t: ArrayLike, **model_kwargs) -> tuple[Array, Array]:
        """Guided (eps, x0) at (x, t)."""
        x = jnp.asarray(x)
        eps, x0 = self.denoiser.predict(x, t, **model_kwargs)
        gradient = self.classifier.log_prob_gradient(x, t, self.labels)
        _, alpha, sigma = _coefficients(self.process, t, x)
        scale = self.classifier_scale
        return eps - scale * sigma * gradient, x0 + scale * (sigma**2 / alpha) * gradient


# ================================================================================ noisy classifier
def init_classifier(
    module: Any,
    key: Array,
    process: Process,
    example_x: ArrayLike,
    *,
    num_classes: int,
    time_input: str = "t",
) -> Classifier:
    """A ``Classifier`` of a Flax ``module(x, t_in) -> logits`` with freshly initialised params."""
    example_x = jnp.asarray(example_x)[:1]
    t_in = network_time(process, jnp.full((1,), process.T, example_x.dtype), time_input)
    params = jax.jit(module.init)(key, example_x, t_in)["params"]  # one compile, not op by op
    return Classifier(
        params=params,
        apply_fn=_FlaxApply(module),
        process=process,
        num_classes=num_classes,
        time_input=time_input,
    )


@dataclasses.dataclass(frozen=True)
class _FlaxApply:
    """``apply_fn(params, x, t_in)`` of a Flax module (hashable, so jitted programs are reused)."""

    module: Any

    def __call__(self, params: Any, x: Array, t_in: Array) -> Array:
        return self.module.apply({"params": params}, x, t_in)


def noisy_classifier_loss(
    classifier: Classifier,
    key: Array,
    x0: ArrayLike,
    labels: ArrayLike,
    *,
    time_sampling: str = "uniform",
) -> Array:
    """Cross-entropy of p(y | x_t, t) on noised data x_t ~ q(x_t | x_0), t drawn by ``time_sampling``.

    The training objective of Dhariwal & Nichol 2021 (Sec. 4: the classifier is trained on noised
    images at the diffusion model's noise levels), for any process: t from
    ``diffusion.losses.sample_time`` (its importance weights multiply the per-example loss), x_t =
    alpha x_0 + sigma eps.
    """
    x0 = jnp.asarray(x0)
    labels = check_labels(labels, classifier.num_classes)
    key_time, key_noise = jax.random.split(key)
    t, weight = sample_time(time_sampling, classifier.process, key_time, x0.shape[0], x0.dtype)
    x_t, _ = classifier.process.sample_marginal(key_noise, x0, t)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(
        classifier.logits(x_t, t), labels
    )
    return jnp.mean(weight * cross_entropy)


def train_noisy_classifier(
    classifier: Classifier,
    key: Array,
    x0: ArrayLike,
    labels: ArrayLike,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    time_sampling: str = "uniform",
    weight_decay: float = 0.0,
) -> Classifier:
    """Train ``classifier`` (e.g. from ``init_classifier``) with ``noisy_classifier_loss``.

    Adam (AdamW with ``weight_decay``; Loshchilov & Hutter 2019) with a cosine decay from
    ``learning_rate`` to 0 over ``steps``; each step draws a minibatch of (x0, labels) uniformly
    with replacement. Pure and deterministic given ``key``; returns the classifier with trained
    params.
    """
    x0 = jnp.asarray(x0)
    labels = check_labels(labels, classifier.num_classes)
    if labels.shape != x0.shape[:1]:
        raise ValueError(f"labels must have shape {x0.shape[:1]}, got {labels.shape}")
    require_int("steps", steps)
    require_int("batch_size", batch_size)
    _require_real("learning_rate", learning_rate, 0.0)
    _require_real("weight_decay", weight_decay, 0.0)
    optimizer = optax.adamw(
        optax.cosine_decay_schedule(learning_rate, steps), weight_decay=weight_decay
    )

    def loss_fn(params, step_key, x_batch, label_batch):
        return noisy_classifier_loss(
            classifier.replace(params=params),
            step_key,
            x_batch,
            label_batch,
            time_sampling=time_sampling,
        )

    # A Python loop over a jitted step, as diffusion.models.classifier.train_classifier (measured
    # faster than a lax.scan over steps on XLA:CPU there).
    @jax.jit
    def train_step(params, opt_state, step_key, x0, labels):
        index_key, loss_key = jax.random.split(step_key)
        rows = jax.random.randint(index_key, (batch_size,), 0, x0.shape[0])
        grads = jax.grad(loss_fn)(params, loss_key, x0[rows], labels[rows])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = classifier.params
    opt_state = optimizer.init(params)
    for step_key in jax.random.split(key, steps):
        params, opt_state = train_step(params, opt_state, step_key, x0, labels)
    return classifier.replace(params=params)


# ================================================================================ inpainting
@struct.dataclass
class Inpainting(DenoiserViews):
    """Inpainting / imputation: sample the unknown part of x given ``known`` values where ``mask``.

    ``mask`` (True or 1 where known) and ``known`` broadcast against the samples (e.g. a (H, W, C)
    mask from ``inpainting_mask`` and (B, H, W, C) known images; values outside the mask are
    ignored). The predictions are (see the module docstring):

    * known coordinates: x0 = known, eps = (x - alpha known) / sigma (the exact denoiser of the
      point mass at the known value);
    * unknown coordinates: the inner denoiser's at the sampler's state x, or, with
      ``replacement_key``, at x with its known part replaced by alpha_t known + sigma_t z, z drawn
      from (replacement_key, t, row) (score_sde's ``get_pc_inpainter``, Song et al. 2021, App. I.2).

    The known part of the final samples is the sampler's noised copy (or exactly ``known`` after
    ``denoise_final``): ``paste(samples)`` writes the known values in.
    """

    denoiser: DenoiserViews
    known: Array
    mask: Array
    replacement_key: Array | None = None

    @property
    def process(self) -> Process:
        return self.denoiser.process

    @property
    def evaluations_per_call(self) -> int:
        return evaluations_per_call(self.denoiser)

    def _replacement_noise(self, t_batch: Array, x: Array) -> Array:
        """z ~ N(0, I) per row, a deterministic function of (replacement_key, t, row index)."""
        time_bits = jax.lax.bitcast_convert_type(t_batch.astype(jnp.float32), jnp.uint32)

        def row_noise(bits, row, like):
            row_key = jax.random.fold_in(jax.random.fold_in(self.replacement_key, bits), row)
            return jax.random.normal(row_key, like.shape, like.dtype)

        return jax.vmap(row_noise)(time_bits, jnp.arange(x.shape[0]), x)

    def predict(self, x: ArrayLike, t: ArrayLike, **model_kwargs) -> tuple[Array, Array]:
        """(eps, x0) with the known part pinned to ``known`` (one inner ``predict`` call)."""
        x = jnp.asarray(x)
        t_batch, alpha, sigma = _coefficients(self.process, t, x)
        mask = jnp.broadcast_to(jnp.asarray(self.mask), x.shape).astype(bool)
        known = jnp.broadcast_to(jnp.asarray(self.known, x.dtype), x.shape)
        x_in = x
        if self.replacement_key is not None:
            noised = alpha * known + sigma * self._replacement_noise(t_batch, x)
            x_in = jnp.where(mask, noised, x)
        eps, x0 = self.denoiser.predict(x_in, t, **model_kwargs)
        eps_known = (x - alpha * known) / sigma
        return jnp.where(mask, eps_known, eps), jnp.where(mask, known, x0)

    def paste(self, samples: ArrayLike) -> Array:
        """``samples`` with the known values written in where ``mask``."""
        samples = jnp.asarray(samples)
        mask = jnp.broadcast_to(jnp.asarray(self.mask), samples.shape).astype(bool)
        return jnp.where(mask, jnp.asarray(self.known, samples.dtype), samples)


MASKS = (
    "left_half",
    "right_half",
    "top_half",
    "bottom_half",
    "center_square",
    "outside_center_square",
    "alternate_rows",
)


def inpainting_mask(name: str, shape: Sequence[int]) -> np.ndarray:
    """Boolean mask of one example's ``shape``, True where KNOWN; ``name`` names the region to fill.

    Images (H, W) or (H, W, C): 'left_half' / 'right_half' / 'top_half' / 'bottom_half' (that half
    is generated; odd sizes generate the larger half), 'center_square' (a central square of side
    min(H, W) // 2 is generated), 'outside_center_square' (only that square is known: outpainting),
    'alternate_rows' (every other row, starting with row 0, is generated; RePaint's "alternating
    lines"). Vectors (D,): 'left_half' / 'right_half' generate the first / last ceil(D / 2)
    coordinates.
    """
    if name not in MASKS:
        raise ValueError(f"unknown mask {name!r}; accepted: {', '.join(MASKS)}")
    shape = tuple(int(size) for size in shape)
    if len(shape) == 1:
        if name not in ("left_half", "right_half") or shape[0] < 2:
            raise ValueError(
                f"a vector shape {shape} takes 'left_half' or 'right_half' (dim >= 2), got {name!r}"
            )
        hole = math.ceil(shape[0] / 2)
        known = np.ones(shape, bool)
        known[slice(0, hole) if name == "left_half" else slice(shape[0] - hole, None)] = False
        return known
    if len(shape) not in (2, 3) or min(shape[:2]) < 2:
        raise ValueError(
            f"mask shape must be (D,), (H, W) or (H, W, C) with H, W >= 2, got {shape}"
        )
    height, width = shape[:2]
    rows, columns = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    side = min(height, width) // 2
    top, left = (height - side) // 2, (width - side) // 2
    in_square = (rows >= top) & (rows < top + side) & (columns >= left) & (columns < left + side)
    holes = {
        "left_half": columns < math.ceil(width / 2),
        "right_half": columns >= width - math.ceil(width / 2),
        "top_half": rows < math.ceil(height / 2),
        "bottom_half": rows >= height - math.ceil(height / 2),
        "center_square": in_square,
        "outside_center_square": ~in_square,
        "alternate_rows": rows % 2 == 0,
    }
    known = ~holes[name]
    return np.broadcast_to(known[..., None], shape).copy() if len(shape) == 3 else known


def coordinate_mask(dim: int, known_indices: Sequence[int]) -> np.ndarray:
    """(dim,) boolean mask, True at ``known_indices`` (imputation of toy data)."""
    indices = np.asarray(known_indices, dtype=int).reshape(-1)
    if indices.size == 0 or indices.min() < 0 or indices.max() >= dim:
        raise ValueError(f"known_indices must be non-empty indices in [0, {dim}), got {indices}")
    known = np.zeros(dim, bool)
    known[indices] = True
    return known


# ================================================================================ RePaint
def repaint(
    name: str,
    denoiser: DenoiserViews,
    key: Array,
    x_init: ArrayLike,
    times: ArrayLike,
    *,
    jump_length: int = 1,
    resamplings: int = 1,
    denoise_final: bool = False,
    **options,
) -> SampleResult:
    """RePaint's resampling (Lugmayr et al. 2022, Alg. 1 and Sec. 4.2) around any registered sampler.

    The grid ``times`` (num_steps + 1 decreasing times) is cut into blocks of ``jump_length`` steps.
    Each block is sampled ``resamplings`` times: the sampler ``name`` (with ``options``) runs down
    the block, and, before every repetition but the last, the state is noised back to the block's
    first time with the forward kernel q(x_t | x_s) = N(alpha_t / alpha_s x_s, sigma_t^2 (1 -
    SNR_t / SNR_s) I) (``process.transition``; RePaint's jumps of j forward steps in one draw,
    which has the same law). ``resamplings = 1`` is plain sampling. Meant for an ``Inpainting``
    denoiser (the forward jump keeps its known coordinates distributed as q(x_t | x_0 = known)).

    Block i, repetition r uses ``split(split(key, num_blocks)[i], resamplings)[r]``, split again
    into the sampler's key and the jump's noise. NFE = resamplings x the sampler's NFE on the grid
    (exact sum of the runs' counts). One compiled program (a ``lax.scan`` over blocks and
    repetitions), cached by (name, options, jump_length, resamplings, denoise_final).
    """
    spec = get_sampler(name)
    full_options = spec.check_options(options)
    require_int("jump_length", jump_length)
    require_int("resamplings", resamplings)
    if not isinstance(denoise_final, bool):
        raise ValueError(f"denoise_final must be True or False, got {denoise_final!r}")
    x_init = jnp.asarray(x_init)
    times = jnp.asarray(times, x_init.dtype)
    if times.ndim != 1 or times.shape[0] < 2:
        raise ValueError(f"times must be a 1-D grid of at least 2 times, got shape {times.shape}")
    if num_steps_of(times) % jump_length:
        raise ValueError(
            f"num_steps={num_steps_of(times)} must be a multiple of jump_length={jump_length}"
        )
    option_items = tuple(sorted(full_options.items()))
    program = _repaint_program(name, option_items, jump_length, resamplings, denoise_final)
    return program(denoiser, key, x_init, times)


@functools.cache
def _repaint_program(
    name: str,
    option_items: tuple[tuple[str, Any], ...],
    jump_length: int,
    resamplings: int,
    denoise_final: bool,
) -> Callable[..., SampleResult]:
    spec = get_sampler(name)
    options = dict(option_items)

    def program(denoiser, key, x_init, times):
        process = denoiser.process
        num_blocks = num_steps_of(times) // jump_length

        def block(carry, inputs):
            start, block_key = inputs
            block_times = jax.lax.dynamic_slice(times, (start,), (jump_length + 1,))
            scale, std = process.transition(block_times[-1], block_times[0])

            def repetition(state, repetition_inputs):
                x, nfe = state
                index, repetition_key = repetition_inputs
                sampler_key, jump_key = jax.random.split(repetition_key)
                result = spec.fn(denoiser, sampler_key, x, block_times, **options)
                x_down = result.samples.astype(x.dtype)
                # Lugmayr et al. 2022, Alg. 1 line 10 (j steps at once): x_t ~ q(x_t | x_s).
                noise = jax.random.normal(jump_key, x.shape, x.dtype)
                x_up = (scale * x_down + std * noise).astype(x.dtype)
                x_next = jnp.where(index < resamplings - 1, x_up, x_down)
                return (x_next, nfe + result.nfe), None

            repetition_keys = jax.random.split(block_key, resamplings)
            carry, _ = jax.lax.scan(repetition, carry, (jnp.arange(resamplings), repetition_keys))
            return carry, None

        starts = jnp.arange(num_blocks) * jump_length
        initial = (x_init, jnp.asarray(0, jnp.int32))
        (samples, nfe), _ = jax.lax.scan(
            block, initial, (starts, jax.random.split(key, num_blocks))
        )
        result = SampleResult(samples=samples, nfe=nfe)
        if denoise_final:
            result = final_denoise(denoiser, result, times)
        return result

    return jax.jit(program)
