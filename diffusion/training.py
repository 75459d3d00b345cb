"""Training: the train state, optimiser, EMA, the pure train step, its data-parallel wrappers and loop.

* ``TrainState`` holds step, params, optimiser state, EMA params and a base PRNG key. The key of the
  update that takes the state from step s to s + 1 is ``fold_in(key, s)`` (under ``pmap`` it is then
  folded with the device index), so the randomness of a step is a function of (key, s) alone and a
  run resumed from a checkpoint at step s draws exactly what the uninterrupted run drew.
* The optimiser is optax Adam / AdamW after global-norm clipping, with a linear warm-up then a
  constant or cosine learning rate (DDPM, Ho et al. 2020, and score_sde, Song et al. 2021, train
  with Adam, lr 2e-4, 5000 warm-up steps and gradient clipping at norm 1).
* ``train_step`` is one pure update; ``make_train_step`` closes over its static parts.
  ``DataParallelStep`` compiles it for data parallelism, either with ``jax.jit`` over a device
  mesh (batch sharded along its first axis, state replicated) or with ``jax.pmap`` (gradients and
  metrics averaged with ``lax.pmean``), optionally running k steps per call under ``lax.scan``.
* ``train_loop`` drives a run: logging, checkpoints and sample snapshots at fixed step intervals.

Step numbering: ``state.step`` counts the updates applied. Metrics, checkpoints and snapshots are
labelled with the step reached after the update, so the first update is logged as step 1.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

__all__ = [
    "DATA_AXIS",
    "DECAYS",
    "OPTIMIZERS",
    "PARALLELISMS",
    "PMAP_AXIS",
    "DataParallelStep",
    "LossFn",
    "TrainState",
    "create_train_state",
    "ema_decay_at",
    "initialize_distributed",
    "learning_rate_schedule",
    "make_global_batch",
    "make_optimizer",
    "make_snapshot_fn",
    "make_train_step",
    "step_key",
    "train_loop",
    "train_step",
]

OPTIMIZERS = ("adam", "adamw")
DECAYS = ("constant", "cosine")
PARALLELISMS = ("jit", "pmap")
DATA_AXIS = "data"  # mesh axis of the jit wrapper: the batch is sharded along it
PMAP_AXIS = "devices"  # pmap axis of the pmap wrapper: gradients and metrics are averaged over it

Params = Any
Batch = Any
Metrics = dict[str, jax.Array]


class LossFn(Protocol):
    """``loss_fn(params, batch, key, *, train=True) -> (loss, aux_metrics)``: a scalar loss to
    minimise and a dict of scalar metrics (e.g. the losses of ``diffusion.losses``)."""

    def __call__(
        self, params: Params, batch: Batch, key: jax.Array, *, train: bool = True
    ) -> tuple[jax.Array, Mapping[str, jax.Array]]: ...


@struct.dataclass
class TrainState:
    """Everything a run needs to continue: a pytree that jit, pmap, scan and orbax all accept.

    Attributes:
      step: int32 scalar, the number of updates applied.
      params: the network parameters being optimised.
      opt_state: the optax optimiser state.
      ema_params: exponential moving average of ``params`` (what samplers and evaluation use).
      key: base PRNG key (typed); the update from step s uses ``step_key(key, s)``.
    """

    step: jax.Array
    params: Params
    opt_state: optax.OptState
    ema_params: Params
    key: jax.Array


def create_train_state(
    params: Params, optimizer: optax.GradientTransformation, key: jax.Array
) -> TrainState:
    """The state at step 0: ``optimizer.init(params)`` and EMA params equal to ``params``.

    ``key`` is a typed key (``jax.random.key``) or a raw uint32 key (``jax.random.PRNGKey``), stored
    typed.
    """
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        key=key,
    )


def step_key(key: jax.Array, step: jax.Array | int) -> jax.Array:
    """The PRNG key of the update from ``step`` to ``step + 1``: ``fold_in(key, step)``."""
    return jax.random.fold_in(key, step)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def learning_rate_schedule(
    peak_learning_rate: float,
    *,
    warmup_steps: int = 0,
    decay: str = "constant",
    total_steps: int | None = None,
    final_learning_rate: float = 0.0,
) -> optax.Schedule:
    """Learning rate of update s (s = the number of updates applied before it).

    Linear warm-up: lr(s) = peak * s / warmup for s < warmup (Ho et al. 2020's and score_sde's
    ``lr * min(step / warmup, 1)``, so the very first update has lr 0). After warm-up either
    'constant': lr(s) = peak, or 'cosine' (Loshchilov & Hutter 2017, SGDR, eq. 5, without restarts):
    lr(s) = final + (peak - final) (1 + cos(pi (s - warmup) / (total - warmup))) / 2 up to
    s = total_steps, then final.
    """
    _check_positive("peak_learning_rate", peak_learning_rate)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
    if decay not in DECAYS:
        raise ValueError(f"unknown decay {decay!r}; accepted: {', '.join(DECAYS)}")
    if decay == "constant":
        if warmup_steps == 0:
            return optax.constant_schedule(peak_learning_rate)
        return optax.linear_schedule(0.0, peak_learning_rate, warmup_steps)
    if total_steps is None or total_steps <= warmup_steps:
        raise ValueError(
            f"decay='cosine' needs total_steps > warmup_steps = {warmup_steps}, got {total_steps!r}"
        )
    if not 0.0 <= final_learning_rate <= peak_learning_rate:
        raise ValueError(
            f"final_learning_rate must be in [0, peak_learning_rate = {peak_learning_rate}], "
            f"got {final_learning_rate!r}"
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,  # optax counts the warm-up inside decay_steps
        end_value=final_learning_rate,
    )


def make_optimizer(
    learning_rate: optax.ScalarOrSchedule,
    *,
    name: str = "adam",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """Global-norm clipping (Pascanu et al. 2013: g <- g min(1, c / ||g||_2)) then Adam (Kingma &
    Ba 2015) or AdamW (Loshchilov & Hutter 2019, decoupled weight decay).

    ``grad_clip_norm=None`` disables clipping; ``weight_decay`` needs ``name='adamw'``.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; accepted: {', '.join(OPTIMIZERS)}")
    if name == "adam" and weight_decay != 0.0:
        raise ValueError(f"weight_decay={weight_decay!r} needs name='adamw' (Adam has none)")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"need 0 <= b1, b2 < 1, got b1={b1!r}, b2={b2!r}")
    _check_positive("eps", eps)
    if name == "adam":
        adam = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    else:
        adam = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if grad_clip_norm is None:
        return adam
    _check_positive("grad_clip_norm", grad_clip_norm)
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adam)


