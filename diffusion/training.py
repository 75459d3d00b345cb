"""Training: the train state, the pure train step that guards against non-finite updates, the loop.

* ``TrainState`` holds step, params, optimiser state, EMA params, a base PRNG key and the number of
  consecutive skipped updates. The key of the update from step s to s + 1 is ``fold_in(key, s)``
  (under ``shard_map`` it is then folded with the device index), so the randomness of a step is a
  function of (key, s) alone and a run resumed from a checkpoint at step s draws exactly what the
  uninterrupted run drew.
* ``train_step`` is one pure update; an update whose loss or gradient is not finite is skipped inside
  the compiled step (params, EMA and optimiser state unchanged), counted, and reported.
  ``make_train_step`` closes over its static parts; ``diffusion.parallel.DataParallelStep`` compiles it
  over devices; the optimiser and schedules are in ``diffusion.optim``.
* ``train_loop`` drives a run: logging, checkpoints and sample snapshots at fixed step intervals, a
  stop after too many consecutive skipped updates, and a clean stop (checkpoint first) when asked,
  e.g. on SIGTERM.

Step numbering: ``state.step`` counts the updates tried, applied or skipped (step s reads the batch of
step s). Metrics, checkpoints and snapshots are labelled with the step reached after the update, so the
first update is logged as step 1.
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
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from diffusion.optim import ema_decay_at
from diffusion.parallel import DataParallelStep

__all__ = [
    "LossFn",
    "NonFiniteTrainingError",
    "TrainState",
    "create_train_state",
    "make_snapshot_fn",
    "make_train_step",
    "step_key",
    "train_loop",
    "train_step",
]

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
    """Everything a run needs to continue: a pytree that jit, shard_map, scan and orbax all accept.

    Attributes:
      step: int32 scalar, the number of updates tried (applied or skipped).
      params: the network parameters being optimised.
      opt_state: the optax optimiser state.
      ema_params: exponential moving average of ``params`` (what samplers and evaluation use).
      key: base PRNG key (typed); the update from step s uses ``step_key(key, s)``.
      nonfinite_streak: int32 scalar, the number of consecutive updates skipped because their loss
        or gradient was not finite (0 after an applied update).
    """

    step: jax.Array
    params: Params
    opt_state: optax.OptState
    ema_params: Params
    key: jax.Array
    nonfinite_streak: jax.Array


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
        nonfinite_streak=jnp.zeros((), jnp.int32),
    )


def step_key(key: jax.Array, step: jax.Array | int) -> jax.Array:
    """The PRNG key of the update from ``step`` to ``step + 1``: ``fold_in(key, step)``."""
    return jax.random.fold_in(key, step)


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
    EMA update ema <- d ema + (1 - d) params (d from ``diffusion.optim.ema_decay_at``; score_sde's
    form).

    The update is applied only if the loss and the global gradient norm are finite; otherwise params,
    EMA and optimiser state stay as they were, ``nonfinite_streak`` grows by one and the step counter
    still advances (the next update reads the next batch).

    Inside ``shard_map`` give ``axis_name``: the key is further folded with the device index (each
    device draws its own noise), and gradients, loss and aux metrics are averaged over the axis,
    which equals the gradient of the mean loss over the global batch when shards are equal-sized.

    Returns the new state and metrics: loss, grad_norm (global norm before clipping),
    learning_rate (of this update, ``learning_rate_fn(state.step)``), nonfinite (1.0 if the update was
    skipped, else 0.0) and the loss's aux metrics.
    """
    key = step_key(state.key, state.step)
    params = state.params
    if axis_name is not None:
        key = jax.random.fold_in(key, lax.axis_index(axis_name))
        # Mark the replicated params as per-device values, so that the gradient below is this
        # device's own (shard_map would otherwise sum the cotangents of a replicated input).
        params = lax.pcast(params, axis_name, to="varying")
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, train=True), has_aux=True)
    (loss, aux), grads = grad_fn(params, batch, key)
    if axis_name is not None:
        loss, aux, grads = lax.pmean((loss, aux, grads), axis_name)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, ema_decay, ema_warmup)
    ema_params = jax.tree.map(
        lambda ema, new: decay * ema + (1.0 - decay) * new, state.ema_params, params
    )
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_if_finite = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_finite(params, state.params),
        opt_state=keep_if_finite(opt_state, state.opt_state),
        ema_params=keep_if_finite(ema_params, state.ema_params),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
    )
    metrics = {
        **aux,
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": jnp.asarray(learning_rate_fn(state.step), jnp.float32),
        "nonfinite": 1.0 - finite.astype(jnp.float32),
    }
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

    ``learning_rate_fn`` is the schedule (or constant) given to ``diffusion.optim.make_optimizer``;
    it is only reported in the metrics.
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


