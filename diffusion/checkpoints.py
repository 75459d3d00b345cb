"""Checkpoints of a ``TrainState`` with orbax, and the three guarantees orbax does not give alone.

Layout: ``directory/<step>/state/...`` (the state saved with ``StandardSave``) plus orbax's metadata.
orbax (``orbax.checkpoint.CheckpointManager``) already makes saves periodic, asynchronous, atomic and
collective across processes: it writes a step into ``<step>.orbax-checkpoint-tmp-<timestamp>`` and
renames it to ``<step>`` only once every file is written, lists finalised steps only, deletes
temporary leftovers when a manager opens the directory, and keeps the last ``keep_last`` steps.
``save`` returns once the arrays are copied to host memory; ``wait_until_finished`` (called by
``close`` and by ``train_loop`` on exit) blocks until pending saves are finalised.

What this wrapper adds:

* a state with a non-finite value is never written (``NonFiniteStateError``, before anything is
  written), so a diverged run cannot push good checkpoints out of the retained set;
* ``restore`` reads the newest *readable* step: finalised steps newer than it that cannot be read (a
  truncated or deleted file) are moved aside to ``<directory>_damaged/<step>`` (nothing is deleted)
  and reported in ``damaged_steps``; if no step can be read, nothing is moved and the error is raised;
* a checkpoint that does not fit the target (another model) is refused before any array is read,
  naming each parameter path with the saved and the expected shape (``CheckpointMismatchError``).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

__all__ = [
    "CheckpointManager",
    "CheckpointMismatchError",
    "NonFiniteStateError",
    "abstract_state",
    "all_finite",
]

_STATE_ITEM = "state"

PyTree = Any


class CheckpointMismatchError(ValueError):
    """The checkpoint holds arrays of other shapes (or other parameters) than the target."""


class NonFiniteStateError(ValueError):
    """A state with NaN or infinite values was given to ``CheckpointManager.save``."""


def abstract_state(state: PyTree) -> PyTree:
    """The structure of ``state`` as ``jax.ShapeDtypeStruct`` leaves (shape, dtype, sharding).

    A restore target that allocates nothing: e.g. ``abstract_state(jax.eval_shape(init_fn))`` or
    of a concrete state placed where the restored arrays should go.
    """
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(
            leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None)
        ),
        state,
    )


def all_finite(tree: PyTree) -> bool:
    """Whether every floating-point leaf of ``tree`` is finite (one reduction per leaf)."""
    checks = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    return bool(jnp.all(jnp.stack(checks))) if checks else True


def _path_name(path: tuple) -> str:
    """'params/Dense_0/kernel' for a key path of attributes, dict keys and sequence indices."""
    parts = []
    for entry in path:
        for attribute in ("name", "key", "idx"):
            if hasattr(entry, attribute):
                parts.append(str(getattr(entry, attribute)))
                break
    return "/".join(parts)


def _shapes_by_path(tree: PyTree, skip: frozenset[str] = frozenset()) -> dict[str, tuple[int, ...]]:
    """Shapes of the leaves of ``tree`` by path, leaving out the paths in ``skip``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    shapes = {_path_name(path): tuple(leaf.shape) for path, leaf in leaves}
    return {path: shape for path, shape in shapes.items() if path not in skip}


def _key_paths(tree: PyTree) -> frozenset[str]:
    """Paths of the typed PRNG keys of ``tree`` (saved as their raw data, of another shape)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return frozenset(
        _path_name(path) for path, leaf in leaves if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    )


def _with_default_sharding(target: PyTree) -> PyTree:
    """Give leaves without a sharding the first device (orbax needs a placement for each)."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda leaf: (
            leaf
            if leaf.sharding is not None
            else jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=default)
        ),
        abstract_state(target),
    )