def ema_decay_at(step: jax.Array | int, ema_decay: float, ema_warmup: bool) -> jax.Array:
    """EMA decay of the update from ``step`` to ``step + 1``.

    Without warm-up the constant ``ema_decay`` (DDPM, score_sde). With warm-up
    min(ema_decay, (1 + s) / (10 + s)), the ``num_updates`` rule of TensorFlow's
    ``tf.train.ExponentialMovingAverage``, with s = ``step`` updates applied before this one.
    """
    decay = jnp.asarray(ema_decay, jnp.float32)
    if not ema_warmup:
        return decay
    num_updates = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + num_updates) / (10.0 + num_updates))


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    learning_rate_fn: optax.Schedule,
    ema_decay: float,
    ema_warmup: bool = False,
    axis_name: str | None = None,
) -> tuple[TrainState, Metrics]:
    """One update: gradient of ``loss_fn`` at ``step_key(state.key, state.step)``, optimiser step,
    EMA update ema <- d ema + (1 - d) params (d from ``ema_decay_at``; score_sde's form).

    Inside ``pmap`` give ``axis_name``: the key is further folded with the device index (each
    device draws its own noise), and gradients, loss and aux metrics are averaged over the axis,
    which equals the gradient of the mean loss over the global batch when shards are equal-sized.

    Returns the new state and metrics: loss, grad_norm (global norm before clipping),
    learning_rate (of this update, ``learning_rate_fn(state.step)``), and the loss's aux metrics.
    """
    key = step_key(state.key, state.step)
    if axis_name is not None:
        key = jax.random.fold_in(key, lax.axis_index(axis_name))
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, train=True), has_aux=True)
    (loss, aux), grads = grad_fn(state.params, batch, key)
    if axis_name is not None:
        loss, aux, grads = lax.pmean((loss, aux, grads), axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, ema_decay, ema_warmup)
    ema_params = jax.tree.map(
        lambda ema, new: decay * ema + (1.0 - decay) * new, state.ema_params, params
    )
    metrics = {
        **aux,
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": jnp.asarray(learning_rate_fn(state.step), jnp.float32),
    }
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params
    )
    return new_state, metrics


