"""The layout of an experiment's working directory, its record, and loading what training left there.

DIR/config.json            the record: the config whose checkpoints DIR/checkpoints holds
DIR/config_changes.jsonl   every accepted change of the config on resume, with the step it took effect
DIR/checkpoints/<step>/    orbax checkpoints of the TrainState (finalised atomically)
DIR/checkpoints_damaged/   unreadable checkpoints, set aside on resume (never deleted)
DIR/metrics.jsonl          training scalars, one strict-JSON object per line
DIR/tensorboard/           the same scalars and snapshot grids as TensorBoard events
DIR/samples/               training snapshots: <name>_<step>.png and .npz
DIR/sample/                outputs of --mode=sample
DIR/eval/, DIR/sweep/      outputs of --mode=eval and --mode=sweep

A run is a promise: it continues only what its workdir says it is. ``config_changes`` compares a
config with the record: keys that only say how long to train, how often to log, save or look, and how
to sample or evaluate may change on resume (``SAFE_TO_CHANGE``); any other difference would make the
checkpoints mean something else and stops the run (``ResumeMismatchError``) unless the change is
forced (``--allow_config_change``).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax

from diffusion import training
from diffusion.checkpoints import CheckpointManager, abstract_state
from diffusion.images import write_atomically
from experiments.build import Experiment, Stream, config_to_json
from experiments.configs import base

__all__ = [
    "SAFE_TO_CHANGE",
    "ResumeMismatchError",
    "WorkdirError",
    "check_workdir",
    "checkpoint_manager",
    "config_changes",
    "has_checkpoints",
    "initial_state",
    "read_record",
    "record_config",
    "restore_ema_params",
    "restore_or_initialize",
]

CONFIG_FILENAME = "config.json"
CHANGES_FILENAME = "config_changes.jsonl"
CHECKPOINTS_DIR = "checkpoints"

# Dotted keys (or whole sections) that do not change what the checkpoints are.
SAFE_TO_CHANGE = (
    "training.n_iters",
    "training.log_freq",
    "training.snapshot_freq",
    "training.snapshot_sampling",
    "training.snapshot_num_samples",
    "training.checkpoint_freq",
    "training.keep_checkpoints",
    "training.steps_per_call",
    "training.remat",  # recomputes the same activations: the same model, the same updates
    "training.max_nonfinite_steps",
    "data.data_dir",
    "data.idx_dir",
    "sampling",
    "eval",
)


class WorkdirError(ValueError):
    """The workdir cannot be used: a file, not writable, or not creatable."""


class ResumeMismatchError(ValueError):
    """The config differs from the workdir's record in keys that change what its checkpoints are."""


