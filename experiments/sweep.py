"""--mode=sweep: solvers x NFE x time grids on a checkpoint (or on the exact oracle of a toy config).

Every solver starts from the same x_T; its error is the RMSE against a tight adaptive solve of the
probability-flow ODE from that x_T (rtol = atol = 1e-6), both ending at the sampling end time
without the final denoising step, so for deterministic solvers it is their discretisation error
(Lu et al. 2022, Fig. 2). For toy data the sliced Wasserstein-2 distance of the
samples to fresh data is reported as well. Writes DIR/sweep/sweep.csv, sweep.md, sweep.png and
sweep.json.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from diffusion import data, metrics, oracle, samplers
from diffusion.images import write_atomically
from experiments.build import Experiment, Stream
from experiments.workdir import restore_ema_params

__all__ = ["plot_sweep", "run_sweep", "sweep", "sweep_markdown", "write_sweep"]

COLUMNS = ("solver", "grid", "nfe_target", "nfe", "num_steps", "error_rmse", "metric", "seconds")
REFERENCE_TOLERANCE = 1e-6


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def sweep_markdown(records: Sequence[dict[str, Any]], metric_name: str | None = None) -> str:
    """A Markdown table of the records that ran (skipped ones listed below it)."""
    columns = [c for c in COLUMNS if c != "metric" or metric_name is not None]
    header = [metric_name if c == "metric" else c for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ran = [r for r in records if r["skipped"] is None]
    for record in sorted(ran, key=lambda r: (r["grid"], r["solver"], r["nfe"] or 0)):
        lines.append("| " + " | ".join(_cell(record[c]) for c in columns) + " |")
    skipped = [r for r in records if r["skipped"] is not None]
    if skipped:
        lines.append("")
        lines.extend(
            f"- skipped {r['solver']} / {r['grid']} / NFE {r['nfe_target']}: {r['skipped']}"
            for r in skipped
        )
    return "\n".join(lines) + "\n"


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
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_atomically(path, lambda file: file.write(buffer.getvalue()))


def write_sweep(
    records: Sequence[dict[str, Any]], directory: str, metric_name: str | None = None
) -> dict[str, str]:
    """Write sweep.csv, sweep.md, sweep.png and sweep.json into ``directory``; return the paths."""
    paths = {ext: os.path.join(directory, f"sweep.{ext}") for ext in ("csv", "md", "png", "json")}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, "skipped"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    csv_text, md_text = buffer.getvalue().encode(), sweep_markdown(records, metric_name).encode()
    json_text = json.dumps(list(records), indent=1, default=str).encode()
    write_atomically(paths["csv"], lambda file: file.write(csv_text))
    write_atomically(paths["md"], lambda file: file.write(md_text))
    write_atomically(paths["json"], lambda file: file.write(json_text))
    plot_sweep(records, paths["png"], metric_name)
    return paths


def run_sweep(experiment: Experiment, denoiser, key: jax.Array) -> tuple[list[dict], str | None]:
    """The configured sweep (``experiment.eval.sweep_*``) of ``denoiser``; returns (records, metric
    name)."""
    settings, sampling = experiment.eval, experiment.sampling
    num = settings.sweep_num_samples
    prior_key, solver_key = jax.random.split(key)
    x_init = experiment.process.prior_sample(prior_key, (num, *experiment.data_shape))
    # The solvers are compared on the ODE itself: no final denoising step, whatever the config says.
    common = dict(t_end=sampling.t_end, rho=float(sampling.rho), denoise_final=False)
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
    metric, metric_name = None, None
    if experiment.is_toy:
        fresh = data.toy_batch(experiment.data.dataset, step=0, batch_size=num, seed=20_000)
        metric_name = "sliced_w2"

        def metric(samples):
            return metrics.sliced_wasserstein_distance(samples, fresh)

    solvers = [(name, sampling.options_of(name)) for name in settings.sweep_solvers]
    records = samplers.sweep(
        denoiser,
        solver_key,
        x_init,
        reference,
        solvers=solvers,
        nfes=settings.sweep_nfes,
        grids=settings.sweep_grids,
        metric=metric,
        **common,
    )
    return records, metric_name


def sweep(experiment: Experiment, workdir: str, *, checkpoint_step: int | None = None) -> str:
    """Run the sweep on the checkpoint's EMA params (or, for toy oracle data without a checkpoint,
    on the exact oracle denoiser) and write DIR/sweep/; return the Markdown table."""
    dataset = experiment.data.dataset
    try:
        step, params = restore_ema_params(experiment, workdir, checkpoint_step)
        denoiser, source = experiment.denoiser.replace(params=params), f"checkpoint step {step}"
    except FileNotFoundError:
        if not experiment.data.has_oracle:
            raise
        denoiser = oracle.preset(dataset).denoiser(experiment.process)
        source = f"the exact oracle of {dataset} (no checkpoint in {workdir})"
    print(f"sweeping {len(experiment.eval.sweep_solvers)} solvers on {source}")
    records, metric_name = run_sweep(experiment, denoiser, experiment.key(Stream.SWEEP))
    for record in records:
        record["source"] = source
    directory = os.path.join(workdir, "sweep")
    paths = write_sweep(records, directory, metric_name)
    table = sweep_markdown(records, metric_name)
    print(table)
    print(f"-> {paths['md']}, {paths['png']}")
    return table