class CheckpointManager:
    """Saves a train state every ``save_every`` steps, keeps the last ``keep_last`` (None: all).

    ``async_save`` writes files in a background thread (module docstring). Use as a context manager,
    or call ``close``, so that pending saves finish. In a multi-process run every process calls
    every method (orbax saves and restores collectively).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        keep_last: int | None = 3,
        async_save: bool = True,
    ) -> None:
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every!r}")
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None (keep all), got {keep_last!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        self.damaged_steps: dict[int, str] = {}
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.FixedIntervalPolicy(save_every),
            preservation_policy=policies.LatestN(n=keep_last),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={_STATE_ITEM: ocp.StandardCheckpointHandler()},
        )

    def should_save(self, step: int) -> bool:
        """Whether ``step`` is a save step (a multiple of ``save_every``)."""
        return self._manager.should_save(step)

    def save(self, step: int, state: PyTree, *, force: bool = False) -> bool:
        """Save ``state`` as ``step`` if ``should_save(step)`` or ``force``; return whether a save
        started.

        Raises:
          NonFiniteStateError: a floating-point leaf holds NaN or inf (nothing is written).
        """
        if not all_finite(state):
            raise NonFiniteStateError(
                f"refusing to write a checkpoint of step {step} with non-finite values to "
                f"{self.directory}"
            )
        return self._manager.save(
            step,
            args=ocp.args.Composite(**{_STATE_ITEM: ocp.args.StandardSave(state)}),
            force=force,
        )

    def check_fits(self, target: PyTree, step: int) -> None:
        """Raise CheckpointMismatchError unless step ``step`` holds arrays of the target's shapes.

        Reads only the checkpoint's metadata; the message names every differing path.
        """
        keys = _key_paths(target)
        saved = _shapes_by_path(self._manager.item_metadata(step)[_STATE_ITEM].tree, keys)
        expected = _shapes_by_path(target, keys)
        problems = [
            f"{path}: checkpoint {saved[path]}, model {expected[path]}"
            for path in sorted(saved.keys() & expected.keys())
            if saved[path] != expected[path]
        ]
        problems += [
            f"{path}: in the model, not in the checkpoint"
            for path in sorted(expected.keys() - saved.keys())
        ]
        problems += [
            f"{path}: in the checkpoint, not in the model"
            for path in sorted(saved.keys() - expected.keys())
        ]
        if problems:
            shown = "; ".join(problems[:5]) + (
                f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
            )
            raise CheckpointMismatchError(
                f"the checkpoint of step {step} in {self.directory} does not fit the model: {shown}"
            )

    def restore(self, target: PyTree, *, step: int | None = None) -> PyTree:
        """The state saved at ``step`` (None: the newest readable step), with the structure, dtypes
        and shardings of ``target`` (a concrete state or ``abstract_state``; leaves without a
        sharding go to the first local device).

        With ``step=None`` a step that cannot be read is skipped for the next older one and moved
        aside once an older one has been read (module docstring); a given ``step`` is read or the
        error raised.

        Raises:
          FileNotFoundError: no finalised checkpoint, or none that can be read.
          ValueError: ``step`` is not a finalised checkpoint.
          CheckpointMismatchError: the checkpoint does not fit ``target``.
        """
        self.wait_until_finished()  # a pending save of this process is not yet readable
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise ValueError(
                    f"no checkpoint at step {step!r} in {self.directory}; have {steps}"
                )
            self.check_fits(target, step)
            return self._restore(target, step)
        unreadable: list[tuple[int, Exception]] = []
        for candidate in reversed(steps):
            try:
                self.check_fits(target, candidate)
                restored = self._restore(target, candidate)
            except CheckpointMismatchError:
                raise
            except Exception as error:  # any failure to read the step's files
                unreadable.append((candidate, error))
                continue
            for damaged_step, error in unreadable:
                self._set_aside(damaged_step, f"{type(error).__name__}: {error}")
            return restored
        if not unreadable:
            raise FileNotFoundError(f"no finalised checkpoint in {self.directory}")
        # Nothing readable at all: more likely a wrong target or environment than damage to every
        # step, so nothing is moved.
        newest, error = unreadable[0]
        raise FileNotFoundError(
            f"none of the {len(steps)} checkpoints in {self.directory} can be read; step {newest}: "
            f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        ) from error

    def _restore(self, target: PyTree, step: int) -> PyTree:
        args = ocp.args.StandardRestore(_with_default_sharding(target))
        restored = self._manager.restore(step, args=ocp.args.Composite(**{_STATE_ITEM: args}))
        return restored[_STATE_ITEM]

    def _set_aside(self, step: int, reason: str) -> None:
        """Move an unreadable step to ``<directory>_damaged/<step>`` and forget it."""
        self.damaged_steps[step] = reason.splitlines()[0][:300]
        if jax.process_index() == 0:
            destination = os.path.join(f"{self.directory}_damaged", str(step))
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            if os.path.exists(destination):
                shutil.rmtree(destination)
            shutil.move(os.path.join(self.directory, str(step)), destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set aside damaged checkpoint {step}")
        self._manager.reload()

    def latest_step(self) -> int | None:
        """The latest finalised (or pending, after an async save) step; None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The retained steps, ascending."""
        return sorted(self._manager.all_steps())

    def wait_until_finished(self) -> None:
        """Block until every pending asynchronous save is finalised (and old steps deleted)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release orbax's threads."""
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
