"""Train state, optimiser, EMA, the train step and its jit / shard_map wrappers, the training loop.

The session simulates 4 CPU devices (tests/conftest.py). Losses are written here (a denoising loss
whose noise comes with the batch, and one that draws its noise from the step key), so these tests
do not depend on diffusion.losses.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion import optim, parallel, training
from diffusion.checkpoints import CheckpointManager, abstract_state
from diffusion.data import toy_batch
from diffusion.metric_writers import MetricWriter

BATCH_SIZE = 16


class SmallMLP(nn.Module):
    """Dense-SiLU-Dense on (x, t): a network that compiles in a second."""

    @nn.compact
    def __call__(self, x, t):
        hidden = nn.Dense(16)(jnp.concatenate([x, t[:, None]], axis=1))
        return nn.Dense(x.shape[-1])(nn.silu(hidden))


MODEL = SmallMLP()


def init_params(seed: int = 0):
    return MODEL.init(jax.random.key(seed), jnp.zeros((1, 2)), jnp.zeros((1,)))


def noisy(x0, eps, t):
    """x_t = cos(pi t / 2) x0 + sin(pi t / 2) eps (a variance-preserving path)."""
    angle = 0.5 * jnp.pi * t[:, None]
    return jnp.cos(angle) * x0 + jnp.sin(angle) * eps


def batch_noise_loss(params, batch, key, *, train=True):
    """eps-MSE with eps and t taken from the batch: deterministic given the batch."""
    del key
    eps_pred = MODEL.apply(params, noisy(batch["x0"], batch["eps"], batch["t"]), batch["t"])
    loss = jnp.mean((eps_pred - batch["eps"]) ** 2)
    return loss, {"eps_pred_mean": jnp.mean(eps_pred)}


def key_noise_loss(params, batch, key, *, train=True):
    """eps-MSE with eps and t drawn from the step key; aux reports one uniform draw of the key."""
    x0 = batch["x0"]
    t_key, eps_key, probe_key = jax.random.split(key, 3)
    t = jax.random.uniform(t_key, x0.shape[:1])
    eps = jax.random.normal(eps_key, x0.shape)
    loss = jnp.mean((MODEL.apply(params, noisy(x0, eps, t), t) - eps) ** 2)
    return loss, {"probe": jax.random.uniform(probe_key)}


def noise_batch(step: int) -> dict:
    """The global batch of step ``step``: two-moons points plus eps and t from numpy."""
    rng = np.random.default_rng(1000 + step)
    return {
        "x0": toy_batch("two_moons", step=step, batch_size=BATCH_SIZE, seed=0),
        "eps": rng.standard_normal((BATCH_SIZE, 2)).astype(np.float32),
        "t": rng.uniform(0.05, 1.0, BATCH_SIZE).astype(np.float32),
    }


def points_batch(step: int) -> dict:
    return {"x0": toy_batch("two_moons", step=step, batch_size=BATCH_SIZE, seed=0)}


def setup(loss_fn, *, warmup_steps=5, ema_decay=0.99, ema_warmup=False, grad_clip_norm=1.0):
    schedule = optim.learning_rate_schedule(1e-2, warmup_steps=warmup_steps)
    optimizer = optim.make_optimizer(schedule, grad_clip_norm=grad_clip_norm)
    step = training.make_train_step(
        loss_fn,
        optimizer,
        learning_rate_fn=schedule,
        ema_decay=ema_decay,
        ema_warmup=ema_warmup,
    )
    state = training.create_train_state(init_params(), optimizer, jax.random.key(42))
    return step, state


def runner_for(step, parallelism, num_devices):
    return parallel.DataParallelStep(
        step, parallelism=parallelism, devices=jax.devices()[:num_devices]
    )


# Shared across tests so that each configuration compiles once per session. The shared initial
# state is never donated: put_state copies it.
cached_setup = functools.cache(setup)


@functools.cache
def cached_runner(loss_fn, parallelism, num_devices):
    return runner_for(cached_setup(loss_fn)[0], parallelism, num_devices)


def run_steps(runner, state, batch_fn, num_steps):
    placed = runner.put_state(state)
    metrics = []
    for step in range(num_steps):
        placed, step_metrics = runner.step(placed, runner.put_batch(batch_fn(step)))
        metrics.append(step_metrics)
    return jax.device_get(placed), jax.device_get(metrics)


def assert_trees_close(actual, expected, rtol=2e-5, atol=2e-6):
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), actual, expected
    )


def assert_trees_equal(actual, expected):
    jax.tree.map(np.testing.assert_array_equal, actual, expected)


def host_leaves(state):
    """Array leaves of a state on the host, the typed key as its raw data."""
    state = state.replace(key=jax.random.key_data(state.key))
    return jax.device_get(state)


DEVICE_CONFIGS = (("jit", 1), ("jit", 4), ("shard_map", 4))


def test_jit_sharded_shard_map_and_single_device_agree_after_20_steps():
    """Same global batches, 20 steps: the three paths give the same params and EMA (float32)."""
    state = cached_setup(batch_noise_loss)[1]
    runners = [cached_runner(batch_noise_loss, *devices) for devices in DEVICE_CONFIGS]
    single, single_metrics = run_steps(runners[0], state, noise_batch, 20)
    sharded, sharded_metrics = run_steps(runners[1], state, noise_batch, 20)
    shard_mapped, shard_map_metrics = run_steps(runners[2], state, noise_batch, 20)
    # Training moved the parameters, so the comparison is not between untouched copies.
    moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), single.params, state.params)
    assert max(jax.tree.leaves(moved)) > 1e-2
    for other, other_metrics in ((sharded, sharded_metrics), (shard_mapped, shard_map_metrics)):
        assert int(other.step) == 20
        assert_trees_close(other.params, single.params)
        assert_trees_close(other.ema_params, single.ema_params)
        assert_trees_close(other_metrics, single_metrics, rtol=1e-4, atol=1e-6)


def test_sharding_does_not_change_the_random_draws():
    """A loss drawing its noise from the step key gives the same run on 1 and on 4 devices."""
    state = cached_setup(key_noise_loss)[1]
    single, single_metrics = run_steps(
        cached_runner(key_noise_loss, "jit", 1), state, points_batch, 8
    )
    sharded, sharded_metrics = run_steps(
        cached_runner(key_noise_loss, "jit", 4), state, points_batch, 8
    )
    assert_trees_close(sharded.params, single.params)
    np.testing.assert_array_equal(
        [m["probe"] for m in sharded_metrics], [m["probe"] for m in single_metrics]
    )


@pytest.mark.parametrize("parallelism", ["jit", "shard_map"])
def test_k_steps_per_call_equal_k_single_calls(parallelism):
    state = cached_setup(batch_noise_loss)[1]
    runner = cached_runner(batch_noise_loss, parallelism, 4)
    single, single_metrics = run_steps(runner, state, noise_batch, 8)
    placed = runner.put_state(state)
    scanned_metrics = []
    for first in (0, 4):
        batches = [noise_batch(step) for step in range(first, first + 4)]
        stacked = jax.tree.map(lambda *leaves: np.stack(leaves), *batches)
        placed, metrics = runner.multi_step(placed, runner.put_batch(stacked, stacked=True))
        scanned_metrics.append(jax.device_get(metrics))
    scanned = jax.device_get(placed)
    assert int(scanned.step) == 8
    assert_trees_close(scanned.params, single.params, rtol=1e-6, atol=1e-7)
    assert_trees_close(scanned.ema_params, single.ema_params, rtol=1e-6, atol=1e-7)
    for name in single_metrics[0]:
        per_step = np.concatenate([metrics[name] for metrics in scanned_metrics])
        np.testing.assert_allclose(
            per_step, [m[name] for m in single_metrics], rtol=1e-5, atol=1e-7
        )


@pytest.mark.parametrize("ema_warmup", [False, True])
def test_ema_equals_hand_recursion(ema_warmup):
    """ema_0 = p_0, ema_{s+1} = d_s ema_s + (1 - d_s) p_{s+1}, d_s = 0.8 or
    min(0.8, (1 + s) / (10 + s)), recomputed in float64 from the recorded params."""
    decay = 0.8
    train_step, state = setup(
        batch_noise_loss, warmup_steps=0, ema_decay=decay, ema_warmup=ema_warmup
    )
    runner = runner_for(train_step, "jit", 1)
    placed = runner.put_state(state)
    ema = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), state.params)
    for step in range(12):
        placed, _ = runner.step(placed, runner.put_batch(noise_batch(step)))
        params = jax.device_get(placed.params)
        d_s = min(decay, (1 + step) / (10 + step)) if ema_warmup else decay
        ema = jax.tree.map(lambda e, p, d=d_s: d * e + (1 - d) * np.float64(p), ema, params)
    assert_trees_close(jax.device_get(placed.ema_params), ema, rtol=1e-5, atol=1e-7)
    # The EMA lags the params (it is not a copy of them).
    lag = jax.tree.map(lambda e, p: np.max(np.abs(e - p)), ema, jax.device_get(placed.params))
    assert max(jax.tree.leaves(lag)) > 1e-3


def test_warmup_and_cosine_learning_rates_match_closed_forms():
    peak, warmup, total, final = 2e-4, 100, 1100, 2e-5
    constant = optim.learning_rate_schedule(peak, warmup_steps=warmup)
    cosine = optim.learning_rate_schedule(
        peak, warmup_steps=warmup, decay="cosine", total_steps=total, final_learning_rate=final
    )
    for schedule in (constant, cosine):
        # Ho et al. / score_sde warm-up: peak * min(s / warmup, 1).
        for step in (0, 1, 37, 99, 100):
            assert float(schedule(step)) == pytest.approx(peak * min(step / warmup, 1), rel=1e-6)
    for step in (100, 101, 5000):
        assert float(constant(step)) == pytest.approx(peak, rel=1e-6)
    # Cosine: final + (peak - final) (1 + cos(pi u)) / 2 at fraction u of the decay phase.
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        step = warmup + round(fraction * (total - warmup))
        expected = final + (peak - final) * (1 + math.cos(math.pi * fraction)) / 2
        assert float(cosine(step)) == pytest.approx(expected, rel=1e-5)
    assert float(cosine(5000)) == pytest.approx(final, rel=1e-6)
    no_warmup = optim.learning_rate_schedule(peak)
    assert float(no_warmup(0)) == pytest.approx(peak, rel=1e-6)


def test_reported_learning_rate_is_the_one_applied():
    """With warm-up, update 0 has learning rate 0 (params unchanged), update s reports lr(s)."""
    state = cached_setup(batch_noise_loss)[1]  # warm-up of 5 steps
    runner = cached_runner(batch_noise_loss, "jit", 1)
    placed = runner.put_state(state)
    placed, metrics = runner.step(placed, runner.put_batch(noise_batch(0)))
    assert float(metrics["learning_rate"]) == 0.0
    assert_trees_equal(jax.device_get(placed.params), jax.device_get(state.params))
    for step in range(1, 7):
        placed, metrics = runner.step(placed, runner.put_batch(noise_batch(step)))
        assert float(metrics["learning_rate"]) == pytest.approx(1e-2 * min(step / 5, 1), rel=1e-6)


@pytest.mark.slow
def test_clipping_bounds_the_gradient_adam_sees():
    """First Adam step (bias-corrected moments m = g, v = g^2) moves params by
    -lr g_c / (|g_c| + eps) with g_c = g min(1, c / ||g||); eps = 1 makes the scale visible."""
    lr, clip, eps = 0.1, 1e-3, 1.0
    optimizer = optim.make_optimizer(lr, eps=eps, grad_clip_norm=clip)
    unclipped_optimizer = optim.make_optimizer(lr, eps=eps, grad_clip_norm=None)
    params = init_params()
    batch = noise_batch(0)
    grads = jax.grad(lambda p: batch_noise_loss(p, batch, None)[0])(params)
    grad_norm = math.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads)))
    assert grad_norm > 10 * clip  # clipping is active
    for opt, scale in ((optimizer, clip / grad_norm), (unclipped_optimizer, 1.0)):
        step = training.make_train_step(batch_noise_loss, opt, learning_rate_fn=lr, ema_decay=0.0)
        state = training.create_train_state(params, opt, jax.random.key(0))
        new_state, metrics = jax.jit(step)(state, batch)
        assert float(metrics["grad_norm"]) == pytest.approx(grad_norm, rel=1e-5)
        expected = jax.tree.map(
            lambda p, g, s=scale: p - lr * (s * g) / (np.abs(s * g) + eps), params, grads
        )
        assert_trees_close(new_state.params, expected, rtol=1e-5, atol=1e-9)
        # ema_decay = 0: the EMA is the params themselves.
        assert_trees_equal(new_state.ema_params, new_state.params)


@pytest.mark.slow
def test_step_randomness_depends_only_on_key_and_step():
    state = cached_setup(key_noise_loss)[1]
    base_key = state.key
    probe = jax.jit(lambda key: jax.random.uniform(jax.random.split(key, 3)[2]))
    runner = cached_runner(key_noise_loss, "jit", 4)
    placed = runner.put_state(state)
    draws = []
    for step in range(3):
        placed, metrics = runner.step(placed, runner.put_batch(points_batch(step)))
        draws.append(float(metrics["probe"]))
        assert draws[-1] == float(probe(jax.random.fold_in(base_key, step)))
    assert len(set(draws)) == 3
    # Different params and optimiser state at the same (key, step): the same draw.
    other = training.create_train_state(init_params(seed=7), optax.sgd(0.1), base_key)
    other = other.replace(step=jnp.asarray(2, jnp.int32))
    sgd_step = training.make_train_step(
        key_noise_loss, optax.sgd(0.1), learning_rate_fn=0.1, ema_decay=0.5
    )
    _, other_metrics = jax.jit(sgd_step)(other, points_batch(5))
    assert float(other_metrics["probe"]) == draws[2]
    # shard_map: device d draws with fold_in(step key, d); the reported probe is their mean.
    shard_map_runner = cached_runner(key_noise_loss, "shard_map", 4)
    _, shard_map_metrics = shard_map_runner.step(
        shard_map_runner.put_state(state), shard_map_runner.put_batch(points_batch(0))
    )
    step_key = jax.random.fold_in(base_key, 0)
    device_draws = [float(probe(jax.random.fold_in(step_key, d))) for d in range(4)]
    assert float(shard_map_metrics["probe"]) == pytest.approx(np.mean(device_draws), rel=1e-6)


class RecordingWriter:
    def __init__(self):
        self.records = []

    def write_scalars(self, step, scalars):
        self.records.append((step, dict(scalars)))


@pytest.mark.parametrize(("parallelism", "steps_per_call"), [("jit", 1), ("shard_map", 2)])
def test_exact_resume_from_checkpoint(tmp_path, parallelism, steps_per_call):
    """12 uninterrupted steps == 6 steps, checkpoint, fresh objects, restore, 6 steps: bitwise."""

    def manager_in(name):
        return CheckpointManager(tmp_path / name, save_every=2, keep_last=2)

    runner = cached_runner(key_noise_loss, parallelism, 4)
    state = cached_setup(key_noise_loss)[1]
    manager = manager_in("uninterrupted")
    writer = RecordingWriter()
    snapshots = []
    with manager:
        uninterrupted = training.train_loop(
            state,
            runner,
            points_batch,
            num_steps=12,
            log_every=4,
            writer=writer,
            checkpoint_manager=manager,
            snapshot_fn=lambda step, ema: snapshots.append((step, jax.device_get(ema))),
            snapshot_every=6,
            steps_per_call=steps_per_call,
            progress=False,
        )
        assert manager.all_steps() == [10, 12]
    assert [step for step, _ in writer.records] == [4, 8, 12]
    for _, scalars in writer.records:
        assert {"loss", "grad_norm", "learning_rate", "probe", "steps_per_s"} <= scalars.keys()
        assert scalars["examples_per_s"] == pytest.approx(scalars["steps_per_s"] * BATCH_SIZE)
    assert writer.records[-1][1]["learning_rate"] == pytest.approx(1e-2)
    assert [step for step, _ in snapshots] == [6, 12]
    assert_trees_equal(snapshots[-1][1], jax.device_get(uninterrupted.ema_params))

    with manager_in("interrupted") as manager:
        training.train_loop(
            state,
            runner,
            points_batch,
            num_steps=6,
            log_every=2,
            checkpoint_manager=manager,
            steps_per_call=steps_per_call,
            progress=False,
        )
    # A new process: new train step, runner and manager; the target only has the structure.
    train_step, state = setup(key_noise_loss)
    runner = runner_for(train_step, parallelism, 4)
    with manager_in("interrupted") as manager:
        assert manager.latest_step() == 6
        restored = manager.restore(abstract_state(jax.eval_shape(lambda: state)))
        assert int(restored.step) == 6
        resumed = training.train_loop(
            restored,
            runner,
            points_batch,
            num_steps=12,
            log_every=2,
            checkpoint_manager=manager,
            steps_per_call=steps_per_call,
            progress=False,
        )
    assert_trees_equal(host_leaves(resumed), host_leaves(uninterrupted))


def test_global_batch_of_one_process_is_split_across_its_devices():
    runner = runner_for(
        training.make_train_step(
            batch_noise_loss, optax.sgd(0.1), learning_rate_fn=0.1, ema_decay=0.0
        ),
        "jit",
        4,
    )
    local = noise_batch(0)
    global_batch = parallel.make_global_batch(local, runner.batch_sharding)
    for name, leaf in global_batch.items():
        np.testing.assert_array_equal(np.asarray(leaf), local[name])
        shards = sorted(leaf.addressable_shards, key=lambda shard: shard.device.id)
        assert [shard.data.shape[0] for shard in shards] == [BATCH_SIZE // 4] * 4
        for index, shard in enumerate(shards):
            rows = slice(index * BATCH_SIZE // 4, (index + 1) * BATCH_SIZE // 4)
            np.testing.assert_array_equal(np.asarray(shard.data), local[name][rows])


def test_bad_arguments_raise_early():
    with pytest.raises(ValueError, match="parallelism"):
        parallel.DataParallelStep(lambda state, batch: (state, {}), parallelism="pjit")
    with pytest.raises(ValueError, match="optimizer"):
        optim.make_optimizer(1e-3, name="sgd")
    with pytest.raises(ValueError, match="adamw"):
        optim.make_optimizer(1e-3, weight_decay=0.1)
    with pytest.raises(ValueError, match="total_steps"):
        optim.learning_rate_schedule(1e-3, warmup_steps=10, decay="cosine")
    with pytest.raises(ValueError, match="decay"):
        optim.learning_rate_schedule(1e-3, decay="linear")
    with pytest.raises(ValueError, match="ema_decay"):
        training.make_train_step(
            batch_noise_loss, optax.sgd(0.1), learning_rate_fn=0.1, ema_decay=1.5
        )
    state = cached_setup(batch_noise_loss)[1]
    runner = cached_runner(batch_noise_loss, "shard_map", 4)
    with pytest.raises(ValueError, match="not divisible"):
        runner.put_batch({"x0": np.zeros((6, 2))})
    with pytest.raises(ValueError, match="log_every"):
        training.train_loop(
            state, runner, noise_batch, num_steps=4, log_every=3, steps_per_call=2, progress=False
        )


def test_snapshot_fn_samples_with_the_step_key_and_writes_through_the_writer(tmp_path):
    key = jax.random.key(5)

    def sample_images(params, sample_key):
        return params["scale"] * jax.random.uniform(sample_key, (4, 8, 8, 1), minval=-1.0)

    def sample_points(params, sample_key):
        return params["scale"] * jax.random.normal(sample_key, (20, 2))

    params = {"scale": jnp.float32(0.5)}
    with MetricWriter(tmp_path, tensorboard=False) as writer:
        training.make_snapshot_fn(sample_images, writer, key)(30, params)
        training.make_snapshot_fn(sample_points, writer, key, name="points", kind="points")(
            40, params
        )
    expected_images = sample_images(params, jax.random.fold_in(key, 30))
    with np.load(tmp_path / "samples" / "samples_00000030.npz") as saved:
        np.testing.assert_array_equal(saved["samples"], expected_images)
    assert (tmp_path / "samples" / "samples_00000030.png").exists()
    expected_points = sample_points(params, jax.random.fold_in(key, 40))
    with np.load(tmp_path / "samples" / "points_00000040.npz") as saved:
        np.testing.assert_array_equal(saved["samples"], expected_points)
    assert (tmp_path / "samples" / "points_00000040.png").exists()
    with pytest.raises(ValueError, match="kind"):
        training.make_snapshot_fn(sample_images, writer, key, kind="video")


def nan_on_step(bad_steps):
    """batch_noise_loss whose batch carries a NaN on the given steps (the loss is NaN there)."""

    def batch_fn(step):
        batch = noise_batch(step)
        if step in bad_steps:
            batch["x0"] = batch["x0"].copy()
            batch["x0"][0, 0] = np.nan
        return batch

    return batch_fn


def test_nonfinite_updates_are_skipped_and_counted():
    """A NaN in one batch: that update changes nothing (params, EMA, optimiser state), the next
    ones apply as if it had never been tried, and the count is reported."""
    state = cached_setup(batch_noise_loss)[1]
    runner = cached_runner(batch_noise_loss, "jit", 4)
    writer = RecordingWriter()
    guarded = training.train_loop(
        state, runner, nan_on_step({3}), num_steps=6, log_every=3, writer=writer, progress=False
    )
    assert [scalars["nonfinite_steps"] for _, scalars in writer.records] == [0.0, 1.0]
    assert math.isnan(writer.records[1][1]["loss"])  # the window's mean includes the NaN step
    assert int(guarded.nonfinite_streak) == 0 and int(guarded.step) == 6
    for leaf in jax.tree.leaves(jax.device_get((guarded.params, guarded.ema_params))):
        assert np.all(np.isfinite(leaf))
    # Step by step: the NaN step is the identity on params, EMA and optimiser state.
    placed = runner.put_state(state)
    for step in range(3):
        placed, _ = runner.step(placed, runner.put_batch(noise_batch(step)))
    before = host_leaves(placed)
    placed, metrics = runner.step(placed, runner.put_batch(nan_on_step({3})(3)))
    after = host_leaves(placed)
    assert float(metrics["nonfinite"]) == 1.0 and int(after.nonfinite_streak) == 1
    assert_trees_equal(
        (after.params, after.ema_params, after.opt_state),
        (before.params, before.ema_params, before.opt_state),
    )
    assert int(after.step) == 4


def test_consecutive_nonfinite_updates_stop_the_run(tmp_path):
    """With a learning rate of 1e6 the loss overflows; after max_nonfinite_steps skipped updates
    in a row the loop raises, every checkpoint written is finite and none is written after."""
    optimizer = optim.make_optimizer(1e6, grad_clip_norm=None)
    step_fn = training.make_train_step(
        batch_noise_loss, optimizer, learning_rate_fn=1e6, ema_decay=0.5
    )
    state = training.create_train_state(init_params(), optimizer, jax.random.key(0))
    runner = runner_for(step_fn, "jit", 1)
    with CheckpointManager(tmp_path, save_every=2, keep_last=None) as manager:
        with pytest.raises(training.NonFiniteTrainingError, match="non-finite") as raised:
            training.train_loop(
                state,
                runner,
                noise_batch,
                num_steps=200,
                log_every=2,
                checkpoint_manager=manager,
                max_nonfinite_steps=3,
                progress=False,
            )
        steps = manager.all_steps()
        target = abstract_state(jax.eval_shape(lambda: state))
        for step in steps:
            restored = manager.restore(target, step=step)
            for leaf in jax.tree.leaves(jax.device_get((restored.params, restored.ema_params))):
                assert np.all(np.isfinite(leaf))
    error = raised.value
    assert error.streak == 3 and error.step < 200
    assert steps and max(steps) <= error.step


def test_stop_request_checkpoints_the_step_reached(tmp_path):
    """stop_requested() true after step 5: the loop saves step 5 (not a save step) and returns."""
    state = cached_setup(key_noise_loss)[1]
    runner = cached_runner(key_noise_loss, "jit", 4)
    calls = []

    def stop_requested():
        calls.append(None)
        return len(calls) == 5

    with CheckpointManager(tmp_path, save_every=4) as manager:
        stopped = training.train_loop(
            state,
            runner,
            points_batch,
            num_steps=12,
            log_every=4,
            checkpoint_manager=manager,
            stop_requested=stop_requested,
            progress=False,
        )
        assert int(stopped.step) == 5
        assert manager.all_steps() == [4, 5]