class NonFiniteTrainingError(RuntimeError):
    """Raised by ``train_loop`` after ``max_nonfinite_steps`` consecutive skipped updates."""

    def __init__(self, step: int, streak: int) -> None:
        self.step = step
        self.streak = streak
        super().__init__(
            f"training stopped at step {step}: the last {streak} updates had a non-finite loss or "
            f"gradient and were skipped (the parameters are those of step {step - streak})"
        )


class _MetricWriter(Protocol):
    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...


class _CheckpointManager(Protocol):
    save_every: int

    def should_save(self, step: int) -> bool: ...

    def save(self, step: int, state: TrainState, *, force: bool = False) -> bool: ...

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
    """Means over a window of (device) metrics, scalars or stacked; the last learning rate; the
    number of skipped updates as ``nonfinite_steps`` (a mean over a window with a skipped update is
    not finite, which the writer records as such)."""
    host_window = jax.device_get(window)
    per_step = {
        name: np.concatenate([np.ravel(metrics[name]) for metrics in host_window])
        for name in host_window[0]
    }
    skipped = per_step.pop("nonfinite")
    summary = {name: float(np.mean(values)) for name, values in per_step.items()}
    summary["learning_rate"] = float(per_step["learning_rate"][-1])
    summary["nonfinite_steps"] = float(np.sum(skipped))
    return summary


