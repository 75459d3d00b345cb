"""From a config to library objects, one way: validation first (every bad key named), then construction.

``build(config)`` checks the whole config before anything heavy happens (no dataset is read, no
network initialised, nothing compiled) and raises ``ConfigError`` naming the offending key; then it
returns an ``Experiment``: the process, the network, the denoiser (built once; the loss and the
samplers take it and replace its params), the loss, the optimiser and its schedule, and frozen
settings for training, sampling, evaluation and data. Nothing downstream reads the config again: the
experiment keeps it only as ``record``, the JSON that DIR/config.json stores (DESIGN.md: config ->
objects built once here -> pure library functions).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffusion import data, guidance, losses, optim, oracle, parallel, samplers, variational
from diffusion.models import MLP, UNet
from diffusion.models.noisy_classifier import NoisyClassifier
from diffusion.models.unet import REMAT_POLICIES, level_resolutions
from diffusion.parameterization import Denoiser, DenoiserViews
from diffusion.processes import PROCESSES, Process, make_process
from diffusion.variational import LearnedSchedule, ReverseModel

__all__ = [
    "ConfigError",
    "DataSettings",
    "EvalSettings",
    "Experiment",
    "SamplingSettings",
    "Stream",
    "TrainingSettings",
    "build",
    "config_to_json",
]

MODELS = ("unet", "mlp")
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}  # None: the U-Net's float32 default
FEATURE_EXTRACTORS = ("classifier", "inception", "none")
_IMAGE_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
IMAGE_CLASSES = (
    10  # every labelled dataset of diffusion.data (MNIST, Fashion-MNIST, CIFAR-10, digits)
)
LEARNED_PROCESS = "learned"  # Kingma et al. 2021's schedule (diffusion.variational.LearnedSchedule)
VLB_WEIGHTINGS = ("hybrid", "vlb")  # losses of diffusion.variational, beside DenoisingLoss's


class ConfigError(ValueError):
    """A config key has a bad value, or keys combine impossibly; the message names the key(s)."""


class Stream(enum.IntEnum):
    """The PRNG streams of an experiment: stream s draws from fold_in(PRNGKey(seed), s)."""

    INIT = 0  # network initialisation
    TRAIN = 1  # the train state's base key (each step folds in its number)
    SNAPSHOT = 2  # training snapshots (each folds in its step)
    SAMPLE = 3  # --mode=sample
    EVAL = 4  # --mode=eval
    SWEEP = 5  # --mode=sweep
    CLASSIFIER = 6  # the noise-conditional classifier of classifier guidance
    ANALYTIC = 7  # the Monte Carlo estimate of the analytic variance's Gamma_t


def _wrap(section: str, build_fn: Callable[[], Any]) -> Any:
    """Run ``build_fn`` and turn a library ValueError into a ConfigError naming ``section``."""
    try:
        return build_fn()
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise ConfigError(f"config.{section}: {error}") from None


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key}: {message}")


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """The config as pretty JSON (tuples become lists), for config.json in the workdir."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


# ============================================================================= settings
@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    """How long and how a run trains, logs, saves and looks (config.training)."""

    batch_size: int
    n_iters: int
    log_freq: int
    checkpoint_freq: int
    keep_checkpoints: int
    snapshot_freq: int
    snapshot_sampling: bool
    snapshot_num_samples: int
    ema_decay: float
    ema_warmup: bool
    parallelism: str
    steps_per_call: int
    max_nonfinite_steps: int


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """The sampler and its grid (config.sampling): ``sample`` draws with them."""

    method: str
    grid: str
    num_steps: int
    t_end: float | None
    rho: float | None  # of the karras and flow_t grids (None: their default)
    denoise_final: bool
    denoise_order: int  # of the final step to sigma = 0 (1: Tweedie's step)
    options: Mapping[str, Mapping[str, Any]]  # sampler name -> its options
    num_samples: int
    batch_size: int
    labels: str  # 'all', '3' or '0,4,7' (sampling_labels reads it)
    guidance_scale: float
    guidance_interval: tuple[float, float] | None
    guidance_rescale: float
    classifier_scale: float
    noisy_classifier_steps: int
    noisy_classifier_batch_size: int
    noisy_classifier_learning_rate: float
    noisy_classifier_channels: tuple[int, ...]
    noisy_classifier_num_blocks: int
    inpaint_mask: str | None
    inpaint_resamplings: int
    inpaint_jump_length: int
    reverse_variance: str | None

    def options_of(self, method: str) -> dict[str, Any]:
        """The configured options of sampler ``method`` (its registry defaults if none)."""
        return dict(self.options.get(method, {}))

    @property
    def repaints(self) -> bool:
        """Whether inpainting resamples (RePaint, Lugmayr et al. 2022) instead of one pass."""
        return self.inpaint_resamplings > 1 or self.inpaint_jump_length > 1


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What --mode=eval and --mode=sweep compute (config.eval)."""

    batch_size: int
    num_samples: int
    bpd: bool
    bpd_num_examples: int
    bpd_rtol: float
    feature_extractor: str
    inception_weights: str | None
    classifier_steps: int
    classifier_batch_size: int
    classifier_learning_rate: float
    classifier_max_shift: int
    classifier_weight_decay: float
    sweep_solvers: tuple[str, ...]
    sweep_nfes: tuple[int, ...]
    sweep_grids: tuple[str, ...]
    sweep_num_samples: int
    sweep_denoise_final: bool
    sweep_denoise_order: int
    sweep_trajectory_nfe: int
    guidance_scales: tuple[float, ...]
    vlb: bool
    vlb_num_examples: int
    vlb_num_terms: int
    analytic_num_batches: int
    analytic_num_times: int


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Where the data comes from and how it is presented (config.data)."""

    dataset: str
    data_dir: str | None
    idx_dir: str | None
    data_range: tuple[float, float]
    dequantize: bool
    random_flip: bool

    @property
    def is_toy(self) -> bool:
        return self.dataset in (*data.TOY_DATASETS, *data.ORACLE_PRESETS)

    @property
    def has_oracle(self) -> bool:
        """Whether the data is an oracle preset (exact scores and likelihoods known)."""
        return self.dataset in data.ORACLE_PRESETS


