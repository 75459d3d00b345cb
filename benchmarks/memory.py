"""Peak resident memory of training vp_mnist at batch 128 and of sampling 1,000 MNIST-size images.

Each case runs in its own subprocess, which reports its peak resident set size (``ru_maxrss``:
the most memory the process ever held, JAX's runtime and compiled program included) and the
resident size after building the experiment and initialising the parameters, before any train
step or sampler was compiled (``rss_after_setup_bytes``). XLA's own account of the compiled
program (``temp_bytes``: its scratch buffer; ``argument_bytes``, ``output_bytes``) is recorded
next to it.

Cases:

* ``train``: vp_mnist's network, loss and optimiser (``experiments.build``), batch 128 of synthetic
  28x28x1 images, ``jax.jit(train_step, donate_argnums=0)`` (the train state is donated, as in
  ``diffusion.parallel.DataParallelStep``), 3 steps; with the U-Net's ``remat`` ('none', 'blocks',
  'convs') and compute ``dtype`` (float32, bfloat16) options, and with XLA:CPU's memory-optimised
  scheduler (``*_memory_scheduler``) in place of its default concurrency-optimised one. ``step_s`` is
  the median time of the last 2 steps, so the time an option costs is next to the memory it saves;
  ``peak_rss_until_compiled_bytes`` separates what compiling took from what running takes.
* ``sample``: 1,000 images from vp_mnist's network (initial parameters: the cost does not depend on
  their values) with DPM-Solver++(2M), 20 steps, in one compiled call (``diffusion.samplers.sample``)
  or, with ``--sample-batch``, in chunks of that many.

    python -m benchmarks.memory [--quick] [--cases=train,train_remat_blocks,...] [--sample-batch=N]
        [--config=vp_mnist] [--num-samples=1000]

``--quick`` runs ``train`` and ``sample`` only, the latter with 2 solver steps instead of 20: the
compiled loop's memory does not depend on its length (one network evaluation's activations at a
time), but 20 steps at batch 1,000 take about 15 minutes on a 2-core CPU.

Prints one JSON object {"machine": {...}, "records": [{"case", "peak_rss_bytes", ...}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# case name -> (kind, remat, dtype, XLA:CPU scheduler)
CASES = {
    "train": ("train", "none", "float32", "default"),
    "train_remat_blocks": ("train", "blocks", "float32", "default"),
    "train_remat_convs": ("train", "convs", "float32", "default"),
    "train_bfloat16": ("train", "none", "bfloat16", "default"),
    "train_memory_scheduler": ("train", "none", "float32", "memory"),
    "train_remat_blocks_memory_scheduler": ("train", "blocks", "float32", "memory"),
    "sample": ("sample", "none", "float32", "default"),
    "sample_memory_scheduler": ("sample", "none", "float32", "memory"),
}
# XLA:CPU schedules operations for concurrency by default; this flag orders them to keep fewer
# buffers alive. Set here for the whole case process; one program can get it with
# jax.jit(..., compiler_options={"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}).
MEMORY_SCHEDULER_FLAG = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
QUICK_CASES = ("train", "sample")
TRAIN_BATCH = 128
NUM_SAMPLES = 1000
SAMPLER, SAMPLER_STEPS = "dpm_solver_pp_2m", 20


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc), in bytes."""
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_analysis(compiled) -> dict:
    analysis = compiled.memory_analysis()
    return {
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
    }