TrainStep = Callable[..., tuple[TrainState, Metrics]]


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    learning_rate_fn: optax.ScalarOrSchedule,
    ema_decay: float,
    ema_warmup: bool = False,
) -> TrainStep:
    """``train_step`` with its static parts closed over: ``step(state, batch, *, axis_name=None)``.

    ``learning_rate_fn`` is the schedule (or constant) given to ``make_optimizer``; it is only
    reported in the metrics.
    """
    if not 0.0 <= ema_decay <= 1.0:
        raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay!r}")
    if not callable(learning_rate_fn):
        learning_rate_fn = optax.constant_schedule(learning_rate_fn)
    return functools.partial(
        train_step,
        loss_fn=loss_fn,
        optimizer=optimizer,
        learning_rate_fn=learning_rate_fn,
        ema_decay=ema_decay,
        ema_warmup=ema_warmup,
    )


def initialize_distributed(
    enabled: bool,
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> tuple[int, int]:
    """(process_index, process_count), after ``jax.distributed.initialize`` when ``enabled``.

    Call before any other JAX call. The arguments may be None where the cluster (SLURM, Cloud TPU,
    Kubernetes, ...) lets JAX detect them. Not enabled: nothing is initialised, a single process.
    """
    if enabled:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    return jax.process_index(), jax.process_count()


def make_global_batch(local_batch: Batch, sharding: jax.sharding.Sharding) -> Batch:
    """The global batch (jax.Arrays laid out by ``sharding``) from this process's shard.

    Process p holds rows [p B/P, (p + 1) B/P) of every sharded axis (as ``diffusion.data`` hands
    them out); with one process this is a ``device_put`` that splits the batch across devices.
    """
    return jax.tree.map(
        lambda leaf: jax.make_array_from_process_local_data(sharding, np.asarray(leaf)),
        local_batch,
    )


def _leading_size(batch: Batch, axis: int) -> int:
    sizes = {np.shape(leaf)[axis] for leaf in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"batch leaves disagree on the size of axis {axis}: {sorted(sizes)}")
    return sizes.pop()


class DataParallelStep:
    """A train step compiled for data parallelism over devices.

    parallelism='jit' (default): ``jax.jit`` over a ``Mesh`` of ``devices`` with axis ``DATA_AXIS``;
    the batch is a global array sharded along its first axis, the state is replicated, and XLA
    inserts the gradient all-reduce. With threefry-partitionable keys (JAX's default) random draws
    do not depend on the sharding, so this path gives the single-device numbers up to summation
    order. parallelism='pmap': ``jax.pmap`` over axis ``PMAP_AXIS`` with explicit ``lax.pmean``; the
    state carries a leading device axis (``put_state`` / ``host_state`` replicate and unreplicate).

    ``devices`` defaults to ``jax.devices()`` for jit (all devices of all processes) and to pmap's
    default (every process's local devices) for pmap. The state argument is donated: after
    ``step(state, ...)`` use only the returned state.
    """

    def __init__(
        self,
        train_step: TrainStep,
        *,
        parallelism: str = "jit",
        devices: Sequence[jax.Device] | None = None,
    ) -> None:
        if parallelism not in PARALLELISMS:
            raise ValueError(
                f"unknown parallelism {parallelism!r}; accepted: {', '.join(PARALLELISMS)}"
            )
        self.parallelism = parallelism
        if parallelism == "jit":
            self.devices = list(jax.devices() if devices is None else devices)
            mesh = Mesh(np.asarray(self.devices), (DATA_AXIS,))
            self.state_sharding = NamedSharding(mesh, P())
            self.batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
            self.stacked_batch_sharding = NamedSharding(mesh, P(None, DATA_AXIS))

            def multi_step(state, batches):
                return lax.scan(train_step, state, batches)

            self._step = jax.jit(
                train_step,
                in_shardings=(self.state_sharding, self.batch_sharding),
                out_shardings=self.state_sharding,
                donate_argnums=0,
            )
            self._multi_step = jax.jit(
                multi_step,
                in_shardings=(self.state_sharding, self.stacked_batch_sharding),
                out_shardings=self.state_sharding,
                donate_argnums=0,
            )
        else:
            self.devices = list(jax.local_devices() if devices is None else devices)
            device_step = functools.partial(train_step, axis_name=PMAP_AXIS)

            def device_multi_step(state, batches):
                return lax.scan(device_step, state, batches)

            pmap = functools.partial(
                jax.pmap,
                axis_name=PMAP_AXIS,
                devices=None if devices is None else self.devices,
                donate_argnums=0,
            )
            self._step = pmap(device_step)
            self._multi_step = pmap(device_multi_step)
            replica_mesh = Mesh(np.asarray(self.devices), (PMAP_AXIS,))
            self.state_sharding = NamedSharding(replica_mesh, P(PMAP_AXIS))

    @property
    def num_devices(self) -> int:
        """Number of devices this process feeds (the batch is split across them)."""
        if self.parallelism == "pmap":
            return len(self.devices)
        process_index = jax.process_index()
        return sum(device.process_index == process_index for device in self.devices)

    def put_state(self, state: TrainState) -> TrainState:
        """A copy of a single (host) state placed for this wrapper: replicated over the mesh (jit)
        or stacked along a leading device axis (pmap)."""
        if self.parallelism == "jit":
            # Copy first: a replicating device_put may alias the caller's buffer on one device
            # (even with may_alias=False), which the donating step would then delete.
            return jax.device_put(jax.tree.map(jnp.copy, state), self.state_sharding)
        num_replicas = len(self.devices)
        return jax.tree.map(
            lambda leaf: jax.device_put(jnp.stack([leaf] * num_replicas), self.state_sharding),
            state,
        )

    def host_state(self, state: TrainState) -> TrainState:
        """One copy of the state (what checkpoints and snapshots take): the state itself for jit,
        the first replica for pmap."""
        if self.parallelism == "jit":
            return state
        return jax.tree.map(lambda leaf: leaf.addressable_shards[0].data[0], state)

    def put_batch(self, local_batch: Batch, *, stacked: bool = False) -> Batch:
        """This process's batch (B_local, ...) placed for the step; ``stacked``: a stack
        (k, B_local, ...) of k consecutive batches for ``multi_step``.

        jit: a global array of B_local * process_count rows sharded over the mesh. pmap: reshaped
        to (devices, B_local / devices, ...) (stacked: (devices, k, B_local / devices, ...)).
        """
        batch_axis = 1 if stacked else 0
        local_size = _leading_size(local_batch, batch_axis)
        if local_size % self.num_devices:
            raise ValueError(
                f"the per-process batch size {local_size} is not divisible by the "
                f"{self.num_devices} devices of this process"
            )
        if self.parallelism == "jit":
            sharding = self.stacked_batch_sharding if stacked else self.batch_sharding
            return make_global_batch(local_batch, sharding)

        def split(leaf):
            leaf = np.asarray(leaf)
            shape = leaf.shape
            split_shape = (
                *shape[:batch_axis],
                self.num_devices,
                local_size // self.num_devices,
                *shape[batch_axis + 1 :],
            )
            return np.moveaxis(leaf.reshape(split_shape), batch_axis, 0)

        return jax.tree.map(split, local_batch)

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        """One update of a placed state on a placed batch; metrics are scalars."""
        state, metrics = self._step(state, batch)
        return state, self._metrics(metrics)

    def multi_step(self, state: TrainState, batches: Batch) -> tuple[TrainState, Metrics]:
        """k updates in one compiled call (``lax.scan``) on a placed stack of k batches; metrics
        are stacked along a leading (k,) axis. Equals k calls of ``step``."""
        state, metrics = self._multi_step(state, batches)
        return state, self._metrics(metrics)

    def _metrics(self, metrics: Metrics) -> Metrics:
        if self.parallelism == "jit":
            return metrics
        return jax.tree.map(lambda leaf: leaf.addressable_shards[0].data[0], metrics)


class _MetricWriter(Protocol):
    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...


class _CheckpointManager(Protocol):
    save_every: int

    def should_save(self, step: int) -> bool: ...

    def save(
        self,
        step: int,
        state: TrainState,
        *,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
    ) -> bool: ...

    def wait_until_finished(self) -> None: ...


def _check_frequency(name: str, frequency: int | None, steps_per_call: int) -> None:
    if frequency is None:
        return
    if frequency < 1 or frequency % steps_per_call:
        raise ValueError(
            f"{name} must be a positive multiple of steps_per_call = {steps_per_call}, "
            f"got {frequency!r}"
        )


def _summarize(window: list[Metrics]) -> dict[str, float]:
    """Means over a window of (device) metrics, scalars or stacked; the last learning rate."""
    host_window = jax.device_get(window)
    summary = {
        name: float(np.mean(np.concatenate([np.ravel(metrics[name]) for metrics in host_window])))
        for name in host_window[0]
    }
    summary["learning_rate"] = float(np.ravel(host_window[-1]["learning_rate"])[-1])
    return summary


def train_loop(
    state: TrainState,
    runner: DataParallelStep,
    batch_fn: Callable[[int], Batch],
    *,
    num_steps: int,
    log_every: int,
    writer: _MetricWriter | None = None,
    checkpoint_manager: _CheckpointManager | None = None,
    snapshot_fn: Callable[[int, Params], None] | None = None,
    snapshot_every: int | None = None,
    steps_per_call: int = 1,
    progress: bool = True,
) -> TrainState:
    """Train from ``state`` (fresh or restored, a single host copy) up to step ``num_steps``.

    ``batch_fn(s)`` returns this process's batch for the update from step s (a pure function of s,
    e.g. ``diffusion.data.image_batch(..., step=s)``), so a resumed run sees the same data. Every
    ``log_every`` steps the metrics averaged since the last log (learning_rate: the last update's),
    steps_per_s and examples_per_s (wall time since the last log, so the first window includes
    compilation) go to ``writer``. At every step ``checkpoint_manager.should_save`` accepts, and at
    ``num_steps``, the host state is saved (asynchronously where the manager is) with the metrics of
    the last log. Every ``snapshot_every`` steps ``snapshot_fn(step, ema_params)`` is called. With
    ``steps_per_call = k > 1`` the updates run k per compiled call (``multi_step``), calls ending at
    multiples of k; every frequency must then be a multiple of k.

    A kill at any moment loses at most the updates since the last finalised checkpoint: checkpoints
    are finalised atomically and pending saves are awaited before returning (or raising). Returns
    the host state at ``num_steps``.
    """
    if steps_per_call < 1:
        raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call!r}")
    _check_frequency("log_every", log_every, steps_per_call)
    _check_frequency("snapshot_every", snapshot_every, steps_per_call)
    if snapshot_fn is not None and snapshot_every is None:
        raise ValueError("snapshot_fn needs snapshot_every (a number of steps)")
    if checkpoint_manager is not None:
        save_every = checkpoint_manager.save_every
        _check_frequency("checkpoint_manager.save_every", save_every, steps_per_call)
    step = int(jax.device_get(state.step))
    if num_steps < step:
        raise ValueError(f"num_steps={num_steps!r} is below the state's step {step}")

    state = runner.put_state(state)
    window: list[Metrics] = []
    last_summary: dict[str, float] | None = None
    window_start_step, window_start_time = step, time.perf_counter()
    # Redirected to a log file, a bar redrawn ten times a second buries the summary lines.
    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
    progress_bar = tqdm(
        total=num_steps,
        initial=step,
        disable=not progress,
        unit="step",
        mininterval=0.1 if interactive else 30.0,
    )
    try:
        while step < num_steps:
            num_updates = min(steps_per_call - step % steps_per_call, num_steps - step)
            local_batches = [batch_fn(step + offset) for offset in range(num_updates)]
            if steps_per_call == 1:
                state, metrics = runner.step(state, runner.put_batch(local_batches[0]))
            else:
                stacked = jax.tree.map(lambda *leaves: np.stack(leaves), *local_batches)
                state, metrics = runner.multi_step(state, runner.put_batch(stacked, stacked=True))
            global_batch_size = _leading_size(local_batches[0], 0) * jax.process_count()
            step += num_updates
            window.append(metrics)
            progress_bar.update(num_updates)

            if step % log_every == 0 or step == num_steps:
                last_summary = _summarize(window)
                elapsed = time.perf_counter() - window_start_time
                steps_per_s = (step - window_start_step) / elapsed
                last_summary["steps_per_s"] = steps_per_s
                last_summary["examples_per_s"] = steps_per_s * global_batch_size
                if writer is not None:
                    writer.write_scalars(step, last_summary)
                progress_bar.set_postfix(loss=f"{last_summary['loss']:.4g}")
                window = []
                window_start_step, window_start_time = step, time.perf_counter()
            if checkpoint_manager is not None and (
                checkpoint_manager.should_save(step) or step == num_steps
            ):
                checkpoint_manager.save(
                    step, runner.host_state(state), metrics=last_summary, force=True
                )
            if snapshot_fn is not None and step % snapshot_every == 0:
                snapshot_fn(step, runner.host_state(state).ema_params)
    finally:
        progress_bar.close()
        if checkpoint_manager is not None:
            checkpoint_manager.wait_until_finished()
    return runner.host_state(state)


