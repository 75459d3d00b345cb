"""Sweep solvers x NFE budgets x time grids against reference samples from the same x_T.

Each record is a plain dict, ready for the experiments layer to write as CSV or plot (this module
writes nothing). The error is the RMSE between a solver's samples and reference samples started from
the same x_T: for deterministic solvers, e.g. the exact probability-flow solution of an oracle
(``GaussianMixture.ode_flow``) or a tight adaptive solve, it is the global discretisation error of the
probability-flow ODE (as in Lu et al. 2022, Fig. 2; Karras et al. 2022, Fig. 3); for stochastic
samplers it is only a scale, and ``metric`` (e.g. a sliced Wasserstein distance to data) is the
meaningful column.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from diffusion.parameterization import Denoiser
from diffusion.samplers.api import sampler_program
from diffusion.samplers.base import get_sampler
from diffusion.samplers.grids import GRIDS, shared_grid_arguments, time_grid

__all__ = ["sweep"]


def _timed_call(program, args: tuple, repeats: int):
    """Median wall time of ``program(*args)`` over ``repeats`` calls after one warm-up (compile)."""
    result = jax.block_until_ready(program(*args))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(program(*args))
        seconds.append(time.perf_counter() - start)
    return result, float(np.median(seconds))


def sweep(
    denoiser: Denoiser,
    key: Array,
    x_init: Array,
    reference: Array,
    *,
    solvers: Sequence[tuple[str, dict[str, Any]]],
    nfes: Iterable[int],
    grids: Sequence[str] = ("uniform_t",),
    t_start: float | None = None,
    t_end: float | None = None,
    rho: float | None = None,
    denoise_final: bool = False,
    denoise_order: int = 1,
    metric: Callable[[np.ndarray], float] | None = None,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """Run every (solver, options) at every NFE on every grid; one record per combination.

    ``reference``: samples of the target from the same ``x_init`` (same shape). Each fixed-step solver
    spends exactly each NFE (``SamplerSpec.steps_for_nfe``, counting the final step to sigma = 0 when
    ``denoise_final``, taken at ``denoise_order`` by deterministic solvers and at order 1 by the
    others); a combination that cannot (e.g. Heun at an odd NFE, an index grid longer than
    the chain) is recorded with ``skipped`` giving the reason. An adaptive solver (its spec's NFE is
    None) runs once per grid, with ``nfe_target`` None and its counted NFE. Records hold: solver,
    options (as run: defaults and planned options filled in), grid, nfe_target, nfe (reported by
    the run), num_steps, deterministic, error_rmse, metric (``metric(samples)`` or None), seconds
    (median of ``repeats`` compiled calls, compile excluded), skipped (None or the reason). All
    solvers use the same ``key``.
    """
    # Validate everything before anything compiles.
    checked = []
    for name, options in solvers:
        spec = get_sampler(name)
        checked.append((spec, spec.check_options(dict(options)), dict(options)))
    nfes = [int(n) for n in nfes]
    if any(n < 1 for n in nfes):
        raise ValueError(f"every NFE must be a positive integer, got {nfes}")
    unknown_grids = [grid for grid in grids if grid not in GRIDS]
    if unknown_grids:
        raise ValueError(f"unknown grid(s) {unknown_grids}; accepted: {', '.join(GRIDS)}")
    x_init = jnp.asarray(x_init)
    reference = np.asarray(reference, dtype=np.float64)
    if reference.shape != x_init.shape:
        raise ValueError(
            f"reference has shape {reference.shape}, x_init has shape {x_init.shape}; they must match"
        )
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    final_nfe = int(denoise_final)
    # Every run must span the reference's interval (index grids such as 'trailing' may not).
    span = time_grid(denoiser.process, "uniform_t", 1, t_start=t_start, t_end=t_end)

    records = []
    for spec, full_options, given_options in checked:
        is_adaptive = spec.is_adaptive(**full_options)
        for grid in grids:
            for nfe_target in [None] if is_adaptive else nfes:
                record = {
                    "solver": spec.name,
                    "options": given_options,
                    "grid": grid,
                    "nfe_target": nfe_target,
                    "nfe": None,
                    "num_steps": None,
                    "deterministic": spec.is_deterministic(**given_options),
                    "error_rmse": None,
                    "metric": None,
                    "seconds": None,
                    "skipped": None,
                }
                records.append(record)
                try:
                    if is_adaptive:
                        num_steps, options = 1, given_options
                    else:  # the plan may set NFE-dependent options (e.g. DPM-Solver-fast's orders)
                        num_steps, options = spec.steps_for_nfe(
                            nfe_target - final_nfe, **given_options
                        )
                    times = time_grid(
                        denoiser.process,
                        grid,
                        num_steps,
                        **shared_grid_arguments(grid, t_start=t_start, t_end=t_end, rho=rho),
                    )
                    _check_span(times, span)
                except ValueError as error:
                    record["skipped"] = str(error)
                    continue
                order = denoise_order if record["deterministic"] else 1  # no noisy extrapolation
                program = sampler_program(
                    spec.name, denoise_final=denoise_final, denoise_order=order, **options
                )
                result, seconds = _timed_call(
                    program, (denoiser, key, x_init, times.astype(x_init.dtype)), repeats
                )
                samples = np.asarray(result.samples, dtype=np.float64)
                record.update(
                    options=dict(options),
                    nfe=int(result.nfe),
                    num_steps=num_steps,
                    error_rmse=float(np.sqrt(np.mean((samples - reference) ** 2))),
                    metric=None if metric is None else float(metric(samples)),
                    seconds=seconds,
                )
    return records


def _check_span(times: Array, span: Array) -> None:
    if not np.allclose(np.asarray(times)[[0, -1]], np.asarray(span), rtol=1e-6, atol=0.0):
        raise ValueError(
            f"this grid runs from t = {float(times[0]):.6g} to {float(times[-1]):.6g}, the reference "
            f"from {float(span[0]):.6g} to {float(span[-1]):.6g}: its error is not comparable"
        )
