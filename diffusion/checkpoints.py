"""Checkpoints of a ``TrainState`` with orbax: periodic, retained by policy, atomic, asynchronous.

Layout: ``directory/<step>/state/...`` (the state saved with ``StandardSave``), plus orbax's
metadata and, when a best metric is tracked, the metrics of the step.

Atomicity. orbax writes a step into ``<step>.orbax-checkpoint-tmp-<timestamp>`` and renames it to
``<step>`` only once every file is written (on object stores, where rename is not atomic, it
writes a ``commit_success.txt`` last instead). Steps are listed from finalised directories only,
so a process killed mid-save leaves a temporary directory that restore never picks; such
leftovers are deleted when the next ``CheckpointManager`` opens the directory.

Asynchrony. ``save`` returns once the arrays are copied to host memory; the files are written by
a background thread. ``wait_until_finished`` (called by ``close`` and by ``train_loop`` on exit)
blocks until every pending save is finalised.

A state produced by the pmap wrapper must be saved unreplicated
(``DataParallelStep.host_state``); restore gives a single copy placed by the target's shardings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["BEST_MODES", "CheckpointManager", "abstract_state"]

BEST_MODES = ("min", "max")
_STATE_ITEM = "state"

PyTree = Any


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
    """Saves a train state every ``save_every`` steps and keeps:

    * the last ``keep_last`` checkpoints (None: all);
    * every checkpoint whose step is a multiple of ``keep_period`` (milestones, kept forever;
      a multiple of ``save_every``, so that milestones are saved at all);
    * with ``best_metric``, the ``keep_best`` checkpoints with the lowest (``best_mode='min'``) or
      highest ('max') value of that metric among those saved with metrics.

    ``async_save`` writes files in a background thread (see the module docstring). Wraps
    ``orbax.checkpoint.CheckpointManager`` (orbax-checkpoint 0.12: save decision and preservation
    policies). Use as a context manager, or call ``close``, so that pending saves finish.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        keep_last: int | None = 3,
        keep_period: int | None = None,
        best_metric: str | None = None,
        best_mode: str = "min",
        keep_best: int = 1,
        async_save: bool = True,
    ) -> None:
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every!r}")
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None (keep all), got {keep_last!r}")
        if keep_period is not None and (keep_period < 1 or keep_period % save_every):
            raise ValueError(
                f"keep_period must be a positive multiple of save_every = {save_every}, "
                f"got {keep_period!r}"
            )
        if best_mode not in BEST_MODES:
            raise ValueError(f"unknown best_mode {best_mode!r}; accepted: {', '.join(BEST_MODES)}")
        if keep_best < 1:
            raise ValueError(f"keep_best must be >= 1, got {keep_best!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        self.best_metric = best_metric
        policies = ocp.checkpoint_managers
        preservation = [policies.LatestN(n=keep_last)]
        if keep_period is not None:
            preservation.append(policies.EveryNSteps(interval_steps=keep_period))
        best_fn = None
        if best_metric is not None:

            def best_fn(metrics: Mapping[str, float]) -> float:
                return metrics[best_metric]

            preservation.append(
                policies.BestN(
                    get_metric_fn=best_fn,
                    # BestN keeps the last n in ascending order: descending keeps the lowest.
                    reverse=best_mode == "min",
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.FixedIntervalPolicy(save_every),
            preservation_policy=policies.AnyPreservationPolicy(preservation),
            best_fn=best_fn,  # makes orbax store the metrics with each step and rank best_step
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def should_save(self, step: int) -> bool:
        """Whether ``step`` is a save step (a multiple of ``save_every``)."""
        return self._manager.should_save(step)

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Save ``state`` (a single, unreplicated copy) as ``step`` if ``should_save(step)`` or
        ``force``; return whether a save started. ``metrics`` rank the step for ``best_metric``.

        Raises:
          ValueError: ``best_metric`` is tracked and ``metrics`` lacks it.
        """
        if self.best_metric is not None and metrics is not None and self.best_metric not in metrics:
            raise ValueError(
                f"metrics lack the tracked best_metric {self.best_metric!r}; got {sorted(metrics)}"
            )
        if self.best_metric is None:
            metrics = None
        elif metrics is not None:
            metrics = {name: float(value) for name, value in metrics.items()}
        return self._manager.save(
            step,
            args=ocp.args.Composite(**{_STATE_ITEM: ocp.args.StandardSave(state)}),
            metrics=metrics,
            force=force,
        )

    def restore(self, target: PyTree, *, step: int | None = None) -> PyTree:
        """The state saved at ``step`` (None: the latest finalised step), with the structure,
        dtypes and shardings of ``target`` (a concrete state or ``abstract_state``; leaves without
        a sharding go to the first local device).

        Raises:
          FileNotFoundError: no finalised checkpoint in the directory.
          ValueError: ``step`` is not a finalised checkpoint.
        """
        self.wait_until_finished()  # a pending save of this process is not yet readable
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no finalised checkpoint in {self.directory}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ValueError(f"no checkpoint at step {step!r} in {self.directory}; have {steps}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{_STATE_ITEM: ocp.args.StandardRestore(_with_default_sharding(target))}
            ),
        )
        return restored[_STATE_ITEM]

    def latest_step(self) -> int | None:
        """The latest finalised (or pending, after an async save) step; None if there is none."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best ``best_metric`` (the latest step if no metric is tracked)."""
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        """The retained steps, ascending."""
        return sorted(self._manager.all_steps())

    def metrics(self, step: int) -> dict[str, float] | None:
        """The metrics saved with ``step`` (only when a best metric is tracked)."""
        return self._manager.metrics(step)

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