def _settings(cls: type, section: ml_collections.ConfigDict, **computed: Any) -> Any:
    """``cls`` filled from the config section's keys of the same names (sequences as tuples)."""
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in computed:
            continue
        value = section[field.name]
        values[field.name] = tuple(value) if isinstance(value, list | tuple) else value
    return cls(**values, **computed)


# ============================================================================= the experiment
EpsSqNormTable = tuple[np.ndarray, np.ndarray]  # (increasing times, Gamma_t at them)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything a mode of experiments/run.py needs, built once from a validated config."""

    record: Mapping[str, Any]  # the config as JSON values: what DIR/config.json records
    seed: int
    process: Process  # a LearnedSchedule here is a template: ``denoiser_for`` gives the trained one
    model: Any  # a flax.linen Module (UNet or MLP)
    denoiser: Denoiser  # params=None: ``denoiser_for(params)`` (or ``.replace(params=...)``)
    loss: losses.DenoisingLoss | variational.HybridLoss | variational.VDMLoss
    optimizer: optax.GradientTransformation
    learning_rate_fn: optax.Schedule
    data_shape: tuple[int, ...]  # one example, e.g. (28, 28, 1) or (2,)
    data: DataSettings
    training: TrainingSettings
    sampling: SamplingSettings
    eval: EvalSettings
    num_classes: int | None = None  # a class-conditional network's classes (model.num_classes)
    label_classes: int | None = None  # classes sampling labels refer to (conditional or guided)
    variance: str = "fixed_small"  # model.variance: the network's reverse-variance rule
    vlb_decoder: str = "gaussian"  # the decoder of the variational bound for this data
    classifier_module: NoisyClassifier | None = None  # classifier guidance's p(y | x_t, t)

    @property
    def is_toy(self) -> bool:
        return self.data.is_toy

    @property
    def data_range(self) -> tuple[float, float]:
        return self.data.data_range

    @property
    def learned_schedule(self) -> bool:
        """Whether the process is a learned schedule (params = {'denoiser', 'schedule'})."""
        return isinstance(self.process, LearnedSchedule)

    @property
    def learned_variance(self) -> bool:
        """Whether the network outputs 2C channels (prediction and variance interpolation v)."""
        return self.variance == "learned"

    def key(self, stream: Stream) -> jax.Array:
        """The PRNG key of ``stream`` (see ``Stream``)."""
        return jax.random.fold_in(jax.random.PRNGKey(self.seed), int(stream))

    # ------------------------------------------------------------------------- the network
    def init_params(self, key: jax.Array) -> Any:
        """Fresh parameters (jitted init on a batch of one): the network's variables, or with a
        learned schedule {'denoiser': variables, 'schedule': its monotone network's parameters}."""
        dummy_x = np.zeros((1, *self.data_shape), np.float32)
        dummy_t = np.zeros((1,), np.float32)
        network = jax.jit(self.model.init)(key, dummy_x, dummy_t)
        if not self.learned_schedule:
            return network
        num_hidden = int(np.shape(self.process.params["hidden_weight"])[-1])
        schedule_key = jax.random.fold_in(key, 1)
        schedule = variational.init_schedule_params(schedule_key, num_hidden, dtype=jnp.float32)
        return {"denoiser": network, "schedule": schedule}

    def param_count(self) -> int:
        shapes = jax.eval_shape(self.init_params, jax.random.PRNGKey(0))
        return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)))

    def denoiser_for(self, params: Any) -> Denoiser:
        """The network with ``params`` as a ``Denoiser``; with a learned schedule its process is the
        schedule of ``params['schedule']`` (e.g. the EMA parameters of a checkpoint)."""
        if not self.learned_schedule:
            return self.denoiser.replace(params=params)
        process = dataclasses.replace(self.process, params=params["schedule"])
        return self.denoiser.replace(params=params["denoiser"], process=process)

    def predictor(self, params: Any) -> DenoiserViews:
        """The (eps, x0) predictions of ``params``, what samplers, likelihoods and metrics use: the
        ``Denoiser``, or for a learned-variance network (2C outputs) a ``ReverseModel`` of it."""
        denoiser = self.denoiser_for(params)
        if self.learned_variance:
            return ReverseModel(denoiser=denoiser, variance="learned")
        return denoiser

    def reverse_model(
        self,
        params: Any,
        variance: str | None = None,
        eps_sq_norm: EpsSqNormTable | None = None,
    ) -> ReverseModel:
        """The network with its reverse kernels (diffusion.variational.ReverseModel) under rule
        ``variance`` (default: sampling.reverse_variance, else model.variance); 'analytic' needs the
        table (times, Gamma_t) of ``analytic_times`` (experiments.sample.load_or_estimate_eps_sq_norm)."""
        rule = variance or self.sampling.reverse_variance or self.variance
        times, values = (None, None) if eps_sq_norm is None else eps_sq_norm
        if rule == "analytic" and eps_sq_norm is None:
            raise ValueError(
                "the 'analytic' variance needs Gamma_t: pass eps_sq_norm "
                "(experiments.sample.load_or_estimate_eps_sq_norm)"
            )
        lo, hi = self.data_range
        return ReverseModel(
            denoiser=self.denoiser_for(params),
            variance=rule,
            eps_sq_norm=None if values is None else jnp.asarray(values, jnp.float32),
            eps_sq_norm_times=None if times is None else jnp.asarray(times, jnp.float32),
            # Bao et al. 2022, Thm. 2: E Var[x_0 | x_t] <= ((hi - lo)/2)^2 for data in [lo, hi].
            max_x0_variance=None if self.is_toy else ((hi - lo) / 2.0) ** 2,
            outputs_variance=self.learned_variance,
        )

    def analytic_times(self) -> np.ndarray:
        """The times of the analytic variance's Gamma table: the chain (discrete processes) or
        eval.analytic_num_times uniform times on [t_min, T]; Gamma is interpolated between them."""
        if self.process.is_discrete:
            return np.asarray(self.process.chain_times, np.float64)
        return np.linspace(self.process.t_min, self.process.T, self.eval.analytic_num_times)

    # ------------------------------------------------------------------------- sampling
    def sampling_labels(self, num: int) -> np.ndarray | None:
        """(num,) labels of sampling.labels grouped by class (one grid row per class), or None when
        sampling is unconditional and unguided."""
        if self.label_classes is None:
            return None
        spec = _label_spec(self.sampling.labels)
        return guidance.sampling_labels(spec, self.label_classes, num)

    def uses_model_variance(self, method: str | None = None, options: dict | None = None) -> bool:
        """Whether sampler ``method`` with ``options`` (default: the configured ones) draws from the
        model's own reverse kernels (ancestral with variance='model')."""
        method = method or self.sampling.method
        options = self.sampling.options_of(method) if options is None else options
        return method == "ancestral" and options.get("variance") == "model"

    def needs_eps_sq_norm(self, method: str | None = None, options: dict | None = None) -> bool:
        """Whether sampling needs the analytic variance's Gamma table."""
        rule = self.sampling.reverse_variance or self.variance
        return self.uses_model_variance(method, options) and rule == "analytic"

    def guided(
        self,
        denoiser: DenoiserViews,
        labels: Any = None,
        *,
        guidance_scale: float | None = None,
        classifier: guidance.Classifier | None = None,
        known: Any = None,
    ) -> DenoiserViews:
        """``denoiser`` wrapped for conditional sampling (diffusion.guidance): classifier-free
        guidance of a conditional model at ``guidance_scale`` (default sampling.guidance_scale, with
        sampling.guidance_interval and guidance_rescale), then classifier guidance at
        sampling.classifier_scale when a ``classifier`` is given, then inpainting of ``known`` values
        (the mask of sampling.inpaint_mask) when given."""
        sampling = self.sampling
        if self.num_classes is not None:
            scale = sampling.guidance_scale if guidance_scale is None else guidance_scale
            interval = sampling.guidance_interval
            denoiser = guidance.ClassifierFreeGuidance(
                denoiser=denoiser,
                labels=jnp.asarray(labels, jnp.int32),
                guidance_scale=float(scale),
                num_classes=self.num_classes,
                interval=None if interval is None else tuple(float(v) for v in interval),
                rescale=float(sampling.guidance_rescale),
            )
        if classifier is not None:
            denoiser = guidance.ClassifierGuidance(
                denoiser=denoiser,
                classifier=classifier,
                labels=jnp.asarray(labels, jnp.int32),
                classifier_scale=float(sampling.classifier_scale),
            )
        if known is not None:
            denoiser = guidance.Inpainting(
                denoiser=denoiser, known=jnp.asarray(known), mask=jnp.asarray(self.inpaint_mask())
            )
        return denoiser

    def inpaint_mask(self) -> np.ndarray:
        """The known-part mask of sampling.inpaint_mask for one example (True where known)."""
        if self.sampling.inpaint_mask is None:
            raise ValueError("config.sampling.inpaint_mask is not set")
        return guidance.inpainting_mask(self.sampling.inpaint_mask, self.data_shape)

    def evaluations_per_call(self) -> int:
        """Network evaluations per sampler call of the configured wrappers (2 with classifier-free
        guidance: conditional and unconditional, one pass on a doubled batch)."""
        labels = np.zeros((1,), np.int32) if self.label_classes is not None else None
        return guidance.evaluations_per_call(self.guided(self.denoiser, labels))

    def sample(
        self,
        params: Any,
        key: jax.Array,
        num: int,
        *,
        labels: Any = None,
        known: Any = None,
        guidance_scale: float | None = None,
        classifier: guidance.Classifier | None = None,
        eps_sq_norm: EpsSqNormTable | None = None,
        method: str | None = None,
        num_steps: int | None = None,
        grid: str | None = None,
        options: dict | None = None,
    ) -> samplers.SampleResult:
        """``num`` samples from the EMA ``params`` with the configured (or overridden) sampler.

        A conditional model samples ``labels`` (default ``sampling_labels(num)``) with classifier-free
        guidance; ``classifier`` adds classifier guidance; ``known`` ((num, *data_shape) values)
        inpaints the sampling.inpaint_mask region (RePaint's resampling with sampling.inpaint_*), and
        the result has the known values pasted in. Ancestral sampling with variance='model' draws
        from ``reverse_model`` (``eps_sq_norm``: the analytic variance's table). ``nfe`` counts
        sampler calls; network evaluations are nfe x ``evaluations_per_call()``.
        """
        sampling = self.sampling
        method = method or sampling.method
        options = sampling.options_of(method) if options is None else dict(options)
        if self.uses_model_variance(method, options):
            base = self.reverse_model(params, eps_sq_norm=eps_sq_norm)
        else:
            base = self.predictor(params)
        if labels is None:
            labels = self.sampling_labels(num)
        denoiser = self.guided(
            base, labels, guidance_scale=guidance_scale, classifier=classifier, known=known
        )
        grid = grid or sampling.grid
        num_steps = num_steps or sampling.num_steps
        if known is not None and sampling.repaints:
            times = samplers.time_grid(
                denoiser.process, grid, num_steps, t_end=sampling.t_end, rho=sampling.rho
            )
            prior_key, key = jax.random.split(key)
            x_init = denoiser.process.prior_sample(prior_key, (num, *self.data_shape))
            result = guidance.repaint(
                method,
                denoiser,
                key,
                x_init,
                times,
                jump_length=sampling.inpaint_jump_length,
                resamplings=sampling.inpaint_resamplings,
                denoise_final=bool(sampling.denoise_final),
                **options,
            )
        else:
            result = samplers.sample(
                method,
                denoiser,
                key,
                (num, *self.data_shape),
                grid=grid,
                num_steps=num_steps,
                t_end=sampling.t_end,
                rho=sampling.rho,
                denoise_final=bool(sampling.denoise_final),
                denoise_order=int(sampling.denoise_order),
                **options,
            )
        if known is not None:
            result = result.replace(samples=denoiser.paste(result.samples))
        return result

    # ------------------------------------------------------------------------- data
    def data_source(self) -> Callable[[int], dict[str, np.ndarray]]:
        """``batch_fn(step)``: this process's training batch at ``step`` (pure in (seed, step))."""
        kwargs = dict(
            batch_size=self.training.batch_size,
            seed=self.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        if self.is_toy:
            name = self.data.dataset
            return lambda step: {"x": data.toy_batch(name, step=step, **kwargs)}
        dataset = self.load_split("train")
        return lambda step: data.image_batch(
            dataset,
            step=step,
            data_range=self.data_range,
            dequantize=self.data.dequantize,
            random_flip=self.data.random_flip,
            **kwargs,
        )

    def load_split(self, split: str) -> data.ImageDataset:
        """An image split (raises data.DatasetNotFoundError with its remedies when missing)."""
        return data.load_dataset(
            self.data.dataset, split, data_dir=self.data.data_dir, idx_dir=self.data.idx_dir
        )


# ============================================================================= validation + build
def _data_shape(config: ml_collections.ConfigDict) -> tuple[tuple[int, ...], bool]:
    dataset = config.data.dataset
    toy_names = (*data.TOY_DATASETS, *data.ORACLE_PRESETS)
    accepted = (*data.IMAGE_DATASETS, *toy_names)
    _require(
        dataset in accepted, "data.dataset", f"{dataset!r} is not one of {', '.join(accepted)}"
    )
    if config.data.idx_dir is not None:
        _require(
            dataset in data.IDX_DATASETS,
            "data.idx_dir",
            f"IDX files hold only {', '.join(data.IDX_DATASETS)}, not {dataset!r}",
        )
    if dataset in toy_names:
        dim = 2 if dataset in data.TOY_DATASETS else oracle.preset(dataset).dim
        return (dim,), True
    if dataset == "digits":
        return (8, 8, 1), False
    return _IMAGE_SHAPES[dataset], False


def _process(config: ml_collections.ConfigDict) -> Process:
    """The process; process.name='learned' is a LearnedSchedule template (linear until trained)."""
    fields = dict(config.process)
    name = fields.pop("name")
    accepted = (*PROCESSES, LEARNED_PROCESS)
    _require(name in accepted, "process.name", f"{name!r} is not one of {', '.join(accepted)}")
    if name == LEARNED_PROCESS:
        num_hidden = int(fields.pop("num_hidden", 1024))
        return _wrap(
            "process",
            lambda: LearnedSchedule(
                params=variational.linear_schedule_params(num_hidden, jnp.float32),
                **{key: float(value) for key, value in fields.items()},
            ),
        )
    return _wrap("process", lambda: make_process(name, **fields))


def _model(config: ml_collections.ConfigDict, data_shape: tuple[int, ...], is_toy: bool):
    model_config = config.model
    _require(
        model_config.name in MODELS,
        "model.name",
        f"{model_config.name!r} is not one of {', '.join(MODELS)}",
    )
    expected = "mlp" if is_toy else "unet"
    _require(
        model_config.name == expected,
        "model.name",
        f"{model_config.name!r} does not fit data.dataset={config.data.dataset!r} "
        f"({'points' if is_toy else 'images'}): use {expected!r}",
    )
    if model_config.scale_by_sigma:
        _require(
            model_config.time_input == "log_sigma",
            "model.scale_by_sigma",
            "True needs model.time_input='log_sigma' (the network divides by exp of its time "
            f"input), got time_input={model_config.time_input!r}",
        )
    training_config = config.training
    _require(
        training_config.remat in REMAT_POLICIES,
        "training.remat",
        f"{training_config.remat!r} is not one of {', '.join(REMAT_POLICIES)}",
    )
    _require(
        training_config.compute_dtype in COMPUTE_DTYPES,
        "training.compute_dtype",
        f"{training_config.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}",
    )
    if is_toy:
        _require(
            training_config.remat == "none" and training_config.compute_dtype == "float32",
            "training.remat",
            "rematerialisation and a bfloat16 compute dtype are U-Net options; the toy MLP takes "
            f"remat='none' and compute_dtype='float32', got {training_config.remat!r} and "
            f"{training_config.compute_dtype!r}",
        )
        fields = ("width", "num_blocks", "embedding_dim", "embedding_type", "fourier_scale")
        kwargs = {name: model_config[name] for name in fields}
        return _wrap(
            "model",
            lambda: MLP(
                **kwargs,
                num_classes=model_config.num_classes,
                dropout=float(model_config.dropout),
                scale_by_sigma=bool(model_config.scale_by_sigma),
            ),
        )
    levels = level_resolutions(min(data_shape[:2]), len(model_config.ch_mult))
    unused = sorted(set(model_config.attn_resolutions) - set(levels))
    _require(
        not unused,
        "model.attn_resolutions",
        f"{unused} never occur: the feature maps of {data_shape[0]}x{data_shape[1]} inputs with "
        f"ch_mult={tuple(model_config.ch_mult)} have sizes {levels}",
    )
    return _wrap(
        "model",
        lambda: UNet(
            ch=int(model_config.nf),
            ch_mult=tuple(model_config.ch_mult),
            num_res_blocks=int(model_config.num_res_blocks),
            attn_resolutions=tuple(model_config.attn_resolutions),
            dropout=float(model_config.dropout),
            resamp_with_conv=bool(model_config.resamp_with_conv),
            embedding_type=model_config.embedding_type,
            fourier_scale=float(model_config.fourier_scale),
            skip_rescale=bool(model_config.skip_rescale),
            num_classes=model_config.num_classes,
            scale_by_sigma=bool(model_config.scale_by_sigma),
            # A learned variance: the prediction and v per channel (Nichol & Dhariwal 2021).
            out_channels=2 * data_shape[-1] if model_config.variance == "learned" else None,
            remat=training_config.remat,
            dtype=COMPUTE_DTYPES[training_config.compute_dtype],
        ),
    )


def _optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """The learning-rate schedule and the optimiser that applies it."""
    optim_config = config.optim

    def make():
        schedule = optim.learning_rate_schedule(
            float(optim_config.lr),
            warmup_steps=int(optim_config.warmup),
            decay=optim_config.decay,
            total_steps=int(config.training.n_iters),
        )
        optimizer = optim.make_optimizer(
            schedule,
            name=optim_config.optimizer,
            b1=float(optim_config.beta1),
            b2=float(optim_config.beta2),
            eps=float(optim_config.eps),
            weight_decay=float(optim_config.weight_decay),
            grad_clip_norm=None
            if optim_config.grad_clip is None
            else float(optim_config.grad_clip),
        )
        return schedule, optimizer

    return _wrap("optim", make)


def _check_training(config: ml_collections.ConfigDict) -> None:
    train = config.training
    keys = ("batch_size", "n_iters", "log_freq", "checkpoint_freq", "steps_per_call")
    for key in (*keys, "max_nonfinite_steps", "keep_checkpoints"):
        _require(int(train[key]) >= 1, f"training.{key}", f"must be >= 1, got {train[key]!r}")
    _require(
        train.parallelism in parallel.PARALLELISMS,
        "training.parallelism",
        f"{train.parallelism!r} is not one of {', '.join(parallel.PARALLELISMS)}",
    )
    devices = jax.local_device_count() * jax.process_count()
    _require(
        train.batch_size % devices == 0,
        "training.batch_size",
        f"{train.batch_size} is not divisible by the {devices} devices",
    )
    for key in ("log_freq", "checkpoint_freq", "snapshot_freq"):
        _require(
            int(train[key]) % int(train.steps_per_call) == 0,
            f"training.{key}",
            f"{train[key]} must be a multiple of training.steps_per_call={train.steps_per_call}",
        )
    _require(
        0.0 <= float(train.ema_decay) < 1.0,
        "training.ema_decay",
        f"must be in [0, 1), got {train.ema_decay!r}",
    )


def _sampler_options(options: ml_collections.ConfigDict, method: str) -> dict[str, Any]:
    """The options of sampler ``method`` from ``config.sampling.options.<method>``."""
    return dict(options[method]) if method in options else {}


def _check_sampling(config: ml_collections.ConfigDict, process: Process) -> None:
    sampling = config.sampling
    method = sampling.method
    _wrap("sampling.method", lambda: samplers.get_sampler(method))
    options = _sampler_options(sampling.options, method)
    _wrap(
        f"sampling.options.{method}",
        lambda: samplers.sampler_program(
            method, denoise_final=bool(sampling.denoise_final), **options
        ),
    )
    order = sampling.denoise_order
    _require(
        isinstance(order, int) and not isinstance(order, bool) and 1 <= order <= 3,
        "sampling.denoise_order",
        f"must be 1 (Tweedie's step), 2 or 3 (the last x0 predictions extrapolated to sigma = 0), "
        f"got {order!r}",
    )
    if sampling.denoise_final and order > 1:
        _wrap(
            "sampling.denoise_order",
            lambda: samplers.sampler_program(
                method, denoise_final=True, denoise_order=order, **options
            ),
        )
        repaints = int(sampling.inpaint_resamplings) > 1 or int(sampling.inpaint_jump_length) > 1
        _require(
            sampling.inpaint_mask is None or not repaints,
            "sampling.denoise_order",
            f"RePaint's resampling (sampling.inpaint_resamplings / inpaint_jump_length) ends with "
            f"Tweedie's step only: use 1, got {order!r}",
        )
    _wrap(
        "sampling",
        lambda: samplers.time_grid(
            process, sampling.grid, int(sampling.num_steps), t_end=sampling.t_end, rho=sampling.rho
        ),
    )
    for key in ("num_samples", "batch_size"):
        _require(int(sampling[key]) >= 1, f"sampling.{key}", f"must be >= 1, got {sampling[key]!r}")


def _label_spec(text: Any) -> str | list[int]:
    """sampling.labels as guidance.sampling_labels takes it: 'all' or a list of ints."""
    text = str(text).strip()
    if text == "all":
        return "all"
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"config.sampling.labels: {text!r} is not 'all', a label ('3') or a list ('0,4,7')"
        ) from None


