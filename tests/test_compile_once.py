"""Compile once: after the first call, repeated train steps and sampler calls with the same shapes
trigger no tracing-to-XLA lowering and no backend compilation (counted with jax.monitoring)."""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest

from diffusion import samplers, training
from diffusion.parameterization import Denoiser
from experiments.build import build
from experiments.configs import toy_vp

# jax.monitoring events (jax._src.dispatch): one per program lowered to StableHLO (a jit cache
# miss, including a later hit of the persistent compilation cache) and one per XLA compilation.
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


class CompileCounter:
    """Context manager counting lowerings and compilations, by function name."""

    def __init__(self) -> None:
        self.events: collections.Counter[tuple[str, str]] = collections.Counter()

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event in COMPILE_EVENTS:
            self.events[(event.rsplit("/", 1)[-1], str(kwargs.get("fun_name")))] += 1

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc_info) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)

    @property
    def count(self) -> int:
        return sum(self.events.values())


@pytest.fixture(scope="module")
def config():
    """The toy VP config with a small MLP and batch (compiles in seconds)."""
    config = toy_vp.get_config()
    config.training.batch_size = 16
    config.model.width = 32
    config.model.num_blocks = 1
    return config


@pytest.fixture(scope="module")
def experiment(config):
    return build(config)


def test_counter_sees_a_new_program():
    # The listener works: a function never compiled before is lowered and compiled once.
    with CompileCounter() as counter:
        jax.jit(lambda x: x * 3.0 + 1.0)(np.arange(5.0))
    assert counter.count == 2, counter.events


@pytest.mark.parametrize("multi_step", [False, True])
def test_train_steps_compile_once(experiment, multi_step):
    step_fn = training.make_train_step(
        experiment.loss,
        experiment.optimizer,
        learning_rate_fn=experiment.learning_rate_fn,
        ema_decay=0.99,
    )
    runner = training.DataParallelStep(step_fn)
    params = experiment.init_params(jax.random.key(0))
    state = runner.put_state(
        training.create_train_state(params, experiment.optimizer, jax.random.key(1))
    )
    batch_fn = experiment.data_source()

    def run(state, step):
        if multi_step:
            batches = [batch_fn(step + offset) for offset in range(2)]
            stacked = jax.tree.map(lambda *leaves: np.stack(leaves), *batches)
            return runner.multi_step(state, runner.put_batch(stacked, stacked=True))
        return runner.step(state, runner.put_batch(batch_fn(step)))

    with CompileCounter() as warm_up:
        state, metrics = run(state, 0)
        jax.block_until_ready(state)
    assert warm_up.count > 0  # the first call compiles, and the counter sees it
    with CompileCounter() as counter:
        for step in range(1, 4):
            state, metrics = run(state, 2 * step)
            np.asarray(metrics["loss"])  # metrics to the host, as the training loop does
        jax.block_until_ready(state)
    assert counter.count == 0, counter.events


def test_repeated_sampler_calls_compile_once(config, experiment):
    # Same shapes, new keys and new parameter values (as successive snapshots): no recompilation.
    params = experiment.init_params(jax.random.key(0))
    denoiser = Denoiser(
        params=params,
        apply_fn=experiment.model.apply,
        process=experiment.process,
        parameterization=config.model.parameterization,
        time_input=config.model.time_input,
    )

    def draw(denoiser, seed):
        result = samplers.sample(
            "ddim", denoiser, jax.random.key(seed), (32, 2), grid="uniform_t", num_steps=5
        )
        return np.asarray(result.samples)

    with CompileCounter() as warm_up:
        draw(denoiser, 0)
    assert warm_up.count > 0
    # Other parameter values made before counting (their eager multiplies compile too).
    snapshots = [
        jax.tree.map(lambda leaf, s=seed: leaf * (1.0 + 0.1 * s), params) for seed in (1, 2, 3)
    ]
    with CompileCounter() as counter:
        for seed, snapshot in enumerate(snapshots, start=1):
            samples = draw(denoiser.replace(params=snapshot), seed)
    assert counter.count == 0, counter.events
    assert samples.shape == (32, 2) and np.all(np.isfinite(samples))
