"""Loop overhead of the fixed-step samplers: compiled sampler time over NFE x one network call.

For every registered sampler with a fixed NFE (``SamplerSpec.nfe`` not None) at 20 and 100 steps,
on two networks from ``diffusion.models`` with random weights (VP SDE, eps prediction, batch 64):

* 'mlp': the residual MLP (width 256, 3 blocks) on 2-D points;
* 'unet': a small U-Net (ch 32, ch_mult (1, 2), 1 residual block per level, no attention, no
  dropout) on 8x8x1 images.

Per record, after compiling warm-ups and with ``block_until_ready``: ``seconds`` is the wall time of
the compiled sampler; ``denoiser_seconds`` the wall time of one compiled call of ``denoiser.predict``
on the same batch (median of 11 calls); ``ratio = seconds / (nfe * denoiser_seconds)`` (goal <= 1.10).
A single compiled call also pays the per-call dispatch, which the sampler pays once for all its steps,
so for a network as cheap as the dispatch the ratio can fall below 1; ``loop_ratio`` divides by the
time of one compiled ``lax.fori_loop`` of ``nfe`` chained network calls instead (the network alone,
no sampler arithmetic, no dispatch per call). Each repeat times the three back to back, so that a
change of load on a shared machine hits numerator and denominators alike; every reported number is
the median over repeats (ratios are medians of per-repeat ratios). annealed_langevin runs with
n_steps_each = 1 (its default of 100 only multiplies the NFE).

    python -m benchmarks.sampler_overhead [--quick] [--repeats=R]   (from the repo root)

--quick: the MLP only, 20 steps, 3 repeats (under a minute on 2 CPU cores); the full run (both
networks, 20 and 100 steps, 3 repeats) takes about ten minutes there.
Prints one JSON object: {"records": [{sampler, steps, model, nfe, seconds, denoiser_seconds, ratio,
loop_seconds, loop_ratio}, ...], "goal": 1.1, "platform", "device_kind", "quick"}.
"""

from __future__ import annotations

import argparse
import json
import time

BATCH = 64
GOAL = 1.10
BENCHMARK_OPTIONS = {"annealed_langevin": {"n_steps_each": 1}}


def wall_seconds(fn, args: tuple) -> float:
    """Wall time of one call ``fn(*args)``, blocked until its result is ready."""
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def build_denoiser(model_name: str):
    """(denoiser, x_init) for a randomly initialised network (zero-initialised layers perturbed)."""
    import jax
    import jax.numpy as jnp

    from diffusion.models import MLP, UNet
    from diffusion.parameterization import Denoiser
    from diffusion.processes import VPSDE

    if model_name == "mlp":
        model, shape = MLP(width=256, num_blocks=3), (BATCH, 2)
    else:
        model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
        shape = (BATCH, 8, 8, 1)
    init_key, perturb_key, data_key = jax.random.split(jax.random.key(0), 3)
    params = model.init(init_key, jnp.zeros(shape), jnp.zeros(shape[:1]))
    # The output layers are zero-initialised (eps = 0); random weights make every step do real work.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(perturb_key, len(leaves))
    leaves = [
        leaf + 0.02 * jax.random.normal(key, leaf.shape, leaf.dtype)
        for leaf, key in zip(leaves, keys, strict=True)
    ]
    params = jax.tree.unflatten(treedef, leaves)
    process = VPSDE()
    denoiser = Denoiser(params, model.apply, process, "eps", time_input="999t")
    return denoiser, process.prior_sample(data_key, shape)


def measure_model(model_name: str, steps_list: list[int], repeats: int) -> list[dict]:
    """One record per (fixed-NFE sampler, steps) on the network ``model_name``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from diffusion.samplers import SAMPLERS, sampler_program, time_grid

    denoiser, x_init = build_denoiser(model_name)
    t_mid = jnp.asarray(0.5, x_init.dtype)
    predict = jax.jit(lambda d, x, t: d.predict(x, t))

    @jax.jit
    def chained_calls(d, x, nfe_array):
        # nfe_array's length is the loop count. Each call feeds the next and sees its own time, so
        # nothing (not even the time embedding) can be hoisted out of the loop.
        def body(i, x):
            t = t_mid * (1.0 - 0.5 * i / nfe_array.shape[0])
            return d.predict(x, t)[0]

        return jax.lax.fori_loop(0, nfe_array.shape[0], body, x)

    records = []
    key = jax.random.key(1)
    for name, spec in sorted(SAMPLERS.items()):
        options = BENCHMARK_OPTIONS.get(name, {})
        full_options = spec.check_options(options)
        for steps in steps_list:
            nfe = spec.nfe(steps, **full_options)
            if nfe is None:
                continue  # adaptive: no fixed NFE
            program = sampler_program(name, **options)
            times = time_grid(denoiser.process, "uniform_t", steps).astype(x_init.dtype)
            cases = {
                "sampler": (program, (denoiser, key, x_init, times)),
                "call": (predict, (denoiser, x_init, t_mid)),
                "loop": (chained_calls, (denoiser, x_init, jnp.zeros((nfe,)))),
            }
            for fn, args in cases.values():  # compile
                wall_seconds(fn, args)
            timings = []
            for _ in range(repeats):
                sampler_s = wall_seconds(*cases["sampler"])
                call_s = float(np.median([wall_seconds(*cases["call"]) for _ in range(11)]))
                loop_s = wall_seconds(*cases["loop"])
                timings.append((sampler_s, call_s, loop_s))
            sampler_s, call_s, loop_s = np.array(timings).T
            records.append(
                {
                    "sampler": name,
                    "steps": steps,
                    "model": model_name,
                    "nfe": nfe,
                    "seconds": float(np.median(sampler_s)),
                    "denoiser_seconds": float(np.median(call_s)),
                    "ratio": float(np.median(sampler_s / (nfe * call_s))),
                    "loop_seconds": float(np.median(loop_s)),
                    "loop_ratio": float(np.median(sampler_s / loop_s)),
                }
            )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MLP only, 20 steps")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per record")
    args = parser.parse_args()
    import jax

    steps_list = [20] if args.quick else [20, 100]
    repeats = args.repeats or 3
    records = []
    for model_name in ("mlp",) if args.quick else ("mlp", "unet"):
        records += measure_model(model_name, steps_list, repeats)
    device = jax.devices()[0]
    print(
        json.dumps(
            {
                "records": records,
                "goal": GOAL,
                "platform": device.platform,
                "device_kind": device.device_kind,
                "quick": args.quick,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
