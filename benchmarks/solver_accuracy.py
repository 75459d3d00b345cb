"""Accuracy of every deterministic solver against NFE on ring8_2d, measured at the ODE's end at sigma = 0.

For each problem (a process with the exact denoiser of the oracle preset ring8_2d, float64), every
deterministic sampler x time grid x NFE x way of ending starts from the same x_T ~ prior. Its error is
the RMSE over all coordinates against the probability-flow ODE's end at sigma = 0 from that x_T
(``diffusion.flow.ode_end_at_zero_noise``: a Dopri5 solve in the log-SNR variable at rtol = atol =
1e-10 down to sigma_hat = 1e-6, then the exact denoiser there, whose error is O(1e-12)). The only error
left is the solver's.

Every run ends at sigma = 0: the grid runs down to its end time t_end and the last step goes from
there to sigma = 0 (``denoise_final``; its evaluation counted in the NFE), at ``denoise_order`` 1
(Tweedie's step, the only one before the last-mile work), 2 or 3 (the x0 predictions extrapolated to
sigma_hat^2 = 0, ``diffusion.samplers.api``). t_end is the process's default (score_sde's 1e-3 for VP,
1e-5 for VE) or the time of sigma_hat = 0.01, 0.03, 0.05 or 0.1 ("end" in the records). NFE 5, 10, 20, 50,
100 are spent exactly. The grids: uniform in t, in log-SNR, in sqrt(t), Karras et al.'s rho = 7 grid
and the rectified flow's grid carried to each process ('flow_t', rho = 2 and 3; chain 'linspace' too
for DDPM).

    python -m benchmarks.solver_accuracy [--quick] [--problems=vp_sde,ddpm_linear_1000] [--baseline]

The solvers: DDIM, Euler, Heun, DPM-Solver(-fast), DPM-Solver(++) single- and multistep, UniPC
(orders 1-3 with B(h) = bh2, orders 2-3 with bh1, UniP with the UniC corrector), DEIS (tAB, orders 2
and 3) and SA-Solver at tau = 0. DPM-Solver++(2M)/(3M) SDE at eta = 0 are DPM-Solver++(2M)/(3M)
exactly and are not run twice. ``order_1_floor`` gives, per problem and end, the error left when the
ODE is solved exactly to the end time and Tweedie's step taken there: what an order-1 end cannot beat
(less any cancellation with the solver's own error).

``--baseline`` runs only what existed before the last-mile work (order 1, default end, the solvers of
BASELINE_SOLVERS on BASELINE_GRIDS) for the figures to compare against. Prints one JSON object:
{"records": [{problem, solver, grid, end, order, nfe, rmse}, ...], "best": {problem: {nfe: {...}}},
"order_1_floor": {problem: {end: {sigma_hat, rmse}}}, "reference": {...}, "num_points",
"wall_seconds"}; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)

from diffusion import oracle, processes, samplers  # noqa: E402  (after enabling float64)
from diffusion.flow import ode_end_at_zero_noise  # noqa: E402

PROBLEMS = {
    "ddpm_linear_1000": lambda: processes.DDPM(num_steps=1000, beta_start=1e-4, beta_end=0.02),
    "vp_sde": lambda: processes.VPSDE(),
    "ve_sde": lambda: processes.VESDE(),
    "flow": lambda: processes.RectifiedFlow(),
}
# Every deterministic fixed-step sampler (the adaptive one makes the reference); solvers whose order
# is an option appear once per order. BASELINE_SOLVERS: those that existed before the last-mile work.
BASELINE_SOLVERS = (
    ("ddim", {}),
    ("euler", {}),
    ("heun", {}),
    ("dpm_solver", {"order": 2}),
    ("dpm_solver", {"order": 3}),
    ("dpm_solver_fast", {}),
    ("dpm_solver_multistep", {"order": 2}),
    ("dpm_solver_multistep", {"order": 3}),
    ("dpm_solver_pp_2s", {}),
    ("dpm_solver_pp_2m", {}),
    ("dpm_solver_pp_3m", {}),
)
SOLVERS = (
    *BASELINE_SOLVERS,
    # UniPC (Zhao et al. 2023): UniP-p with the UniC corrector, B(h) = e^h - 1 (bh2) or h (bh1).
    ("unipc", {"order": 1, "variant": "bh2"}),
    ("unipc", {"order": 2, "variant": "bh2"}),
    ("unipc", {"order": 3, "variant": "bh2"}),
    ("unipc", {"order": 2, "variant": "bh1"}),
    ("unipc", {"order": 3, "variant": "bh1"}),
    # tAB-DEIS (Zhang & Chen 2023); order 1 is DDIM exactly.
    ("deis", {"order": 2}),
    ("deis", {"order": 3}),
    # SA-Solver (Xue et al. 2023) at tau = 0 is deterministic. DPM-Solver++(2M)/(3M) SDE at eta = 0
    # equal DPM-Solver++(2M)/(3M) (tested in the library), so they are left out.
    ("sa_solver", {"tau": 0.0}),
)
QUICK_SOLVERS = ("ddim", "dpm_solver_pp_3m", "unipc")  # --quick: one of each kind, defaults only
BASELINE_GRIDS = ("uniform_t", "uniform_log_snr", "quadratic_t", "karras")
GRIDS = (*BASELINE_GRIDS, "flow_t")
# Grids run again at another rho than their default (DEFAULT_RHO: karras 7, flow_t 2); their records
# name the grid "flow_t[rho=3]".
EXTRA_RHOS = (("flow_t", 3.0),)
ORDERS = (1, 2, 3)  # of the final step to sigma = 0
ENDS = (None, 0.01, 0.03, 0.05, 0.1)  # sigma_hat at the grid's end time; None: the process's t_end
# diffusion.flow.ode_end_at_zero_noise's defaults.
REFERENCE = {
    "solver": "dopri5",
    "rtol": 1e-10,
    "atol": 1e-10,
    "time_variable": "log_snr",
    "end_sigma_hat": 1e-6,
}


def label(name: str, options: dict) -> str:
    """The solver's name with the options that differ from its defaults, e.g. dpm_solver[order=2]."""
    defaults = samplers.get_sampler(name).defaults
    changed = {key: value for key, value in options.items() if defaults.get(key) != value}
    return name + "".join(f"[{key}={value}]" for key, value in sorted(changed.items()))


