"""--mode=train: train from scratch or resume from the workdir's newest readable checkpoint.

SIGTERM (what SLURM and TPU pre-emption send) and SIGINT (Ctrl-C) finish the current step, write a
checkpoint of the step reached, flush the logs and exit with status 128 + the signal's number (143
for SIGTERM, 130 for SIGINT), the shell's convention for "stopped by a signal", so that a scheduler
requeues the job; the same command then resumes from exactly there. A second SIGINT stops at once.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from diffusion import oracle, parallel, training
from diffusion.metric_writers import MetricWriter
from experiments.build import Experiment, Stream
from experiments.workdir import (
    check_resume,
    checkpoint_manager,
    record_config,
    restore_or_initialize,
)

__all__ = ["Preempted", "train"]


class Preempted(Exception):  # noqa: N818 (not an error: the run stopped as asked)
    """Training stopped on a signal after checkpointing; ``exit_status`` is 128 + its number."""

    def __init__(self, signal_number: int, step: int, workdir: str) -> None:
        self.exit_status = 128 + signal_number
        super().__init__(
            f"stopped by {signal.Signals(signal_number).name} at step {step}: checkpoint written in "
            f"{workdir}; run the same command to resume"
        )


@contextlib.contextmanager
def _stop_signals() -> Iterator[list[int]]:
    """While active, SIGTERM and SIGINT are recorded in the yielded list instead of killing the
    process (a second SIGINT restores Python's default and interrupts)."""
    received: list[int] = []
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}

    def handler(number: int, frame: object) -> None:
        received.append(number)
        if number == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    for number in previous:
        signal.signal(number, handler)
    try:
        yield received
    finally:
        for number, old_handler in previous.items():
            signal.signal(number, old_handler)


class _ConsoleEcho:
    """A MetricWriter wrapper that also prints one summary line per log interval."""

    def __init__(self, writer: MetricWriter, n_iters: int) -> None:
        self.writer = writer
        self.n_iters = n_iters

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.writer.write_scalars(step, scalars)
        shown = ("loss", "eps_mse", "grad_norm", "learning_rate", "examples_per_s")
        parts = [f"{name} {float(scalars[name]):.4g}" for name in shown if name in scalars]
        if scalars.get("nonfinite_steps"):
            parts.append(f"skipped (non-finite) {int(scalars['nonfinite_steps'])}")
        tqdm.write(f"step {step}/{self.n_iters}: " + ", ".join(parts))


def _snapshot_fn(experiment: Experiment, writer: MetricWriter):
    if not experiment.training.snapshot_sampling:
        return None
    num = experiment.training.snapshot_num_samples
    reference = None
    if experiment.data.has_oracle:
        truth = oracle.preset(experiment.data.dataset)
        reference = np.asarray(truth.sample(jax.random.key(0), num))

    # The analytic variance's Gamma_t is estimated after training (experiments.sample); snapshots
    # during training draw with beta-tilde instead.
    options = None
    if experiment.needs_eps_sq_norm():
        options = {**experiment.sampling.options_of("ancestral"), "variance": "beta_tilde"}

    def sample_fn(ema_params, key):
        return experiment.sample(ema_params, key, num, options=options).samples

    return training.make_snapshot_fn(
        sample_fn,
        writer,
        experiment.key(Stream.SNAPSHOT),
        kind="points" if experiment.is_toy else "images",
        data_range=experiment.data_range,
        reference_points=reference,
    )


def train(
    experiment: Experiment, workdir: str, *, allow_config_change: bool = False
) -> training.TrainState:
    """Train up to ``experiment.training.n_iters`` steps, resuming from DIR/checkpoints when it holds a state.

    Before anything is written: the data is opened and the config is checked against the workdir's
    record (``experiments.workdir.check_resume``). In a multi-process run every process calls this;
    only process 0 writes the record, logs and snapshots. Raises ``Preempted`` after a checkpointed
    stop on SIGTERM / SIGINT and ``training.NonFiniteTrainingError`` when updates keep failing.
    """
    settings = experiment.training
    batch_fn = experiment.data_source()  # reads the dataset: fails early if it is missing
    changes = check_resume(experiment.record, workdir, allow_change=allow_config_change)
    is_writer = jax.process_index() == 0
    step_fn = training.make_train_step(
        experiment.loss,
        experiment.optimizer,
        learning_rate_fn=experiment.learning_rate_fn,
        ema_decay=settings.ema_decay,
        ema_warmup=settings.ema_warmup,
    )
    runner = parallel.DataParallelStep(step_fn, parallelism=settings.parallelism)
    with checkpoint_manager(experiment, workdir) as manager:
        state, resumed = restore_or_initialize(experiment, manager, runner.state_sharding)
        step = int(state.step)
        for damaged, reason in manager.damaged_steps.items():
            print(f"checkpoint of step {damaged} is unreadable ({reason}); set aside")
        if resumed:
            print(f"resuming from the checkpoint at step {step} in {manager.directory}")
        else:
            print(f"training from scratch: {experiment.param_count():,} parameters")
        if is_writer:
            record_config(experiment, workdir, step, changes)
        writer = MetricWriter(workdir, purge_step=step + 1) if is_writer else None
        with contextlib.ExitStack() as stack, _stop_signals() as received:
            if writer is not None:
                stack.enter_context(writer)
                if not resumed:
                    writer.write_hparams(experiment.record)
            snapshot_fn = _snapshot_fn(experiment, writer) if writer is not None else None
            start = time.perf_counter()
            state = training.train_loop(
                state,
                runner,
                batch_fn,
                num_steps=settings.n_iters,
                log_every=settings.log_freq,
                writer=_ConsoleEcho(writer, settings.n_iters) if writer else None,
                checkpoint_manager=manager,
                snapshot_fn=snapshot_fn,
                snapshot_every=settings.snapshot_freq if snapshot_fn else None,
                steps_per_call=settings.steps_per_call,
                max_nonfinite_steps=settings.max_nonfinite_steps,
                stop_requested=lambda: bool(received),
                progress=is_writer,
            )
    reached = int(state.step)
    if received:
        raise Preempted(received[0], reached, workdir)
    print(f"trained to step {reached} in {time.perf_counter() - start:.1f} s; workdir {workdir}")
    return state
