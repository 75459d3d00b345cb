"""--mode=train: train from scratch or resume from the workdir's latest checkpoint."""

from __future__ import annotations

import time
from collections.abc import Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from diffusion import training
from diffusion.metric_writers import MetricWriter
from experiments.build import Experiment
from experiments.workdir import checkpoint_manager, restore_or_initialize, write_config

__all__ = ["train"]


class _ConsoleEcho:
    """A MetricWriter wrapper that also prints one summary line per log interval."""

    def __init__(self, writer: MetricWriter, n_iters: int) -> None:
        self.writer = writer
        self.n_iters = n_iters

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.writer.write_scalars(step, scalars)
        shown = ("loss", "eps_mse", "grad_norm", "learning_rate", "examples_per_s")
        parts = [
            f"{name} {float(np.ravel(scalars[name])[-1]):.4g}" for name in shown if name in scalars
        ]
        tqdm.write(f"step {step}/{self.n_iters}: " + ", ".join(parts))


def _snapshot_fn(experiment: Experiment, writer: MetricWriter):
    config = experiment.config
    if not config.training.snapshot_sampling:
        return None
    num = int(config.training.snapshot_num_samples)
    snapshot_key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 2)

    def sample_fn(ema_params, key):
        return experiment.sample(ema_params, key, num).samples

    return training.make_snapshot_fn(
        sample_fn,
        writer,
        snapshot_key,
        kind="points" if experiment.is_toy else "images",
        data_range=experiment.data_range,
    )


def train(experiment: Experiment, workdir: str) -> training.TrainState:
    """Train up to config.training.n_iters, resuming from DIR/checkpoints when it holds a state."""
    config = experiment.config
    train_config = config.training
    batch_fn = experiment.data_source()  # reads the dataset: fails early if it is missing
    write_config(experiment, workdir)
    with checkpoint_manager(experiment, workdir) as manager:
        state, resumed = restore_or_initialize(experiment, manager)
        step = int(state.step)
        if resumed:
            print(f"resuming from the checkpoint at step {step} in {manager.directory}")
        else:
            print(f"training from scratch: {experiment.param_count():,} parameters")
        with MetricWriter(workdir, purge_step=step + 1 if resumed else None) as writer:
            if not resumed:
                writer.write_hparams(config.to_dict())
            learning_rate_fn = training.learning_rate_schedule(
                float(config.optim.lr),
                warmup_steps=int(config.optim.warmup),
                decay=config.optim.decay,
                total_steps=int(train_config.n_iters),
            )
            step_fn = training.make_train_step(
                experiment.loss,
                experiment.optimizer,
                learning_rate_fn=learning_rate_fn,
                ema_decay=float(train_config.ema_decay),
                ema_warmup=bool(train_config.ema_warmup),
            )
            runner = training.DataParallelStep(step_fn, parallelism=train_config.parallelism)
            snapshot_fn = _snapshot_fn(experiment, writer)
            start = time.perf_counter()
            state = training.train_loop(
                state,
                runner,
                batch_fn,
                num_steps=int(train_config.n_iters),
                log_every=int(train_config.log_freq),
                writer=_ConsoleEcho(writer, int(train_config.n_iters)),
                checkpoint_manager=manager,
                snapshot_fn=snapshot_fn,
                snapshot_every=int(train_config.snapshot_freq) if snapshot_fn else None,
                steps_per_call=int(train_config.steps_per_call),
            )
    print(
        f"trained to step {int(state.step)} in {time.perf_counter() - start:.1f} s; "
        f"workdir {workdir}"
    )
    return state