def _vlb_decoder(config: ml_collections.ConfigDict, is_toy: bool) -> str:
    """Ho et al. 2020's discretised decoder for 8-bit images in [-1, 1]; a Gaussian density for
    continuous (toy or dequantised) data."""
    if is_toy or config.data.dequantize:
        return "gaussian"
    return "discretized_gaussian"


def _check_variance(config: ml_collections.ConfigDict, is_toy: bool) -> None:
    """model.variance, the losses of diffusion.variational, sampling.reverse_variance, eval.vlb."""
    variance, train = config.model.variance, config.training
    weighting = train.weighting
    accepted = variational.VARIANCES
    _require(
        variance in accepted, "model.variance", f"{variance!r} is not one of {', '.join(accepted)}"
    )
    if variance == "learned":
        _require(
            not is_toy,
            "model.variance",
            "'learned' needs the U-Net's 2C output channels; the toy MLP outputs C",
        )
        _require(
            weighting == "hybrid",
            "model.variance",
            f"'learned' is trained by training.weighting='hybrid', got {weighting!r}",
        )
    if weighting == "hybrid":
        _require(
            variance == "learned",
            "training.weighting",
            f"'hybrid' trains a learned variance: set model.variance='learned' (got {variance!r})",
        )
    if config.process.name == LEARNED_PROCESS:
        _require(
            weighting == "vlb",
            "process.name",
            "the 'learned' schedule is trained by its VLB: set training.weighting='vlb' "
            f"(got {weighting!r})",
        )
    if weighting in VLB_WEIGHTINGS:
        _require(
            float(train.lambda_vlb) >= 0,
            "training.lambda_vlb",
            f"must be >= 0, got {train.lambda_vlb!r}",
        )
        _require(
            float(train.label_dropout) == 0.0,
            "training.label_dropout",
            f"is a DenoisingLoss option; training.weighting={weighting!r} has none",
        )
    _require(
        int(train.vdm_num_steps) >= 0,
        "training.vdm_num_steps",
        f"must be >= 0 (0: continuous time), got {train.vdm_num_steps!r}",
    )
    rule = config.sampling.reverse_variance
    if rule is not None:
        _require(
            rule in accepted,
            "sampling.reverse_variance",
            f"{rule!r} is not one of {', '.join(accepted)}",
        )
        _require(
            rule != "learned" or variance == "learned",
            "sampling.reverse_variance",
            "'learned' needs a learned-variance network (model.variance='learned')",
        )
    needs_images_in_unit_range = weighting in VLB_WEIGHTINGS or config.eval.vlb
    if needs_images_in_unit_range and not is_toy and not config.data.dequantize:
        _require(
            bool(config.data.centered),
            "data.centered",
            "the discretised decoder of the variational bound (training.weighting "
            f"{weighting!r}, eval.vlb) bins 8-bit data in [-1, 1]: set data.centered=True "
            "(or data.dequantize=True for a Gaussian decoder)",
        )
    evaluation = config.eval
    for key, low in (("vlb_num_examples", 1), ("vlb_num_terms", 0), ("analytic_num_batches", 1)):
        _require(
            int(evaluation[key]) >= low, f"eval.{key}", f"must be >= {low}, got {evaluation[key]!r}"
        )
    _require(
        int(evaluation.analytic_num_times) >= 2,
        "eval.analytic_num_times",
        f"must be >= 2, got {evaluation.analytic_num_times!r}",
    )


