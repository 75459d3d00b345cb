"""Checkpoints: retention, atomic finalisation, asynchronous saves, restore structure, and the
guarantees added to orbax: no non-finite state written, damaged steps skipped, mismatches named."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion import parallel, training
from diffusion.checkpoints import (
    CheckpointManager,
    CheckpointMismatchError,
    NonFiniteStateError,
    abstract_state,
)

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


def save_steps(manager, steps):
    for step in steps:
        manager.save(step, make_state(float(step)), force=True)
    manager.wait_until_finished()


def test_keep_last_n(tmp_path):
    with CheckpointManager(tmp_path, save_every=1, keep_last=2) as manager:
        save_steps(manager, range(1, 6))
        assert manager.all_steps() == [4, 5]
    assert sorted(os.listdir(tmp_path)) == ["4", "5"]


def test_should_save_every_k_steps(tmp_path):
    with CheckpointManager(tmp_path, save_every=5) as manager:
        assert [step for step in range(1, 21) if manager.should_save(step)] == [5, 10, 15, 20]


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
    runner = parallel.DataParallelStep(step_fn, devices=jax.devices()[:1])
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


@pytest.mark.parametrize("parallelism", ["jit", "shard_map"])
def test_states_of_both_wrappers_round_trip(tmp_path, parallelism):
    """The replicated state is saved as is and restored replicated over the same mesh."""
    runner = parallel.DataParallelStep(
        lambda state, batch, axis_name=None: (state, {}), parallelism=parallelism
    )
    state = make_state(2.0)
    placed = runner.put_state(state)
    with CheckpointManager(tmp_path, save_every=1) as manager:
        manager.save(7, placed)
        restored = manager.restore(abstract_state(placed))
    assert_states_equal(restored, state)
    assert restored.params["dense"]["kernel"].sharding == runner.state_sharding
    assert len(restored.params["dense"]["kernel"].addressable_shards) == 4


def test_a_nonfinite_state_is_never_written(tmp_path):
    state = make_state(1.0)
    bad = state.replace(
        ema_params={
            **state.ema_params,
            "dense": {**state.ema_params["dense"], "bias": jnp.array([0.0, jnp.nan])},
        }
    )
    with CheckpointManager(tmp_path, save_every=1) as manager:
        manager.save(1, state)
        with pytest.raises(NonFiniteStateError, match="step 2"):
            manager.save(2, bad)
        assert manager.all_steps() == [1]


def damage(step_directory):
    """Truncate the array data files of a finalised step (as a disk or copy failure would)."""
    for root, _, names in os.walk(step_directory):
        if os.path.basename(root) == "d":
            for name in names:
                path = os.path.join(root, name)
                with open(path, "r+b") as file:
                    file.truncate(os.path.getsize(path) // 2)


def test_an_unreadable_latest_step_is_set_aside_for_the_newest_readable(tmp_path):
    directory = tmp_path / "checkpoints"
    with CheckpointManager(directory, save_every=1) as manager:
        save_steps(manager, [1, 2, 3])
    damage(directory / "3")
    with CheckpointManager(directory, save_every=1) as manager:
        restored = manager.restore(abstract_state(make_state(0.0)))
        assert_states_equal(restored, make_state(2.0))
        assert list(manager.damaged_steps) == [3]
        assert manager.all_steps() == [1, 2]
        # The resumed run can save step 3 again; the damaged copy is kept for inspection.
        save_steps(manager, [3])
        assert_states_equal(manager.restore(abstract_state(make_state(0.0))), make_state(3.0))
    assert os.listdir(tmp_path / "checkpoints_damaged") == ["3"]


def test_a_checkpoint_of_another_model_is_refused_naming_the_paths(tmp_path):
    with CheckpointManager(tmp_path, save_every=1) as manager:
        save_steps(manager, [1])
        wider = {"dense": {"kernel": jnp.zeros((3, 5)), "bias": jnp.zeros(5)}}
        target = abstract_state(training.create_train_state(wider, OPTIMIZER, jax.random.key(0)))
        with pytest.raises(CheckpointMismatchError) as raised:
            manager.restore(target)
        assert manager.all_steps() == [1] and not manager.damaged_steps
    message = str(raised.value)
    assert "params/dense/kernel: checkpoint (3, 2), model (3, 5)" in message
    assert "params/dense/bias: checkpoint (2,), model (5,)" in message


def test_bad_arguments_raise_early(tmp_path):
    with pytest.raises(ValueError, match="save_every"):
        CheckpointManager(tmp_path, save_every=0)
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, save_every=1, keep_last=0)