def _any_process(flag: bool) -> bool:
    """Whether ``flag`` is set in any process (every process must call this at the same point)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


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
    max_nonfinite_steps: int | None = None,
    stop_requested: Callable[[], bool] | None = None,
    progress: bool = True,
) -> TrainState:
    """Train from ``state`` (fresh or restored) up to step ``num_steps``, or until asked to stop.

    ``batch_fn(s)`` returns this process's batch for the update from step s (a pure function of s,
    e.g. ``diffusion.data.image_batch(..., step=s)``), so a resumed run sees the same data. Every
    ``log_every`` steps the metrics averaged since the last log (learning_rate: the last update's;
    nonfinite_steps: the count of skipped updates), steps_per_s and examples_per_s (wall time since the
    last log, so the first window includes compilation) go to ``writer``. At every step
    ``checkpoint_manager.should_save`` accepts, and at ``num_steps``, the state is saved
    (asynchronously where the manager is). Every ``snapshot_every``
    steps ``snapshot_fn(step, ema_params)`` is called. With ``steps_per_call = k > 1`` the updates run
    k per compiled call (``multi_step``), calls ending at multiples of k; every frequency must then be
    a multiple of k.

    Stops: after ``max_nonfinite_steps`` consecutive skipped updates ``NonFiniteTrainingError`` is raised
    (nothing more is saved); when ``stop_requested()`` turns true (checked after every call, agreed
    across processes) the state reached is checkpointed and returned early (its step is below
    ``num_steps``). A kill at any moment loses at most the updates since the last finalised
    checkpoint: checkpoints are finalised atomically and pending saves are awaited before returning
    (or raising).
    """
    if steps_per_call < 1:
        raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call!r}")
    _check_frequency("log_every", log_every, steps_per_call)
    _check_frequency("snapshot_every", snapshot_every, steps_per_call)
    if snapshot_fn is not None and snapshot_every is None:
        raise ValueError("snapshot_fn needs snapshot_every (a number of steps)")
    if max_nonfinite_steps is not None and max_nonfinite_steps < 1:
        raise ValueError(f"max_nonfinite_steps must be >= 1 or None, got {max_nonfinite_steps!r}")
    if checkpoint_manager is not None:
        save_every = checkpoint_manager.save_every
        _check_frequency("checkpoint_manager.save_every", save_every, steps_per_call)
    step = int(jax.device_get(state.step))
    if num_steps < step:
        raise ValueError(f"num_steps={num_steps!r} is below the state's step {step}")

    state = runner.put_state(state)
    window: list[Metrics] = []
    last_summary: dict[str, float] | None = None
    last_saved_step: int | None = None
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

    def log_window() -> None:
        nonlocal last_summary, window, window_start_step, window_start_time
        last_summary = _summarize(window)
        steps_per_s = (step - window_start_step) / (time.perf_counter() - window_start_time)
        last_summary["steps_per_s"] = steps_per_s
        last_summary["examples_per_s"] = steps_per_s * global_batch_size
        if writer is not None:
            writer.write_scalars(step, last_summary)
        progress_bar.set_postfix(loss=f"{last_summary['loss']:.4g}")
        window = []
        window_start_step, window_start_time = step, time.perf_counter()

    def save(force: bool) -> None:
        nonlocal last_saved_step
        if checkpoint_manager is not None and step != last_saved_step:
            checkpoint_manager.save(step, state, force=force)
            last_saved_step = step

    try:
        while step < num_steps:
            num_updates = min(steps_per_call - step % steps_per_call, num_steps - step)
            local_batches = [batch_fn(step + offset) for offset in range(num_updates)]
            if steps_per_call == 1:
                state, metrics = runner.step(state, runner.put_batch(local_batches[0]))
            else:
                stacked = jax.tree.map(lambda *leaves: np.stack(leaves), *local_batches)
                state, metrics = runner.multi_step(state, runner.put_batch(stacked, stacked=True))
            global_batch_size = runner.global_batch_size(local_batches[0])
            step += num_updates
            window.append(metrics)
            progress_bar.update(num_updates)

            if max_nonfinite_steps is not None:
                streak = int(jax.device_get(state.nonfinite_streak))
                if streak >= max_nonfinite_steps:
                    log_window()
                    raise NonFiniteTrainingError(step, streak)
            if step % log_every == 0 or step == num_steps:
                log_window()
            if checkpoint_manager is not None and (
                checkpoint_manager.should_save(step) or step == num_steps
            ):
                save(force=True)
            if snapshot_fn is not None and step % snapshot_every == 0:
                snapshot_fn(step, state.ema_params)
            if stop_requested is not None and _any_process(stop_requested()):
                if window:
                    log_window()
                save(force=True)
                break
    finally:
        progress_bar.close()
        if checkpoint_manager is not None:
            checkpoint_manager.wait_until_finished()
    return state


def make_snapshot_fn(
    sample_fn: Callable[[Params, jax.Array], jax.Array],
    writer: Any,
    key: jax.Array,
    *,
    name: str = "samples",
    kind: str = "images",
    data_range: Sequence[float] = (-1.0, 1.0),
    reference_points: np.ndarray | None = None,
) -> Callable[[int, Params], None]:
    """A ``snapshot_fn`` for ``train_loop``: ``sample_fn(ema_params, step_key(key, step))`` then
    ``writer.write_images`` (kind 'images': PNG grid + .npz) or ``writer.write_points`` (kind
    'points': 2-D scatter PNG over ``reference_points``, e.g. data, + .npz) under ``name``.

    ``sample_fn`` is e.g. a closure over ``diffusion.samplers.sample`` that builds the denoiser
    from the EMA params and returns ``SampleResult.samples``. Snapshot keys depend on the step only.
    The EMA parameters are fetched to this process first, so the sampling is a local computation.
    """
    kinds = ("images", "points")
    if kind not in kinds:
        raise ValueError(f"unknown snapshot kind {kind!r}; accepted: {', '.join(kinds)}")

    def snapshot(step: int, ema_params: Params) -> None:
        host_params = jax.device_get(ema_params)
        samples = np.asarray(jax.device_get(sample_fn(host_params, step_key(key, step))))
        if kind == "images":
            writer.write_images(step, name, samples, data_range=data_range)
        else:
            writer.write_points(step, name, samples, reference_points=reference_points)

    return snapshot
