"""--mode=sample: samples from a checkpoint's EMA parameters with the configured sampler."""

from __future__ import annotations

import math
import os
import time

import jax
import numpy as np

from diffusion.images import save_image_grid, save_scatter_png, write_atomically
from experiments.build import Experiment, Stream
from experiments.workdir import restore_ema_params

__all__ = ["draw_samples", "sample"]


def draw_samples(
    experiment: Experiment, params, key: jax.Array, num: int, batch_size: int, **overrides
) -> tuple[np.ndarray, int, float]:
    """``num`` samples drawn in batches of ``batch_size`` (batch i with fold_in(key, i)).

    Returns (samples, NFE per sample, seconds). Every batch has the same shape, so the sampler
    compiles once; the same key gives bitwise the same samples.
    """
    outputs, nfe = [], 0
    start = time.perf_counter()
    for index in range(math.ceil(num / batch_size)):
        result = experiment.sample(params, jax.random.fold_in(key, index), batch_size, **overrides)
        outputs.append(np.asarray(result.samples))
        nfe = int(result.nfe)
    seconds = time.perf_counter() - start
    return np.concatenate(outputs)[:num], nfe, seconds


def sample(experiment: Experiment, workdir: str, *, checkpoint_step: int | None = None) -> str:
    """Write DIR/sample/<method>_step<step>.png and .npz; print NFE and time; return the .npz path."""
    sampling = experiment.sampling
    step, ema_params = restore_ema_params(experiment, workdir, checkpoint_step)
    samples, nfe, seconds = draw_samples(
        experiment,
        ema_params,
        experiment.key(Stream.SAMPLE),
        sampling.num_samples,
        sampling.batch_size,
    )
    directory = os.path.join(workdir, "sample")
    name = f"{sampling.method}_step{step}"
    npz_path = os.path.join(directory, name + ".npz")
    png_path = os.path.join(directory, name + ".png")
    write_atomically(npz_path, lambda file: np.savez(file, samples=samples, nfe=nfe, step=step))
    if experiment.is_toy:
        save_scatter_png(png_path, samples[:, :2], title=f"{name} ({nfe} NFE)")
    else:
        save_image_grid(png_path, samples, experiment.data_range)
    print(
        f"{len(samples)} samples from step {step} with {sampling.method} "
        f"({nfe} NFE each) in {seconds:.1f} s -> {png_path}"
    )
    return npz_path