def build_experiment(config_name: str, remat: str, dtype_name: str):
    """A config's experiment with ``training.remat`` and ``training.compute_dtype`` set: the
    config, the experiment, its network and its loss."""
    import importlib

    from experiments.build import build

    config = importlib.import_module(f"experiments.configs.{config_name}").get_config()
    config.training.remat, config.training.compute_dtype = remat, dtype_name
    experiment = build(config)
    return config, experiment, experiment.model, experiment.loss


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the accelerator (None where the backend keeps no statistics: CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def run_train(config_name: str, remat: str, dtype_name: str) -> dict:
    import jax
    import numpy as np

    from diffusion import training

    config, experiment, model, loss = build_experiment(config_name, remat, dtype_name)
    example = np.zeros((1, *experiment.data_shape), np.float32)
    params = jax.jit(model.init)(jax.random.key(0), example, np.zeros((1,), np.float32))
    step_fn = training.make_train_step(
        loss,
        experiment.optimizer,
        learning_rate_fn=experiment.learning_rate_fn,
        ema_decay=float(config.training.ema_decay),
    )
    state = training.create_train_state(params, experiment.optimizer, jax.random.key(1))
    images = np.random.default_rng(0).uniform(-1, 1, (TRAIN_BATCH, *experiment.data_shape))
    batch = {"image": jax.device_put(images.astype(np.float32))}
    setup_rss = rss_bytes()
    compiled = jax.jit(step_fn, donate_argnums=0).lower(state, batch).compile()
    compiled_rss, compiled_peak_rss = rss_bytes(), peak_rss_bytes()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return {
        "batch": TRAIN_BATCH,
        "param_count": int(sum(leaf.size for leaf in jax.tree.leaves(params))),
        "rss_after_setup_bytes": setup_rss,
        "rss_after_compile_bytes": compiled_rss,
        "peak_rss_until_compiled_bytes": compiled_peak_rss,
        "step_s": float(np.median(times[1:])),
        "loss": float(metrics["loss"]),
        **memory_analysis(compiled),
    }


def run_sample(config_name: str, num_samples: int, sample_batch: int, num_steps: int) -> dict:
    import jax
    import numpy as np

    from diffusion import samplers

    _, experiment, model, _ = build_experiment(config_name, "none", "float32")
    example = np.zeros((1, *experiment.data_shape), np.float32)
    params = jax.jit(model.init)(jax.random.key(0), example, np.zeros((1,), np.float32))
    denoiser = experiment.denoiser.replace(params=params)
    setup_rss = rss_bytes()
    start = time.perf_counter()
    chunks = []
    for index, first in enumerate(range(0, num_samples, sample_batch)):
        size = min(sample_batch, num_samples - first)
        result = samplers.sample(
            SAMPLER,
            denoiser,
            jax.random.fold_in(jax.random.key(2), index),
            (size, *experiment.data_shape),
            grid="uniform_log_snr",
            num_steps=num_steps,
        )
        chunks.append(np.asarray(result.samples))
    samples = np.concatenate(chunks)
    return {
        "num_samples": int(samples.shape[0]),
        "sample_batch": sample_batch,
        "sampler": SAMPLER,
        "num_steps": num_steps,
        "rss_after_setup_bytes": setup_rss,
        "seconds": time.perf_counter() - start,
        "finite": bool(np.all(np.isfinite(samples))),
    }


def run_case(name: str, args: argparse.Namespace, sampler_steps: int) -> dict:
    """One case in this process: its figures and this process's peak RSS."""
    kind, remat, dtype_name, _ = CASES[name]
    # What this process runs with (the parent sets the flag for the *_memory_scheduler cases).
    scheduler = "memory" if MEMORY_SCHEDULER_FLAG in os.environ.get("XLA_FLAGS", "") else "default"
    if kind == "train":
        figures = run_train(args.config, remat, dtype_name)
    else:
        sample_batch = min(args.sample_batch or args.num_samples, args.num_samples)
        figures = run_sample(args.config, args.num_samples, sample_batch, sampler_steps)
    return {
        "case": name,
        "config": args.config,
        "kind": kind,
        "remat": remat,
        "dtype": dtype_name,
        "scheduler": scheduler,
        "peak_rss_bytes": peak_rss_bytes(),
        "device_peak_bytes": device_peak_bytes(),
        **figures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_CASES)}")
    parser.add_argument("--cases", default=None, help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--config", default="vp_mnist", help="a module of experiments.configs")
    parser.add_argument("--num-samples", type=int, default=NUM_SAMPLES, help="images to sample")
    parser.add_argument(
        "--sample-batch", type=int, default=None, help="images per sampler call (default: all)"
    )
    parser.add_argument(
        "--sampler-steps",
        type=int,
        default=None,
        help=f"solver steps of the sample cases (default {SAMPLER_STEPS}; 2 with --quick): the "
        "memory does not depend on it",
    )
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one case
    args = parser.parse_args()
    if args.num_samples < 1 or (args.sample_batch is not None and args.sample_batch < 1):
        parser.error("--num-samples and --sample-batch must be positive")
    sampler_steps = args.sampler_steps or (2 if args.quick else SAMPLER_STEPS)
    if args.case is not None:
        print(json.dumps(run_case(args.case, args, sampler_steps)))
        return
    names = args.cases.split(",") if args.cases else list(QUICK_CASES if args.quick else CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")

    import jax

    machine = {
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "load_average_at_start": list(os.getloadavg()),
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    records = []
    for name in names:
        command = [sys.executable, "-m", "benchmarks.memory", f"--case={name}"]
        command += [f"--config={args.config}", f"--num-samples={args.num_samples}"]
        if args.sample_batch is not None:
            command.append(f"--sample-batch={args.sample_batch}")
        environment = dict(os.environ)
        if CASES[name][3] == "memory":
            flags = environment.get("XLA_FLAGS", "")
            environment["XLA_FLAGS"] = f"{flags} {MEMORY_SCHEDULER_FLAG}".strip()
        output = subprocess.run(
            [*command, f"--sampler-steps={sampler_steps}"],
            env=environment,
            cwd=root,
            check=True,
            capture_output=True,
            text=True,
        )
        records.append(json.loads(output.stdout.strip().splitlines()[-1]))
        print(json.dumps(records[-1]), file=sys.stderr)  # each record as it is made
    machine["load_average_at_end"] = list(os.getloadavg())
    print(json.dumps({"machine": machine, "quick": args.quick, "records": records}, indent=1))


if __name__ == "__main__":
    main()