def _check_conditioning(
    config: ml_collections.ConfigDict, data_shape: tuple[int, ...], is_toy: bool
) -> int | None:
    """Labels, guidance and inpainting keys; returns the number of classes labels refer to."""
    sampling, num_classes = config.sampling, config.model.num_classes
    if num_classes is not None:
        _require(
            not is_toy,
            "model.num_classes",
            f"{num_classes} classes need labelled data, but data.dataset={config.data.dataset!r} "
            "has no labels; use an image dataset or num_classes=None",
        )
        _require(
            num_classes == IMAGE_CLASSES,
            "model.num_classes",
            f"{num_classes} does not match the {IMAGE_CLASSES} classes of "
            f"data.dataset={config.data.dataset!r}",
        )
    dropout = float(config.training.label_dropout)
    _require(0.0 <= dropout <= 1.0, "training.label_dropout", f"must be in [0, 1], got {dropout!r}")
    _require(
        dropout == 0.0 or num_classes is not None,
        "training.label_dropout",
        f"{dropout} needs a conditional model (model.num_classes): it trains the null label",
    )
    classifier_scale = float(sampling.classifier_scale)
    _require(
        math.isfinite(classifier_scale),
        "sampling.classifier_scale",
        f"must be finite, got {classifier_scale!r}",
    )
    if classifier_scale != 0.0:
        _require(
            not is_toy,
            "sampling.classifier_scale",
            f"classifier guidance needs labelled data; data.dataset={config.data.dataset!r} has none",
        )
        _require(
            config.process.name != LEARNED_PROCESS,
            "sampling.classifier_scale",
            "a noise-conditional classifier of a learned schedule is not supported",
        )
        for key in ("steps", "batch_size", "num_blocks"):
            value = sampling[f"noisy_classifier_{key}"]
            _require(
                int(value) >= 1, f"sampling.noisy_classifier_{key}", f"must be >= 1, got {value!r}"
            )
    label_classes = num_classes
    if label_classes is None and classifier_scale != 0.0:
        label_classes = IMAGE_CLASSES
    spec = _label_spec(sampling.labels)
    if label_classes is None:
        _require(
            spec == "all",
            "sampling.labels",
            f"{sampling.labels!r} needs a conditional model (model.num_classes) or classifier "
            "guidance (sampling.classifier_scale != 0)",
        )
    else:
        _wrap("sampling.labels", lambda: guidance.sampling_labels(spec, label_classes, 1))
    unconditional = "needs a conditional model (model.num_classes)"
    scale = float(sampling.guidance_scale)
    _require(math.isfinite(scale), "sampling.guidance_scale", f"must be finite, got {scale!r}")
    if num_classes is None:
        _require(scale == 1.0, "sampling.guidance_scale", f"{scale} {unconditional}")
        _require(
            float(sampling.guidance_rescale) == 0.0, "sampling.guidance_rescale", unconditional
        )
        _require(sampling.guidance_interval is None, "sampling.guidance_interval", unconditional)
        _require(
            tuple(config.eval.guidance_scales) == (1.0,),
            "eval.guidance_scales",
            f"{tuple(config.eval.guidance_scales)} {unconditional}",
        )
    _require(
        0.0 <= float(sampling.guidance_rescale) <= 1.0,
        "sampling.guidance_rescale",
        f"must be in [0, 1], got {sampling.guidance_rescale!r}",
    )
    interval = sampling.guidance_interval
    if interval is not None:
        valid = len(interval) == 2 and all(math.isfinite(float(v)) for v in interval)
        _require(
            valid and 0.0 <= float(interval[0]) < float(interval[1]),
            "sampling.guidance_interval",
            f"must be (low, high) noise levels sigma/alpha with 0 <= low < high, got {interval!r}",
        )
    scales = tuple(config.eval.guidance_scales)
    _require(
        len(scales) >= 1 and all(math.isfinite(float(w)) for w in scales),
        "eval.guidance_scales",
        f"must be one or more finite numbers, got {scales!r}",
    )
    if sampling.inpaint_mask is not None:
        _wrap(
            "sampling.inpaint_mask",
            lambda: guidance.inpainting_mask(sampling.inpaint_mask, data_shape),
        )
    for key in ("inpaint_resamplings", "inpaint_jump_length"):
        _require(int(sampling[key]) >= 1, f"sampling.{key}", f"must be >= 1, got {sampling[key]!r}")
    jump = int(sampling.inpaint_jump_length)
    _require(
        int(sampling.num_steps) % jump == 0,
        "sampling.inpaint_jump_length",
        f"{jump} must divide sampling.num_steps={sampling.num_steps} (RePaint's blocks)",
    )
    options = _sampler_options(sampling.options, sampling.method)
    if sampling.method == "ancestral" and options.get("variance") == "model":
        wrapped = [
            name
            for name, used in (
                ("model.num_classes", num_classes is not None),
                ("sampling.classifier_scale", classifier_scale != 0.0),
                ("sampling.inpaint_mask", sampling.inpaint_mask is not None),
            )
            if used
        ]
        _require(
            not wrapped,
            "sampling.options.ancestral.variance",
            f"'model' draws from the network's own reverse kernels, which {', '.join(wrapped)} "
            "would change; use 'beta_tilde' or 'beta'",
        )
    return label_classes


