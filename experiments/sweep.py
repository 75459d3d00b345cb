"""--mode=sweep: solvers x NFE x time grids on a checkpoint (or on the exact oracle of a toy config).

Every solver starts from the same x_T; its error is the RMSE against the probability-flow ODE's
solution from that x_T, so for deterministic solvers it is their discretisation error (Lu et al.
2022, Fig. 2). With ``eval.sweep_denoise_final`` (the default) every run ends at sigma = 0: its grid
ends at sampling.t_end and a final step of ``eval.sweep_denoise_order`` goes to sigma = 0 (its
evaluation counted in the NFE; ``diffusion.samplers.api``), and the reference is the ODE's own end at
sigma = 0 (``diffusion.flow.ode_end_at_zero_noise``: an adaptive solve in the log-SNR variable at
rtol = atol = 1e-6 down to sigma / alpha = 1e-6, where the denoiser's x0 prediction is the end up to
O(1e-12); for a trained network this evaluates it below t_min, as the end at sigma = 0 of its ODE
requires). Without it, the runs and the reference (an adaptive solve at 1e-6) end at sampling.t_end.
For toy data the sliced Wasserstein-2 distance of the samples to fresh data is reported as well.

Error against time: each solver also runs once per grid at ``eval.sweep_trajectory_nfe`` (or the
largest NFE below it that it can spend exactly) with its trajectory recorded, and the RMSE of its
state at every grid time is taken against the reference ODE solution at the same times (adaptive
solves at 1e-6 chained from grid time to grid time; the sigma = 0 state against the reference end).

Writes DIR/sweep/sweep.csv, sweep.md, sweep.png, sweep.json, error_vs_time.csv and
error_vs_time.png.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from diffusion import data, metrics, oracle, samplers
from diffusion.flow import ode_end_at_zero_noise
from diffusion.images import write_atomically
from experiments.build import ConfigError, EvalSettings, Experiment, Stream
from experiments.workdir import restore_ema_params

__all__ = [
    "SweepRun",
    "check_sweep_settings",
    "plot_error_vs_time",
    "plot_sweep",
    "reference_trajectory",
    "run_sweep",
    "sweep",
    "sweep_markdown",
    "trajectory_errors",
    "write_sweep",
]

COLUMNS = (
    "solver",
    "grid",
    "nfe_target",
    "nfe",
    "num_steps",
    "denoise_order",
    "error_rmse",
    "metric",
    "seconds",
)
TRAJECTORY_COLUMNS = ("solver", "grid", "nfe", "step", "t", "sigma_hat", "error_rmse")
REFERENCE_TOLERANCE = 1e-6
# (denoiser, x, t_start) -> the ODE's end at sigma = 0, compiled once per denoiser type and shape.
_ode_end = jax.jit(
    functools.partial(ode_end_at_zero_noise, rtol=REFERENCE_TOLERANCE, atol=REFERENCE_TOLERANCE)
)


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """What ``run_sweep`` measured.

    ``records``: one dict per solver x grid x NFE (``diffusion.samplers.sweep``'s, with the final
    step's ``denoise_order`` as run); ``metric_name``: the name of their ``metric`` column or None;
    ``trajectories``: one dict per solver x grid at the trajectory NFE (``trajectory_errors``);
    ``reference``: in words, what the errors are measured against; ``x_init``: the x_T every run
    starts from; ``reference_samples``: the reference solution from it.
    """

    records: list[dict[str, Any]]
    metric_name: str | None
    trajectories: list[dict[str, Any]]
    reference: str
    x_init: jax.Array
    reference_samples: jax.Array


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def sweep_markdown(
    records: Sequence[dict[str, Any]], metric_name: str | None = None, note: str | None = None
) -> str:
    """A Markdown table of the records that ran (skipped ones listed below it, then ``note``)."""
    columns = [c for c in COLUMNS if c != "metric" or metric_name is not None]
    header = [metric_name if c == "metric" else c for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ran = [r for r in records if r["skipped"] is None]
    for record in sorted(ran, key=lambda r: (r["grid"], r["solver"], r["nfe"] or 0)):
        lines.append("| " + " | ".join(_cell(record.get(c)) for c in columns) + " |")
    skipped = [r for r in records if r["skipped"] is not None]
    if skipped:
        lines.append("")
        lines.extend(
            f"- skipped {r['solver']} / {r['grid']} / NFE {r['nfe_target']}: {r['skipped']}"
            for r in skipped
        )
    if note:
        lines.extend(["", note])
    return "\n".join(lines) + "\n"


def _save_figure(figure: Figure, path: str) -> None:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_atomically(path, lambda file: file.write(buffer.getvalue()))


def plot_sweep(
    records: Sequence[dict[str, Any]], path: str, metric_name: str | None = None
) -> None:
    """Error (and metric) against NFE on log axes: one panel per grid, one line per solver."""
    ran = [r for r in records if r["skipped"] is None]
    grids = sorted({r["grid"] for r in ran})
    rows = 2 if metric_name and any(r["metric"] is not None for r in ran) else 1
    figure = Figure(figsize=(4 * max(1, len(grids)), 3.4 * rows))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, max(1, len(grids)), squeeze=False)
    for column, grid in enumerate(grids):
        for solver in sorted({r["solver"] for r in ran if r["grid"] == grid}):
            points = sorted(
                (r["nfe"], r["error_rmse"], r["metric"])
                for r in ran
                if r["grid"] == grid and r["solver"] == solver
            )
            nfe = [p[0] for p in points]
            axes[0][column].plot(nfe, [p[1] for p in points], marker="o", label=solver)
            if rows == 2:
                axes[1][column].plot(nfe, [p[2] for p in points], marker="o", label=solver)
        axes[0][column].set_title(grid)
        nfes = sorted({r["nfe"] for r in ran if r["grid"] == grid})
        for row in range(rows):
            axes[row][column].set_xscale("log")
            axes[row][column].set_yscale("log")
            # The swept NFEs as plain tick labels (log-axis minor labels would overlap).
            axes[row][column].set_xticks(nfes, [str(n) for n in nfes])
            axes[row][column].xaxis.set_minor_formatter(NullFormatter())
            axes[row][column].set_xlabel("NFE")
            axes[row][column].grid(True, which="both", alpha=0.3)
        axes[0][column].set_ylabel("RMSE to reference ODE solution")
        if rows == 2:
            axes[1][column].set_ylabel(metric_name)
    axes[0][0].legend(fontsize=7)
    _save_figure(figure, path)


def plot_error_vs_time(trajectories: Sequence[dict[str, Any]], path: str) -> None:
    """RMSE to the reference ODE trajectory against the noise level sigma / alpha at each grid time
    (log axes, noise decreasing to the right): one panel per grid, one line per solver. The state
    after the final step to sigma = 0 is drawn (a star) one decade below the smallest grid noise
    level, at the tick labelled 0; x_T, whose error is zero by construction, is left out."""
    ran = [r for r in trajectories if r["skipped"] is None]
    grids = sorted({r["grid"] for r in ran})
    figure = Figure(figsize=(4.4 * max(1, len(grids)), 3.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, max(1, len(grids)), squeeze=False)[0]
    for axis, grid in zip(axes, grids, strict=False):
        runs = [r for r in ran if r["grid"] == grid]
        positive = [s for r in runs for s in r["sigma_hat"][1:] if s > 0]
        zero_position = min(positive) / 10.0 if positive else 1e-3
        for run in runs:
            grid_points = [
                (s, e)
                for s, e in zip(run["sigma_hat"][1:], run["error_rmse"][1:], strict=True)
                if s > 0
            ]
            (line,) = axis.plot(
                [p[0] for p in grid_points],
                [max(p[1], 1e-12) for p in grid_points],
                marker=".",
                label=f"{run['solver']} ({run['nfe']})",
            )
            if run["sigma_hat"][-1] == 0.0:
                end_error = max(run["error_rmse"][-1], 1e-12)
                axis.plot(
                    [grid_points[-1][0], zero_position],
                    [grid_points[-1][1], end_error],
                    linestyle=":",
                    color=line.get_color(),
                )
                axis.plot([zero_position], [end_error], marker="*", color=line.get_color())
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.invert_xaxis()
        if any(r["sigma_hat"][-1] == 0.0 for r in runs):
            ticks = [t for t in axis.get_xticks() if t > zero_position * 3] + [zero_position]
            labels = [f"{t:g}" for t in ticks[:-1]] + ["0"]
            axis.set_xticks(ticks, labels)
            axis.xaxis.set_minor_formatter(NullFormatter())
            axis.set_xlim(max(positive) * 2.0, zero_position / 2.0)
        axis.set_title(f"{grid}, NFE (as run) in the legend", fontsize=9)
        axis.set_xlabel("noise level sigma / alpha at the grid time")
        axis.set_ylabel("RMSE to the reference ODE trajectory")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    _save_figure(figure, path)


def write_sweep(result: SweepRun, directory: str) -> dict[str, str]:
    """Write sweep.csv, sweep.md, sweep.png, sweep.json (records, trajectories and the reference),
    error_vs_time.csv and error_vs_time.png (when there are trajectories) into ``directory``;
    return the paths."""
    paths = {ext: os.path.join(directory, f"sweep.{ext}") for ext in ("csv", "md", "png", "json")}
    records, metric_name = result.records, result.metric_name
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, "skipped"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    csv_text = buffer.getvalue().encode()
    md_text = sweep_markdown(records, metric_name, f"Errors: {result.reference}.").encode()
    content = {
        "reference": result.reference,
        "records": list(records),
        "error_vs_time": list(result.trajectories),
    }
    json_text = json.dumps(content, indent=1, default=str).encode()
    write_atomically(paths["csv"], lambda file: file.write(csv_text))
    write_atomically(paths["md"], lambda file: file.write(md_text))
    write_atomically(paths["json"], lambda file: file.write(json_text))
    plot_sweep(records, paths["png"], metric_name)
    if result.trajectories:
        paths["error_vs_time_csv"] = os.path.join(directory, "error_vs_time.csv")
        paths["error_vs_time_png"] = os.path.join(directory, "error_vs_time.png")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[*TRAJECTORY_COLUMNS, "skipped"])
        writer.writeheader()
        for run in result.trajectories:
            base = {"solver": run["solver"], "grid": run["grid"], "nfe": run["nfe"]}
            if run["skipped"] is not None:
                writer.writerow({**base, "skipped": run["skipped"]})
                continue
            columns = zip(run["times"], run["sigma_hat"], run["error_rmse"], strict=True)
            for step, (t, sigma_hat, error) in enumerate(columns):
                writer.writerow(
                    {**base, "step": step, "t": t, "sigma_hat": sigma_hat, "error_rmse": error}
                )
        text = buffer.getvalue().encode()
        write_atomically(paths["error_vs_time_csv"], lambda file: file.write(text))
        plot_error_vs_time(result.trajectories, paths["error_vs_time_png"])
    return paths


# ----------------------------------------------------------------------------- measuring
def check_sweep_settings(settings: EvalSettings) -> None:
    """ConfigError naming the key unless eval.sweep_denoise_order is 1..3 and
    eval.sweep_trajectory_nfe a non-negative integer (0: no trajectories)."""
    order, nfe = settings.sweep_denoise_order, settings.sweep_trajectory_nfe
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 3:
        raise ConfigError(
            "config.eval.sweep_denoise_order: must be 1 (Tweedie's step), 2 or 3 (the last x0 "
            f"predictions extrapolated to sigma = 0), got {order!r}"
        )
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 0:
        raise ConfigError(
            f"config.eval.sweep_trajectory_nfe: must be an integer >= 0 (0: none), got {nfe!r}"
        )


def _final_order(name: str, options: dict[str, Any], denoise_order: int) -> int:
    """The order of the final step that ``name`` runs with: ``denoise_order`` for deterministic
    fixed-grid solvers (the extrapolation uses their recorded predictions), 1 for the others."""
    spec = samplers.get_sampler(name)
    if spec.is_adaptive(**options):
        return 1
    return denoise_order if spec.is_deterministic(**options) else 1


def reference_trajectory(
    denoiser, x_init: jax.Array, times: jax.Array, *, tolerance: float = REFERENCE_TOLERANCE
) -> np.ndarray:
    """The probability-flow ODE's solution from ``x_init`` at ``times[0]`` at every time of
    ``times``, shape (len(times), *x_init.shape): adaptive Dopri5 solves in the log-SNR variable at
    rtol = atol = ``tolerance`` from each grid time to the next, each starting from the previous end
    (the adaptive sampler returns only its end point). One compiled program serves every segment."""
    program = samplers.sampler_program(
        "adaptive", rtol=tolerance, atol=tolerance, time_variable="log_snr", max_steps=100_000
    )
    key = jax.random.PRNGKey(0)  # unused by the adaptive solver
    states = [jnp.asarray(x_init)]
    times = jnp.asarray(times, dtype=states[0].dtype)
    for index in range(times.shape[0] - 1):
        segment = times[index : index + 2]
        states.append(program(denoiser, key, states[-1], segment).samples)
    return np.asarray(jnp.stack(states), dtype=np.float64)


def _plan_at_most(
    name: str, options: dict[str, Any], nfe: int, denoise_final: bool
) -> tuple[int, int, dict[str, Any]]:
    """(NFE, num_steps, options) for the largest budget <= ``nfe`` that ``name`` spends exactly."""
    for budget in range(nfe, int(denoise_final), -1):
        try:
            num_steps, planned = samplers.plan_steps(
                name, budget, denoise_final=denoise_final, **options
            )
        except ValueError:
            continue
        return budget, num_steps, planned
    raise ValueError(f"{name} cannot spend exactly {nfe} or fewer network evaluations")


def trajectory_errors(
    denoiser,
    key: jax.Array,
    x_init: jax.Array,
    reference_end: jax.Array | None,
    *,
    solvers: Sequence[tuple[str, dict[str, Any]]],
    nfe: int,
    grids: Sequence[str],
    t_end: float | None = None,
    rho: float | None = None,
    denoise_final: bool = False,
    denoise_order: int = 1,
    tolerance: float = REFERENCE_TOLERANCE,
) -> list[dict[str, Any]]:
    """Error against time: each (solver, options) on each grid, run once with its trajectory recorded
    at ``nfe`` (or the largest NFE below it that it spends exactly), and the RMSE of its state at
    every grid time against ``reference_trajectory`` at the same times; with ``denoise_final`` the
    state after the final step to sigma = 0 (of ``_final_order``) against ``reference_end``.

    One dict per solver x grid: solver, options (as run), grid, nfe (as run), num_steps,
    denoise_order (None without a final step), times (the grid's, then None for sigma = 0),
    sigma_hat (sigma / alpha at them; 0 at the end), error_rmse (one per time; the first, at x_T, is
    zero by construction), skipped (None or the reason: an adaptive solver has no grid, an index
    grid may not start at x_T's time). One reference trajectory serves all: it is solved through the
    union of the grids' times.
    """
    if denoise_final and reference_end is None:
        raise ValueError("denoise_final needs reference_end, the ODE's end at sigma = 0")
    process = denoiser.process
    x_init = jnp.asarray(x_init)
    runs, recorded = [], []
    for name, given_options in solvers:
        options = samplers.get_sampler(name).check_options(dict(given_options))
        for grid in grids:
            run = {"solver": name, "options": dict(given_options), "grid": grid, "nfe": None}
            run["skipped"] = None
            runs.append(run)
            if samplers.get_sampler(name).is_adaptive(**options):
                run["skipped"] = f"{name} is adaptive: it has no grid, so no trajectory"
                continue
            try:
                _, num_steps, planned = _plan_at_most(name, options, nfe, denoise_final)
                times = samplers.time_grid(
                    process,
                    grid,
                    num_steps,
                    **samplers.shared_grid_arguments(grid, t_end=t_end, rho=rho),
                )
            except ValueError as error:
                run["skipped"] = str(error)
                continue
            if not math.isclose(float(times[0]), process.T, rel_tol=1e-6):
                run["skipped"] = f"the grid starts at t = {float(times[0]):.6g}, x_T at {process.T}"
                continue
            order = _final_order(name, planned, denoise_order)
            program = samplers.sampler_program(
                name, denoise_final=denoise_final, denoise_order=order, record=True, **planned
            )
            times = times.astype(x_init.dtype)
            result = program(denoiser, key, x_init, times)
            run.update(
                options=dict(planned),
                nfe=int(result.nfe),
                num_steps=num_steps,
                denoise_order=order if denoise_final else None,
            )
            recorded.append((run, np.asarray(times), np.asarray(result.trajectory, np.float64)))
    if not recorded:
        return runs
    # Every grid starts at T; the union of their times, decreasing, and the ODE through them.
    union = np.unique(np.concatenate([times for _, times, _ in recorded]))[::-1]
    states = reference_trajectory(denoiser, x_init, union, tolerance=tolerance)
    reference_at = {float(t): state for t, state in zip(union, states, strict=True)}
    for run, times, trajectory in recorded:
        reference = np.stack([reference_at[float(t)] for t in times])
        sigma_hat = np.exp(-np.asarray(process.log_snr(times), dtype=np.float64)).tolist()
        time_list: list[float | None] = times.astype(np.float64).tolist()
        if denoise_final:
            reference = np.concatenate([reference, np.asarray(reference_end)[None]])
            time_list.append(None)
            sigma_hat.append(0.0)
        axes = tuple(range(1, trajectory.ndim))
        errors = np.sqrt(np.mean((trajectory - reference) ** 2, axis=axes))
        run.update(times=time_list, sigma_hat=sigma_hat, error_rmse=errors.tolist())
    return runs


def run_sweep(experiment: Experiment, denoiser, key: jax.Array) -> SweepRun:
    """The configured sweep (``experiment.eval.sweep_*``) of ``denoiser`` and its error against time
    (module docstring)."""
    settings, sampling = experiment.eval, experiment.sampling
    check_sweep_settings(settings)
    solvers = [(name, sampling.options_of(name)) for name in settings.sweep_solvers]
    for name, options in solvers:  # every solver checked before anything compiles
        try:
            samplers.get_sampler(name).check_options(options)
        except ValueError as error:
            raise ConfigError(f"config.eval.sweep_solvers: {error}") from None
    num = settings.sweep_num_samples
    process = experiment.process
    prior_key, solver_key = jax.random.split(key)
    x_init = process.prior_sample(prior_key, (num, *experiment.data_shape))
    denoise_final, denoise_order = bool(settings.sweep_denoise_final), settings.sweep_denoise_order
    common = dict(t_end=sampling.t_end, rho=sampling.rho, denoise_final=denoise_final)
    tolerance = f"rtol = atol = {REFERENCE_TOLERANCE:g}"
    if denoise_final:
        reference = _ode_end(denoiser, x_init, process.T)
        description = (
            f"RMSE to the probability-flow ODE's end at sigma = 0 from the same x_T (Dopri5 in "
            f"log-SNR at {tolerance} to sigma / alpha = 1e-6, then the x0 prediction); every run "
            f"ends with a final step to sigma = 0 of order {denoise_order} (order 1, Tweedie's "
            "step, for stochastic solvers), counted in the NFE"
        )
    else:
        reference = samplers.sample(
            "adaptive",
            denoiser,
            solver_key,
            x_init,
            num_steps=1,
            rtol=REFERENCE_TOLERANCE,
            atol=REFERENCE_TOLERANCE,
            **common,
        ).samples
        description = (
            f"RMSE to the probability-flow ODE's solution at t_end from the same x_T (Dopri5 at "
            f"{tolerance}); no final denoising step"
        )
    metric, metric_name = None, None
    if experiment.is_toy:
        fresh = data.toy_batch(experiment.data.dataset, step=0, batch_size=num, seed=20_000)
        metric_name = "sliced_w2"

        def metric(samples):
            return metrics.sliced_wasserstein_distance(samples, fresh)

    records = []
    for name, options in solvers:
        order = _final_order(name, options, denoise_order)
        for record in samplers.sweep(
            denoiser,
            solver_key,
            x_init,
            reference,
            solvers=[(name, options)],
            nfes=settings.sweep_nfes,
            grids=settings.sweep_grids,
            metric=metric,
            denoise_order=order,
            **common,
        ):
            # As samplers.sweep runs it: stochastic solvers end with Tweedie's step.
            record["denoise_order"] = (
                (order if record["deterministic"] else 1) if denoise_final else None
            )
            records.append(record)
    trajectories = []
    if settings.sweep_trajectory_nfe > 0:
        trajectories = trajectory_errors(
            denoiser,
            solver_key,
            x_init,
            reference if denoise_final else None,
            solvers=solvers,
            nfe=settings.sweep_trajectory_nfe,
            grids=settings.sweep_grids,
            denoise_order=denoise_order,
            tolerance=REFERENCE_TOLERANCE,
            **common,
        )
    return SweepRun(records, metric_name, trajectories, description, x_init, reference)


def sweep(experiment: Experiment, workdir: str, *, checkpoint_step: int | None = None) -> str:
    """Run the sweep on the checkpoint's EMA params (or, for toy oracle data without a checkpoint,
    on the exact oracle denoiser) and write DIR/sweep/; return the Markdown table."""
    dataset = experiment.data.dataset
    check_sweep_settings(experiment.eval)
    try:
        step, params = restore_ema_params(experiment, workdir, checkpoint_step)
        denoiser, source = experiment.denoiser.replace(params=params), f"checkpoint step {step}"
    except FileNotFoundError:
        if not experiment.data.has_oracle:
            raise
        denoiser = oracle.preset(dataset).denoiser(experiment.process)
        source = f"the exact oracle of {dataset} (no checkpoint in {workdir})"
    print(f"sweeping {len(experiment.eval.sweep_solvers)} solvers on {source}")
    result = run_sweep(experiment, denoiser, experiment.key(Stream.SWEEP))
    for record in [*result.records, *result.trajectories]:
        record["source"] = source
    directory = os.path.join(workdir, "sweep")
    paths = write_sweep(result, directory)
    table = sweep_markdown(result.records, result.metric_name, f"Errors: {result.reference}.")
    print(table)
    print(
        f"-> {', '.join(paths[name] for name in ('md', 'png', 'error_vs_time_png') if name in paths)}"
    )
    return table