def end_time(process, end_sigma_hat: float | None) -> float | None:
    """The time at which sigma_hat = end_sigma_hat (not below t_min), or None for the default."""
    if end_sigma_hat is None:
        return None
    return max(float(process.t_from_log_snr(-math.log(end_sigma_hat))), process.t_min)


def setup(problem: str, num_points: int, seed: int = 0):
    """(process, exact denoiser of ring8_2d, key, x_T ~ prior of num_points draws, the ODE's end at
    sigma = 0 from each) for ``problem``; ``seed`` keys the draws."""
    process = PROBLEMS[problem]()
    denoiser = oracle.preset("ring8_2d").denoiser(process)
    key = jax.random.PRNGKey(seed)
    x_init = process.prior_sample(key, (num_points, 2))
    reference = jax.jit(lambda x: ode_end_at_zero_noise(denoiser, x, process.T))(x_init)
    return process, denoiser, key, x_init, reference


def run(quick: bool, problems: tuple[str, ...], baseline: bool) -> dict:
    nfes = (5, 10) if quick else (5, 10, 20, 50, 100)
    num_points = 256 if quick else 1000
    solvers = tuple(
        (name, options)
        for name, options in (BASELINE_SOLVERS if baseline else SOLVERS)
        if not quick or (name in QUICK_SOLVERS and label(name, options) == name)
    )
    orders, ends = ((1,), (None,)) if baseline else ((1, 3) if quick else ORDERS, ENDS)
    records, best, floors = [], {}, {}
    started = time.perf_counter()
    for problem in problems:
        process, denoiser, key, x_init, reference = setup(problem, num_points)
        # The order-1 floor of each end: the exact ODE down to the end time, then Tweedie's step.
        floors[problem] = {}
        for end in ends:
            t_end = process.sampling_t_end if end is None else end_time(process, end)
            end_sigma_hat = math.exp(-float(process.log_snr(t_end)))
            exact_then_tweedie = jax.jit(
                lambda x, d=denoiser, t=process.T, s=end_sigma_hat: ode_end_at_zero_noise(
                    d, x, t, end_sigma_hat=s
                )
            )(x_init)
            floors[problem]["default" if end is None else str(end)] = {
                "sigma_hat": end_sigma_hat,
                "rmse": float(jnp.sqrt(jnp.mean((exact_then_tweedie - reference) ** 2))),
            }
        grids = (BASELINE_GRIDS if baseline else GRIDS) + (("linspace",) * process.is_discrete)
        grid_runs = [(grids, None)]
        grid_runs += [] if quick or baseline else [((grid,), rho) for grid, rho in EXTRA_RHOS]
        for order, end, (grids, rho) in itertools.product(orders, ends, grid_runs):
            for record in samplers.sweep(
                denoiser,
                key,
                x_init,
                reference,
                solvers=solvers,
                nfes=nfes,
                grids=grids,
                t_end=end_time(process, end),
                rho=rho,
                denoise_final=True,
                denoise_order=order,
                repeats=1,
            ):
                if record["skipped"] is not None:
                    continue
                records.append(
                    {
                        "problem": problem,
                        "solver": label(record["solver"], record["options"]),
                        "grid": record["grid"] + ("" if rho is None else f"[rho={rho:g}]"),
                        "end": end,
                        "order": order,
                        "nfe": record["nfe"],
                        "rmse": record["error_rmse"],
                    }
                )
            if end == ends[-1] and rho == grid_runs[-1][1]:  # free the order's programs' memory
                jax.clear_caches()
            print(
                f"{problem} order={order} end={end}: {len(records)} records, "
                f"{time.perf_counter() - started:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        best[problem] = {}
        for nfe in nfes:
            candidates = [r for r in records if r["problem"] == problem and r["nfe"] == nfe]
            if candidates:
                winner = min(candidates, key=lambda r: r["rmse"])
                best[problem][nfe] = {
                    k: winner[k] for k in ("solver", "grid", "end", "order", "rmse")
                }
    return {
        "reference": REFERENCE,
        "num_points": num_points,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "order_1_floor": floors,
        "records": records,
        "best": best,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="NFE 5, 10; 3 solvers; final-step orders 1, 3; 256 points",
    )
    parser.add_argument(
        "--baseline", action="store_true", help="only order 1 at the default end time"
    )
    parser.add_argument(
        "--problems",
        default=",".join(PROBLEMS),
        help=f"comma-separated subset of {', '.join(PROBLEMS)}",
    )
    arguments = parser.parse_args()
    problems = tuple(name for name in arguments.problems.split(",") if name)
    unknown = [name for name in problems if name not in PROBLEMS]
    if unknown:
        parser.error(f"unknown problem(s) {unknown}; accepted: {', '.join(PROBLEMS)}")
    print(json.dumps(run(arguments.quick, problems, arguments.baseline), indent=1))


if __name__ == "__main__":
    main()
