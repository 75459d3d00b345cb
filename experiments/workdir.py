"""The layout of an experiment's working directory, and loading what training left there.

DIR/config.json          the config of the last train run (written atomically)
DIR/checkpoints/<step>/  orbax checkpoints of the TrainState (finalised atomically)
DIR/metrics.jsonl        training scalars, one JSON object per line
DIR/tensorboard/         the same scalars and snapshot grids as TensorBoard events
DIR/samples/             training snapshots: <name>_<step>.png and .npz
DIR/sample/              outputs of --mode=sample
DIR/eval/, DIR/sweep/    outputs of --mode=eval and --mode=sweep
"""

from __future__ import annotations

import os
from typing import Any

import jax

from diffusion import training
from diffusion.checkpoints import CheckpointManager, abstract_state
from diffusion.images import write_atomically
from experiments.build import Experiment, config_to_json

__all__ = [
    "checkpoint_manager",
    "initial_state",
    "restore_ema_params",
    "restore_or_initialize",
    "write_config",
]


def write_config(experiment: Experiment, workdir: str) -> str:
    """Write DIR/config.json atomically; return its path."""
    path = os.path.join(workdir, "config.json")
    text = config_to_json(experiment.config).encode()
    write_atomically(path, lambda file: file.write(text))
    return path


def checkpoint_manager(experiment: Experiment, workdir: str) -> CheckpointManager:
    training_config = experiment.config.training
    return CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        save_every=int(training_config.checkpoint_freq),
        keep_last=int(training_config.keep_checkpoints),
    )


def _keys(experiment: Experiment) -> tuple[jax.Array, jax.Array]:
    root = jax.random.PRNGKey(int(experiment.config.seed))
    return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)  # init, training


def initial_state(experiment: Experiment) -> training.TrainState:
    """The TrainState at step 0 (parameters initialised from the config's seed)."""
    init_key, train_key = _keys(experiment)
    params = experiment.init_params(init_key)
    return training.create_train_state(params, experiment.optimizer, train_key)


def _abstract_initial_state(experiment: Experiment) -> Any:
    return abstract_state(jax.eval_shape(lambda: initial_state(experiment)))


def restore_ema_params(experiment: Experiment, workdir: str, step: int | None = None):
    """(step, EMA params) of the latest (or the given) finalised checkpoint in DIR/checkpoints.

    Raises FileNotFoundError naming the directory when there is none.
    """
    with checkpoint_manager(experiment, workdir) as manager:
        state = manager.restore(_abstract_initial_state(experiment), step=step)
    return int(state.step), state.ema_params


def restore_or_initialize(experiment: Experiment, manager: CheckpointManager):
    """The latest finalised state in ``manager``, or a fresh one; and whether it was restored."""
    if manager.latest_step() is None:
        return initial_state(experiment), False
    return manager.restore(_abstract_initial_state(experiment)), True
