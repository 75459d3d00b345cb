"""A sustained training run: N steps of a config's network, loss and optimiser on synthetic data.

The network, loss, optimiser and EMA of ``experiments.configs.<config>`` (``experiments.build``),
stepped by ``diffusion.parallel.DataParallelStep`` over every device JAX finds, with a fresh batch
of uniform noise images drawn on the host and placed on the devices at every step, as the training
loop does with real data (no dataset needs to be present). Reports the wall time of the whole run
after the first (compiling) step, steps/s and examples/s, and the loss of the first and last
steps (EMA 0.9999's warm-up and Adam's 5,000 warm-up steps make this a speed figure, not a fit).

    python -m benchmarks.training_run [--config=vp_mnist] [--steps=2000] [--batch-size=128]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", default="vp_mnist", help="a module of experiments.configs")
    parser.add_argument("--steps", type=int, default=2000, help="timed steps after the first")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size")
    args = parser.parse_args()
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be positive")

    import jax
    import numpy as np

    from diffusion import training
    from experiments.build import build

    config = importlib.import_module(f"experiments.configs.{args.config}").get_config()
    config.training.batch_size = args.batch_size
    experiment = build(config)
    step_fn = training.make_train_step(
        experiment.loss,
        experiment.optimizer,
        learning_rate_fn=experiment.learning_rate_fn,
        ema_decay=float(config.training.ema_decay),
        ema_warmup=bool(config.training.ema_warmup),
    )
    runner = training.DataParallelStep(step_fn)
    params = experiment.init_params(jax.random.key(0))
    state = runner.put_state(
        training.create_train_state(params, experiment.optimizer, jax.random.key(1))
    )
    rng = np.random.default_rng(0)
    shape = (args.batch_size // jax.process_count(), *experiment.data_shape)

    def batch() -> dict:
        return runner.put_batch({"image": rng.uniform(-1, 1, shape).astype(np.float32)})

    start = time.perf_counter()
    state, metrics = runner.step(state, batch())
    first_loss = float(metrics["loss"])
    first_step_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = runner.step(state, batch())
    last_loss = float(metrics["loss"])  # waits for the last step
    seconds = time.perf_counter() - start
    device = jax.devices()[0]
    print(
        json.dumps(
            {
                "config": args.config,
                "batch": args.batch_size,
                "steps": args.steps,
                "devices": jax.device_count(),
                "platform": device.platform,
                "device_kind": device.device_kind,
                "param_count": experiment.param_count(),
                "first_step_s": first_step_s,
                "seconds": seconds,
                "steps_per_s": args.steps / seconds,
                "examples_per_s": args.steps * args.batch_size / seconds,
                "first_loss": first_loss,
                "last_loss": last_loss,
                "load_average_at_end": list(os.getloadavg()),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
