"""Training-step throughput of the default MNIST U-Net, on one device and on 4 simulated devices.

Model: UNet(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(7,), dropout=0.1) on
28x28x1 images; loss: ``diffusion.losses.DenoisingLoss`` (VP SDE, eps prediction, 'simple'
weighting, network time 999 t as score_sde's DDPM++); optimiser: Adam 2e-4 with clipping at 1 and
EMA 0.9999 (the full ``diffusion.training`` step). Global batch 128 of synthetic images (the data
content does not change the cost), placed on the devices every step as in training.

Cases: the devices this process sees (1 CPU device unless told otherwise) with the jit-sharded
wrapper, then a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (the flag must
be set before JAX is imported) timing the jit-sharded and the shard_map wrappers. On one CPU the four
simulated devices share the same cores, so that case measures the wrappers' overhead, not a speed-up
(it always runs on CPU, whatever accelerator the first case used).

compile_s is the first call's wall time minus one timed step (compilation and first transfer).

    python -m benchmarks.train_throughput [--quick] [--steps=N] [--batch-size=B]   (from the repo root)

On a quiet 2-core CPU one step of batch 128 takes about 10 s and each case compiles in about 20 s:
--steps=3 takes about 3 minutes there, the default 10 steps about 6 (benchmarks/results/ holds a
--steps=3 run).

prints one JSON object: {"records": [{devices, wrapper, batch_size, examples_per_s, steps_per_s,
param_count, compile_s, timed_steps, platform, device_kind}, ...], "quick": bool}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SIMULATED_DEVICES = 4
GLOBAL_BATCH = 128
IMAGE_SHAPE = (28, 28, 1)


def measure(wrapper: str, num_devices: int, timed_steps: int, batch_size: int) -> dict:
    """Time ``timed_steps`` train steps after one compiling call; return one record."""
    import jax
    import numpy as np

    from diffusion import optim, parallel, training
    from diffusion.losses import DenoisingLoss
    from diffusion.models import UNet
    from diffusion.processes import VPSDE

    model = UNet(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(7,), dropout=0.1)
    init_key, state_key = jax.random.split(jax.random.key(0))
    params = model.init(init_key, np.zeros((1, *IMAGE_SHAPE), np.float32), np.zeros((1,)))
    param_count = sum(leaf.size for leaf in jax.tree.leaves(params))
    loss_fn = DenoisingLoss(
        process=VPSDE(),
        parameterization="eps",
        apply_fn=model.apply,
        weighting="simple",
        time_input="999t",
    )
    schedule = optim.learning_rate_schedule(2e-4, warmup_steps=5000)
    optimizer = optim.make_optimizer(schedule, grad_clip_norm=1.0)
    train_step = training.make_train_step(
        loss_fn, optimizer, learning_rate_fn=schedule, ema_decay=0.9999
    )
    devices = jax.devices()[:num_devices]
    runner = parallel.DataParallelStep(train_step, parallelism=wrapper, devices=devices)
    state = runner.put_state(training.create_train_state(params, optimizer, state_key))
    images = np.random.default_rng(0).uniform(-1, 1, (batch_size, *IMAGE_SHAPE))
    host_batch = {"image": images.astype(np.float32)}

    start = time.perf_counter()
    state, metrics = runner.step(state, runner.put_batch(host_batch))
    jax.block_until_ready((state, metrics))
    first_call_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(timed_steps):
        state, metrics = runner.step(state, runner.put_batch(host_batch))
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / timed_steps
    return {
        "devices": num_devices,
        "wrapper": "jit-sharded" if wrapper == "jit" else "shard_map",
        "batch_size": batch_size,
        "examples_per_s": batch_size / step_s,
        "steps_per_s": 1.0 / step_s,
        "param_count": int(param_count),
        "compile_s": first_call_s - step_s,
        "timed_steps": timed_steps,
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
    }


def simulated_records(timed_steps: int, batch_size: int) -> list[dict]:
    """Run the 4-device cases in a subprocess whose XLA_FLAGS simulate 4 host devices."""
    flags = os.environ.get("XLA_FLAGS", "")
    environment = {
        **os.environ,
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={SIMULATED_DEVICES}".strip(),
        "JAX_PLATFORMS": "cpu",
    }
    repository_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "benchmarks.train_throughput", "--simulated"]
    output = subprocess.run(
        [*command, f"--steps={timed_steps}", f"--batch-size={batch_size}"],
        env=environment,
        cwd=repository_root,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(output.stdout.strip().splitlines()[-1])["records"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1 timed step per case instead of 10")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case")
    parser.add_argument("--batch-size", type=int, default=GLOBAL_BATCH, help="global batch size")
    parser.add_argument(
        "--simulated", action="store_true", help=argparse.SUPPRESS
    )  # internal: the 4-device subprocess
    args = parser.parse_args()
    timed_steps = args.steps or (1 if args.quick else 10)
    if args.simulated:
        records = [
            measure(wrapper, SIMULATED_DEVICES, timed_steps, args.batch_size)
            for wrapper in ("jit", "shard_map")
        ]
        print(json.dumps({"records": records}))
        return
    import jax

    records = [measure("jit", len(jax.devices()), timed_steps, args.batch_size)]
    records += simulated_records(timed_steps, args.batch_size)
    print(json.dumps({"records": records, "quick": args.quick}, indent=1))


if __name__ == "__main__":
    main()
