"""Checkpoints: retention policies, atomic finalisation, asynchronous saves, restore structure."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion import training
from diffusion.checkpoints import CheckpointManager, abstract_state

OPTIMIZER = optax.adam(1e-3)
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step directory still being written


def make_state(value: float) -> training.TrainState:
    """A small train state whose every float leaf is derived from ``value``."""
    params = {"dense": {"kernel": jnp.full((3, 2), value), "bias": jnp.arange(2.0) + value}}
    return training.create_train_state(params, OPTIMIZER, jax.random.key(int(value)))


def quadratic_loss(params, batch, key, *, train=True):
    del key
    prediction = batch["x"] @ params["dense"]["kernel"] + params["dense"]["bias"]
    return jnp.mean(prediction**2), {}


def host(state):
    """Host copy of a state with the typed key as raw data (comparable with numpy)."""
    return jax.device_get(state.replace(key=jax.random.key_data(state.key)))


def assert_states_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, host(actual), host(expected))
    assert actual.key.dtype == expected.key.dtype


def save_steps(manager, steps, losses=None):
    for index, step in enumerate(steps):
        metrics = None if losses is None else {"loss": losses[index]}
        manager.save(step, make_state(float(step)), metrics=metrics, force=True)
    manager.wait_until_finished()


def test_keep_last_n(tmp_path):
    with CheckpointManager(tmp_path, save_every=1, keep_last=2) as manager:
        save_steps(manager, range(1, 6))
        assert manager.all_steps() == [4, 5]
    assert sorted(os.listdir(tmp_path)) == ["4", "5"]


def test_should_save_every_k_steps(tmp_path):
    with CheckpointManager(tmp_path, save_every=5) as manager:
        assert [step for step in range(1, 21) if manager.should_save(step)] == [5, 10, 15, 20]


def test_milestones_are_kept_forever(tmp_path):
    with CheckpointManager(tmp_path, save_every=2, keep_last=1, keep_period=4) as manager:
        save_steps(manager, range(2, 12, 2))
        assert manager.all_steps() == [4, 8, 10]


@pytest.mark.parametrize(
    ("best_mode", "losses", "expected_best"),
    [("min", (3.0, 1.0, 4.0, 1.5, 5.0), 2), ("max", (3.0, 1.0, 4.0, 1.5, 2.0), 3)],
)
def test_best_checkpoint_is_kept(tmp_path, best_mode, losses, expected_best):
    with CheckpointManager(
        tmp_path, save_every=1, keep_last=1, best_metric="loss", best_mode=best_mode
    ) as manager:
        save_steps(manager, range(1, 6), losses)
        assert manager.all_steps() == [expected_best, 5]
        assert manager.best_step() == expected_best
        assert manager.metrics(expected_best) == {"loss": losses[expected_best - 1]}
        with pytest.raises(ValueError, match="best_metric"):
            manager.save(6, make_state(6.0), metrics={"accuracy": 1.0}, force=True)


def test_restore_ignores_an_unfinalised_step(tmp_path):
    with CheckpointManager(tmp_path, save_every=3) as manager:
        save_steps(manager, [3, 6])
    # A complete copy of step 6 that was never renamed (as a kill before the final rename
    # leaves it), and an empty temporary directory of a save killed at its start.
    shutil.copytree(tmp_path / "6", tmp_path / f"9{TMP_SUFFIX}")
    os.mkdir(tmp_path / f"12{TMP_SUFFIX}")
    with CheckpointManager(tmp_path, save_every=3) as manager:
        assert manager.all_steps() == [3, 6]
        assert manager.latest_step() == 6
        target = abstract_state(make_state(0.0))
        assert_states_equal(manager.restore(target), make_state(6.0))
        assert_states_equal(manager.restore(target, step=3), make_state(3.0))
        with pytest.raises(ValueError, match="step 9"):
            manager.restore(target, step=9)
        # The resumed run saves step 9 for real: orbax first removes the leftovers.
        save_steps(manager, [9])
        assert_states_equal(manager.restore(target), make_state(9.0))
    assert sorted(os.listdir(tmp_path)) == ["3", "6", "9"]


def test_restore_without_checkpoints_raises(tmp_path):
    with (
        CheckpointManager(tmp_path, save_every=1) as manager,
        pytest.raises(FileNotFoundError, match="no finalised checkpoint"),
    ):
        manager.restore(abstract_state(make_state(0.0)))


def test_async_save_survives_donation_and_restores_into_abstract_structure(tmp_path):
    """The saved values are those at save time even though the next (donating) step frees the
    device buffers before the background write ends; restore needs only shapes and dtypes."""
    optimizer = optax.adam(1e-2)
    step_fn = training.make_train_step(
        quadratic_loss, optimizer, learning_rate_fn=1e-2, ema_decay=0.9
    )
    runner = training.DataParallelStep(step_fn, devices=jax.devices()[:1])
    initial = training.create_train_state(make_state(1.0).params, optimizer, jax.random.key(3))
    batch = runner.put_batch({"x": np.ones((4, 3), np.float32)})
    state, _ = runner.step(runner.put_state(initial), batch)
    expected = host(state)
    with CheckpointManager(tmp_path, save_every=1, async_save=True) as manager:
        manager.save(1, state)
        for _ in range(3):
            state, _ = runner.step(state, batch)
        manager.wait_until_finished()
        abstract = jax.eval_shape(
            lambda: training.create_train_state(
                make_state(0.0).params, optimizer, jax.random.key(0)
            )
        )
        restored = manager.restore(abstract)
    assert jax.tree.structure(restored) == jax.tree.structure(initial)
    assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
    jax.tree.map(np.testing.assert_array_equal, host(restored), expected)
    assert jnp.issubdtype(restored.key.dtype, jax.dtypes.prng_key)
    assert int(restored.step) == 1


@pytest.mark.parametrize("parallelism", ["jit", "pmap"])
def test_states_of_both_wrappers_round_trip(tmp_path, parallelism):
    """jit: the replicated state is saved as is and restored replicated over the same mesh.
    pmap: the unreplicated host state is saved and restored on one device."""
    runner = training.DataParallelStep(
        lambda state, batch, axis_name=None: (state, {}), parallelism=parallelism
    )
    state = make_state(2.0)
    placed = runner.put_state(state)
    with CheckpointManager(tmp_path, save_every=1) as manager:
        manager.save(7, runner.host_state(placed))
        if parallelism == "jit":
            target = abstract_state(placed)
        else:
            target = abstract_state(jax.eval_shape(lambda: state))
        restored = manager.restore(target)
    assert_states_equal(restored, state)
    if parallelism == "jit":
        assert restored.params["dense"]["kernel"].sharding == runner.state_sharding
        assert len(restored.params["dense"]["kernel"].addressable_shards) == 4
    else:
        assert_states_equal(runner.host_state(runner.put_state(restored)), state)


def test_bad_arguments_raise_early(tmp_path):
    with pytest.raises(ValueError, match="save_every"):
        CheckpointManager(tmp_path, save_every=0)
    with pytest.raises(ValueError, match="keep_period"):
        CheckpointManager(tmp_path, save_every=3, keep_period=4)
    with pytest.raises(ValueError, match="best_mode"):
        CheckpointManager(tmp_path, save_every=1, best_metric="loss", best_mode="lowest")
