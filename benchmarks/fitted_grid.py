"""Fitted time grids (``diffusion.samplers.fit_time_grid``) on the problems of solver_accuracy.py.

For each problem (ring8_2d's exact denoiser, float64) and NFE, one solver's grid is fitted on 8,192
calibration draws x_T (seed 1, ``--calibration-points``) and then measured, like every record of
``benchmarks/solver_accuracy.py``, on that benchmark's own 1,000 draws (seed 0), which the fit never
saw: the RMSE against the probability-flow ODE's end at sigma = 0, with the median, 99th percentile
and maximum of the per-draw errors beside it (the RMSE of 1,000 draws is dominated by the few that
start near the boundary between two modes, where the ODE's map is steep). The solver and starting
grid of each NFE (CONFIGS; 'flow_t', rho = 2, ending at sigma_hat 0.03 or 0.1, the final step of order
3) are those that reached the lowest calibration RMSE in a wider search (DPM-Solver++(2M) and UniPC-3 x
both starting ends, 2,048 calibration draws), chosen without the held-out draws.

    python -m benchmarks.fitted_grid [--problems=vp_sde,ddpm_linear_1000] [--quick]

Prints one JSON object: {"records": [{problem, solver, nfe, start_end, calibration_rmse_initial,
calibration_rmse, rmse_initial, rmse, median, p99, max (initial and fitted), fit_seconds, times,
sigma_hat}, ...], "calibration_points", "iterations", "denoise_order", "wall_seconds"}; progress goes
to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)

from benchmarks.solver_accuracy import PROBLEMS, end_time, label, setup  # noqa: E402
from diffusion import samplers  # noqa: E402

# NFE -> (solver, options, sigma_hat at the starting grid's end); module docstring.
CONFIGS = {
    5: ("dpm_solver_pp_2m", {}, 0.1),
    10: ("dpm_solver_pp_2m", {}, 0.03),
    20: ("unipc", {"order": 3, "variant": "bh2"}, 0.03),
}
DENOISE_ORDER = 3  # of the final step to sigma = 0
ITERATIONS = 300


def per_draw_errors(samples, reference):
    """The RMSE of each draw over its coordinates."""
    return jnp.sqrt(jnp.mean((samples - reference) ** 2, axis=-1))


def summary(errors, prefix: str = "") -> dict:
    return {
        prefix + "rmse": float(jnp.sqrt(jnp.mean(errors**2))),
        prefix + "median": float(jnp.median(errors)),
        prefix + "p99": float(jnp.percentile(errors, 99)),
        prefix + "max": float(jnp.max(errors)),
    }


def run(problems: tuple[str, ...], calibration_points: int, quick: bool) -> dict:
    nfes = (5, 10) if quick else tuple(CONFIGS)
    records = []
    started = time.perf_counter()
    for problem in problems:
        process, denoiser, key, x_test, reference_test = setup(problem, 1000)
        _, _, _, x_calibration, reference_calibration = setup(problem, calibration_points, seed=1)
        for nfe in nfes:
            name, options, start_end = CONFIGS[nfe]
            num_steps, full_options = samplers.plan_steps(name, nfe, denoise_final=True, **options)
            initial = samplers.time_grid(
                process, "flow_t", num_steps, t_end=end_time(process, start_end)
            )
            fit_started = time.perf_counter()
            fitted = samplers.fit_time_grid(
                denoiser,
                name,
                initial,
                x_calibration,
                reference=reference_calibration,
                denoise_order=DENOISE_ORDER,
                iterations=ITERATIONS,
                **full_options,
            )
            fit_seconds = time.perf_counter() - fit_started
            program = samplers.sampler_program(
                name, denoise_final=True, denoise_order=DENOISE_ORDER, **full_options
            )
            initial_errors, errors = (
                per_draw_errors(program(denoiser, key, x_test, times).samples, reference_test)
                for times in (initial, fitted.times)
            )
            records.append(
                {
                    "problem": problem,
                    "solver": label(name, options),
                    "nfe": nfe,
                    "start_end": start_end,
                    "calibration_rmse_initial": fitted.initial_rmse,
                    "calibration_rmse": fitted.rmse,
                    **summary(initial_errors, "initial_"),
                    **summary(errors),
                    "fit_seconds": round(fit_seconds, 1),
                    "times": [float(t) for t in fitted.times],
                    "sigma_hat": [float(s) for s in jnp.exp(-process.log_snr(fitted.times))],
                }
            )
            print(
                f"{problem} {label(name, options)} nfe={nfe}: held-out RMSE "
                f"{records[-1]['initial_rmse']:.3g} -> {records[-1]['rmse']:.3g} "
                f"({fit_seconds:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        jax.clear_caches()
    return {
        "calibration_points": calibration_points,
        "iterations": ITERATIONS,
        "denoise_order": DENOISE_ORDER,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "records": records,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--problems",
        default=",".join(PROBLEMS),
        help=f"comma-separated subset of {', '.join(PROBLEMS)}",
    )
    parser.add_argument("--calibration-points", type=int, default=8192)
    parser.add_argument("--quick", action="store_true", help="NFE 5 and 10 only")
    arguments = parser.parse_args()
    problems = tuple(name for name in arguments.problems.split(",") if name)
    unknown = [name for name in problems if name not in PROBLEMS]
    if unknown:
        parser.error(f"unknown problem(s) {unknown}; accepted: {', '.join(PROBLEMS)}")
    if arguments.calibration_points < 1:
        parser.error(f"--calibration-points must be >= 1, got {arguments.calibration_points}")
    print(json.dumps(run(problems, arguments.calibration_points, arguments.quick), indent=1))


if __name__ == "__main__":
    main()
