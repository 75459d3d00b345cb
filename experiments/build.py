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
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from diffusion import data, losses, optim, oracle, parallel, samplers
from diffusion.models import MLP, UNet
from diffusion.models.unet import level_resolutions
from diffusion.parameterization import Denoiser
from diffusion.processes import Process, make_process

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
FEATURE_EXTRACTORS = ("classifier", "inception", "none")
_IMAGE_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


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
    rho: float
    denoise_final: bool
    options: Mapping[str, Mapping[str, Any]]  # sampler name -> its options
    num_samples: int
    batch_size: int

    def options_of(self, method: str) -> dict[str, Any]:
        """The configured options of sampler ``method`` (its registry defaults if none)."""
        return dict(self.options.get(method, {}))


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
@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything a mode of experiments/run.py needs, built once from a validated config."""

    record: Mapping[str, Any]  # the config as JSON values: what DIR/config.json records
    seed: int
    process: Process
    model: Any  # a flax.linen Module (UNet or MLP)
    denoiser: Denoiser  # params=None: ``denoiser.replace(params=...)`` to use it
    loss: losses.DenoisingLoss
    optimizer: optax.GradientTransformation
    learning_rate_fn: optax.Schedule
    data_shape: tuple[int, ...]  # one example, e.g. (28, 28, 1) or (2,)
    data: DataSettings
    training: TrainingSettings
    sampling: SamplingSettings
    eval: EvalSettings

    @property
    def is_toy(self) -> bool:
        return self.data.is_toy

    @property
    def data_range(self) -> tuple[float, float]:
        return self.data.data_range

    def key(self, stream: Stream) -> jax.Array:
        """The PRNG key of ``stream`` (see ``Stream``)."""
        return jax.random.fold_in(jax.random.PRNGKey(self.seed), int(stream))

    # ------------------------------------------------------------------------- the network
    def init_params(self, key: jax.Array) -> Any:
        """Fresh network parameters (jitted init on a batch of one)."""
        dummy_x = np.zeros((1, *self.data_shape), np.float32)
        dummy_t = np.zeros((1,), np.float32)
        return jax.jit(self.model.init)(key, dummy_x, dummy_t)

    def param_count(self) -> int:
        shapes = jax.eval_shape(
            self.model.init,
            jax.random.PRNGKey(0),
            np.zeros((1, *self.data_shape), np.float32),
            np.zeros((1,), np.float32),
        )
        return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)))

    # ------------------------------------------------------------------------- sampling
    def sample(
        self,
        params: Any,
        key: jax.Array,
        num: int,
        *,
        method: str | None = None,
        num_steps: int | None = None,
        grid: str | None = None,
        options: dict | None = None,
    ) -> samplers.SampleResult:
        """``num`` samples from the EMA ``params`` with the configured (or overridden) sampler."""
        sampling = self.sampling
        method = method or sampling.method
        return samplers.sample(
            method,
            self.denoiser.replace(params=params),
            key,
            (num, *self.data_shape),
            grid=grid or sampling.grid,
            num_steps=num_steps or sampling.num_steps,
            t_end=sampling.t_end,
            rho=float(sampling.rho),
            denoise_final=bool(sampling.denoise_final),
            **(sampling.options_of(method) if options is None else options),
        )

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
    fields = dict(config.process)
    name = fields.pop("name")
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
    if is_toy:
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
    _wrap(
        f"sampling.options.{method}",
        lambda: samplers.sampler_program(
            method,
            denoise_final=bool(sampling.denoise_final),
            **_sampler_options(sampling.options, method),
        ),
    )
    _wrap(
        "sampling",
        lambda: samplers.time_grid(
            process, sampling.grid, int(sampling.num_steps), t_end=sampling.t_end, rho=sampling.rho
        ),
    )
    for key in ("num_samples", "batch_size"):
        _require(int(sampling[key]) >= 1, f"sampling.{key}", f"must be >= 1, got {sampling[key]!r}")


def build(config: ml_collections.ConfigDict) -> Experiment:
    """Validate ``config`` (ConfigError naming the key) and build the experiment's objects."""
    data_shape, is_toy = _data_shape(config)
    _require(
        config.model.num_classes is None or not is_toy,
        "model.num_classes",
        f"{config.model.num_classes} classes need labelled data, but data.dataset="
        f"{config.data.dataset!r} has no labels; use an image dataset or num_classes=None",
    )
    process = _process(config)
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
    train = config.training
    loss = _wrap(
        "training",
        lambda: losses.DenoisingLoss(
            denoiser=denoiser,
            weighting=train.weighting,
            time_sampling=train.time_sampling,
            reduction=train.reduction,
            min_snr_gamma=float(train.min_snr_gamma),
            num_classes=config.model.num_classes,
        ),
    )
    _check_training(config)
    learning_rate_fn, optimizer = _optimizer(config)
    _check_sampling(config, process)
    _require(
        config.eval.feature_extractor in FEATURE_EXTRACTORS,
        "eval.feature_extractor",
        f"{config.eval.feature_extractor!r} is not one of {', '.join(FEATURE_EXTRACTORS)}",
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
    )