def check_workdir(workdir: str) -> None:
    """Raise WorkdirError unless ``workdir`` is (or can be created as) a writable directory.

    Creates nothing: for a missing workdir the nearest existing parent must be a writable directory.
    """
    path = os.path.abspath(workdir)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise WorkdirError(f"workdir {workdir!r} is a file, not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise WorkdirError(f"workdir {workdir!r} is not writable")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise WorkdirError(f"workdir {workdir!r} cannot be created: {parent!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {workdir!r} cannot be created: {parent!r} is not writable")


def has_checkpoints(workdir: str) -> bool:
    """Whether DIR/checkpoints holds a finalised step (a directory named by a number)."""
    directory = os.path.join(workdir, CHECKPOINTS_DIR)
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def read_record(workdir: str) -> dict[str, Any] | None:
    """The config recorded in DIR/config.json (as plain JSON values), or None if there is none."""
    path = os.path.join(workdir, CONFIG_FILENAME)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


@functools.cache
def _base_defaults() -> dict[str, Any]:
    """The base config's keys and default values, as a record flattens them."""
    return _flatten(json.loads(config_to_json(base.get_base_config())))


def _is_safe(key: str, recorded: Mapping[str, Any]) -> bool:
    if key == "training.n_iters" and recorded.get("optim.decay") == "cosine":
        return False  # the cosine schedule's length is n_iters: changing it changes every lr
    return any(key == safe or key.startswith(safe + ".") for safe in SAFE_TO_CHANGE)


def config_changes(
    recorded: Mapping[str, Any], record: Mapping[str, Any]
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """(safe, unsafe) differences between two records (configs as JSON values):
    {key: (recorded, new)}."""
    old = _flatten(recorded)
    new = _flatten(record)
    differing = {
        key: (old.get(key), new.get(key))
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    }
    # A key the project added after the workdir was made, at its default, is what the workdir ran
    # with (a new key's default keeps the old behaviour): recorded, never refused.
    defaults = _base_defaults()
    safe = {
        key: values
        for key, values in differing.items()
        if _is_safe(key, old) or (key not in old and key in defaults and values[1] == defaults[key])
    }
    unsafe = {key: values for key, values in differing.items() if key not in safe}
    return safe, unsafe


def check_resume(
    record: Mapping[str, Any], workdir: str, *, allow_change: bool
) -> dict[str, tuple[Any, Any]]:
    """The changes of ``record`` (``Experiment.record``) against the workdir's (empty without
    checkpoints).

    Raises ResumeMismatchError listing each key that changes what the checkpoints are, with both
    values, unless ``allow_change``. Writes nothing.
    """
    recorded = read_record(workdir)
    if recorded is None or not has_checkpoints(workdir):
        return {}
    safe, unsafe = config_changes(recorded, record)
    if unsafe and not allow_change:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in unsafe.items())
        raise ResumeMismatchError(
            f"{os.path.join(workdir, CONFIG_FILENAME)} records another experiment than this "
            f"config; differing: {listed}. Use another --workdir, or pass "
            "--allow_config_change to continue these checkpoints with the new values"
        )
    return {**safe, **unsafe}


def record_config(
    experiment: Experiment, workdir: str, step: int, changes: Mapping[str, tuple[Any, Any]]
) -> None:
    """Write DIR/config.json atomically and append the accepted ``changes`` (if any) with the step
    from which they apply to DIR/config_changes.jsonl."""
    text = json.dumps(experiment.record, indent=2, sort_keys=True).encode()
    write_atomically(os.path.join(workdir, CONFIG_FILENAME), lambda file: file.write(text))
    if changes:
        entry = {
            "step": step,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "changes": {key: {"from": old, "to": new} for key, (old, new) in changes.items()},
        }
        with open(os.path.join(workdir, CHANGES_FILENAME), "a", encoding="utf-8") as file:
            file.write(json.dumps(entry) + "\n")


def checkpoint_manager(experiment: Experiment, workdir: str) -> CheckpointManager:
    return CheckpointManager(
        os.path.join(workdir, CHECKPOINTS_DIR),
        save_every=experiment.training.checkpoint_freq,
        keep_last=experiment.training.keep_checkpoints,
    )


def initial_state(experiment: Experiment) -> training.TrainState:
    """The TrainState at step 0 (parameters initialised from the config's seed)."""
    params = experiment.init_params(experiment.key(Stream.INIT))
    return training.create_train_state(params, experiment.optimizer, experiment.key(Stream.TRAIN))


def _abstract_initial_state(experiment: Experiment, sharding: Any = None) -> Any:
    abstract = abstract_state(jax.eval_shape(lambda: initial_state(experiment)))
    if sharding is None:
        return abstract
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract
    )


def restore_ema_params(experiment: Experiment, workdir: str, step: int | None = None):
    """(step, EMA params) of the latest readable (or the given) checkpoint in DIR/checkpoints.

    Raises FileNotFoundError naming the directory when there is none (creating nothing).
    """
    if not has_checkpoints(workdir):
        raise FileNotFoundError(
            f"no checkpoint in {os.path.join(workdir, CHECKPOINTS_DIR)}: train first "
            "(--mode=train with the same --config and --workdir)"
        )
    with checkpoint_manager(experiment, workdir) as manager:
        state = manager.restore(_abstract_initial_state(experiment), step=step)
    return int(state.step), state.ema_params


def restore_or_initialize(
    experiment: Experiment, manager: CheckpointManager, sharding: Any = None
) -> tuple[training.TrainState, bool]:
    """The newest readable state in ``manager`` (placed with ``sharding``), or a fresh one; and
    whether it was restored."""
    if manager.latest_step() is None:
        return initial_state(experiment), False
    return manager.restore(_abstract_initial_state(experiment, sharding)), True