def _loss(config: ml_collections.ConfigDict, denoiser: Denoiser, is_toy: bool):
    """DenoisingLoss, or a loss of diffusion.variational for training.weighting 'hybrid' / 'vlb'."""
    train, num_classes = config.training, config.model.num_classes
    decoder = _vlb_decoder(config, is_toy)
    if train.weighting == "hybrid":
        return _wrap(
            "training",
            lambda: variational.HybridLoss(
                denoiser=denoiser,
                decoder=decoder,
                lambda_vlb=float(train.lambda_vlb),
                num_classes=num_classes,
            ),
        )
    if train.weighting == "vlb":
        return _wrap(
            "training",
            lambda: variational.VDMLoss(
                denoiser=denoiser,
                train_schedule=isinstance(denoiser.process, LearnedSchedule),
                num_steps=int(train.vdm_num_steps),
                decoder=decoder,
                num_classes=num_classes,
            ),
        )
    return _wrap(
        "training",
        lambda: losses.DenoisingLoss(
            denoiser=denoiser,
            weighting=train.weighting,
            time_sampling=train.time_sampling,
            reduction=train.reduction,
            min_snr_gamma=float(train.min_snr_gamma),
            num_classes=num_classes,
            label_dropout=float(train.label_dropout),
        ),
    )