def make_snapshot_fn(
    sample_fn: Callable[[Params, jax.Array], jax.Array],
    writer: Any,
    key: jax.Array,
    *,
    name: str = "samples",
    kind: str = "images",
    data_range: Sequence[float] = (-1.0, 1.0),
) -> Callable[[int, Params], None]:
    """A ``snapshot_fn`` for ``train_loop``: ``sample_fn(ema_params, step_key(key, step))`` then
    ``writer.write_images`` (kind 'images': PNG grid + .npz) or ``writer.write_points`` (kind
    'points': 2-D scatter PNG + .npz) under ``name``.

    ``sample_fn`` is e.g. a closure over ``diffusion.samplers.sample`` that builds the denoiser
    from the EMA params and returns ``SampleResult.samples``. Snapshot keys depend on the step only.
    """
    kinds = ("images", "points")
    if kind not in kinds:
        raise ValueError(f"unknown snapshot kind {kind!r}; accepted: {', '.join(kinds)}")

    def snapshot(step: int, ema_params: Params) -> None:
        samples = np.asarray(jax.device_get(sample_fn(ema_params, step_key(key, step))))
        if kind == "images":
            writer.write_images(step, name, samples, data_range=data_range)
        else:
            writer.write_points(step, name, samples)

    return snapshot