def build(config: ml_collections.ConfigDict) -> Experiment:
    """Validate ``config`` (ConfigError naming the key) and build the experiment's objects."""
    data_shape, is_toy = _data_shape(config)
    label_classes = _check_conditioning(config, data_shape, is_toy)
    _check_variance(config, is_toy)
    process = _process(config)
    _require(
        not (config.eval.vlb and not process.is_discrete and int(config.eval.vlb_num_terms) == 0),
        "eval.vlb_num_terms",
        f"0 (every term) needs a discrete chain; the bound of {type(process).__name__} is a Monte "
        "Carlo estimate over t: give the number of time samples per example (>= 1)",
    )
    model = _model(config, data_shape, is_toy)
    denoiser = _wrap(
        "model",
        lambda: Denoiser(
            params=None,
            apply_fn=model.apply,
            process=process,
            parameterization=config.model.parameterization,
            time_input=config.model.time_input,
            sigma_data=float(config.model.sigma_data),
        ),
    )
    loss = _loss(config, denoiser, is_toy)
    _check_training(config)
    learning_rate_fn, optimizer = _optimizer(config)
    _check_sampling(config, process)
    _require(
        config.eval.feature_extractor in FEATURE_EXTRACTORS,
        "eval.feature_extractor",
        f"{config.eval.feature_extractor!r} is not one of {', '.join(FEATURE_EXTRACTORS)}",
    )
    classifier_module = None
    if float(config.sampling.classifier_scale) != 0.0:
        sampling = config.sampling
        classifier_module = _wrap(
            "sampling",
            lambda: NoisyClassifier(
                num_classes=label_classes,
                channels=tuple(int(c) for c in sampling.noisy_classifier_channels),
                num_blocks=int(sampling.noisy_classifier_num_blocks),
                embedding_type=config.model.embedding_type,
                fourier_scale=float(config.model.fourier_scale),
            ),
        )
    sampler_options = {name: dict(options) for name, options in config.sampling.options.items()}
    return Experiment(
        record=json.loads(config_to_json(config)),
        seed=int(config.seed),
        process=process,
        model=model,
        denoiser=denoiser,
        loss=loss,
        optimizer=optimizer,
        learning_rate_fn=learning_rate_fn,
        data_shape=data_shape,
        data=_settings(
            DataSettings,
            config.data,
            data_range=(-1.0, 1.0) if config.data.centered else (0.0, 1.0),
        ),
        training=_settings(TrainingSettings, config.training),
        sampling=_settings(SamplingSettings, config.sampling, options=sampler_options),
        eval=_settings(EvalSettings, config.eval),
        num_classes=config.model.num_classes,
        label_classes=label_classes,
        variance=config.model.variance,
        vlb_decoder=_vlb_decoder(config, is_toy),
        classifier_module=classifier_module,
    )
