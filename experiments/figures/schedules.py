"""Schedules and parameterizations of every process (the survey's Tables III and V)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.images import save_image_grid
from diffusion.parameterization import Denoiser
from diffusion.processes import DDPM, PROCESSES, Process, make_process
from experiments.figures import common, runs
from experiments.figures.base import (
    FigureContext,
    bound_check,
    check,
    new_figure,
    register,
    save,
)

ORACLE_MIXTURE = dict(weights=(0.5, 0.5), means=(-1.0, 1.0), stds=(0.3, 0.3))
RELATIVE_OUTPUT_ERROR = 0.1  # the error model of the "x0 early, eps late" panel


def _schedule_processes() -> dict[str, Process]:
    processes = {name: make_process(name) for name in PROCESSES}
    processes["ddpm (T = 500)"] = DDPM(num_steps=500)  # Higham, Higham & Grindrod 2023
    return processes


@functools.partial(jax.jit, static_argnums=0)
def _schedule(process: Process, t: jax.Array):
    """alpha, sigma, half log-SNR and the noise rate -d lambda/dt = g^2/(2 sigma^2) at t."""
    return (
        process.alpha(t),
        process.sigma(t),
        process.log_snr(t),
        0.5 * process.diffusion_sq(t) / process.sigma(t) ** 2,
        process.drift_coef(t),
        process.diffusion_sq(t),
    )


def schedule_checks(process: Process, name: str, t: np.ndarray) -> list[dict]:
    """The process's derived quantities against independent computations."""
    _, _, log_snr, rate, _, diffusion_sq = (np.asarray(v) for v in _schedule(process, t))
    checks = []
    # g^2 = d sigma^2/dt - 2 f sigma^2 with d/dt by central differences (Kingma et al. 2021, App. A).
    interior = (t > process.t_min + 1e-3 * (process.T - process.t_min)) & (
        t < process.T - 1e-3 * (process.T - process.t_min)
    )
    if isinstance(process, DDPM):  # piecewise in t: differentiate inside one step
        interior &= np.abs(t * process.num_steps - np.round(t * process.num_steps) - 0.5) < 0.25
    step = 1e-6 * (process.T - process.t_min)
    t_in = t[interior]
    sigma_sq = lambda s: np.asarray(_schedule(process, s)[1]) ** 2  # noqa: E731
    log_alpha = lambda s: np.log(np.asarray(_schedule(process, s)[0]))  # noqa: E731
    d_sigma_sq = (sigma_sq(t_in + step) - sigma_sq(t_in - step)) / (2 * step)
    f_numeric = (log_alpha(t_in + step) - log_alpha(t_in - step)) / (2 * step)
    g_sq_numeric = d_sigma_sq - 2 * f_numeric * sigma_sq(t_in)
    checks.append(
        check(
            f"{name}: max |g^2 - (d sigma^2/dt - 2 f sigma^2)| / g^2 (central differences)",
            np.max(np.abs(diffusion_sq[interior] - g_sq_numeric) / diffusion_sq[interior]),
            0.0,
            1e-5,
        )
    )
    round_trip = np.asarray(jax.jit(process.t_from_log_snr)(log_snr))
    checks.append(
        check(
            f"{name}: max |t(lambda(t)) - t| / (T - t_min)",
            np.max(np.abs(round_trip - t)) / (process.T - process.t_min),
            0.0,
            1e-9,
        )
    )
    checks.append(
        bound_check(f"{name}: max d lambda/dt (lambda decreasing: <= 0)", -rate.min(), 0.0)
    )
    return checks


def _oracle_views(context: FigureContext):
    """x0, eps, score and v views of the exact 1-D oracle denoiser along one noising path."""
    mixture = common.mixture_1d(**ORACLE_MIXTURE)
    process = make_process("vp")
    denoiser = mixture.denoiser(process)
    t = np.linspace(0.01, 1.0, 200)
    x0, eps = 0.9, -0.7
    alpha, sigma = np.asarray(process.alpha(t)), np.asarray(process.sigma(t))
    x_t = jnp.asarray(alpha * x0 + sigma * eps)[:, None]
    eps_pred, x0_pred = (
        np.asarray(v)[:, 0] for v in jax.jit(denoiser.predict)(x_t, jnp.asarray(t))
    )
    return {
        "t": t,
        "x0": x0_pred,
        "eps": eps_pred,
        "score": -eps_pred / sigma,
        "v": alpha * eps_pred - sigma * x0_pred,  # Salimans & Ho 2022, Sec. 4
        "true_x0": x0,
        "true_eps": eps,
    }


def _error_propagation(context: FigureContext) -> tuple[dict, list[dict]]:
    """x0 early, eps late: the same relative error in an eps-network's or an x0-network's output,
    propagated to the other view (exact: ||x0 - x0^||^2 = ||eps - eps^||^2 / SNR, independently:
    Ho et al. 2020 eq. 11 solved for x0)."""
    mixture = common.mixture_1d(**ORACLE_MIXTURE)
    data_std = float(np.sqrt(0.3**2 + 1.0))  # std of the mixture: within + between components
    process = make_process("vp")
    num = context.size(20_000, 2_000)
    t = np.linspace(0.02, 1.0, 50)
    x0 = mixture.sample(context.key(20), num)
    noise = jax.random.normal(context.key(21), x0.shape, x0.dtype)
    error_draw = jax.random.normal(context.key(22), x0.shape, x0.dtype)
    rows = []
    predict = jax.jit(lambda x, s: mixture.x0(process, x, s))
    for s in t:
        alpha, sigma = float(process.alpha(s)), float(process.sigma(s))
        x_t = alpha * x0 + sigma * noise
        x0_exact = predict(x_t, jnp.full((num,), s))
        eps_exact = (x_t - alpha * x0_exact) / sigma
        # eps-network with output error delta z; x0 through it: (x - sigma eps^) / alpha.
        eps_net = eps_exact + RELATIVE_OUTPUT_ERROR * error_draw
        x0_via_eps = (x_t - sigma * eps_net) / alpha
        # x0-network with output error delta * data_std * z (the same relative error).
        x0_net = x0_exact + RELATIVE_OUTPUT_ERROR * data_std * error_draw
        rows.append(
            dict(
                t=float(s),
                log_snr=float(np.log(alpha / sigma)),
                x0_error_eps_net=float(np.sqrt(np.mean((x0_via_eps - x0_exact) ** 2))),
                x0_error_x0_net=float(np.sqrt(np.mean((x0_net - x0_exact) ** 2))),
                sigma_over_alpha=sigma / alpha,
            )
        )
    z_rms = float(np.sqrt(np.mean(np.asarray(error_draw) ** 2)))
    log_ratio = [np.log(r["x0_error_eps_net"] / r["x0_error_x0_net"]) for r in rows]
    worst = max(
        abs(r["x0_error_eps_net"] / (RELATIVE_OUTPUT_ERROR * z_rms * r["sigma_over_alpha"]) - 1)
        for r in rows
    )
    checks = [
        check(
            "x0 error through an eps-network / (sigma/alpha x its eps error), max over t",
            worst,
            0.0,
            1e-9,
            note="||x0 - x0^|| = (sigma/alpha) ||eps - eps^|| at the same (x, t)",
        ),
        check(
            "crossover: lambda where an eps-network's x0 error equals an x0-network's",
            _crossover([r["log_snr"] for r in rows], log_ratio),
            -float(np.log(data_std)),
            0.02,
            note="exact: sigma/alpha = data std, lambda = -log(data std); the survey's 'x0 early "
            "(lambda below it), eps late (above)'; measured by linear interpolation on the t grid",
        ),
    ]
    return {"rows": rows, "data_std": data_std}, checks


def _crossover(log_snr: list[float], log_ratio: list[float]) -> float:
    """The lambda where log_ratio changes sign, by linear interpolation between grid points."""
    for k in range(len(log_ratio) - 1):
        if log_ratio[k] * log_ratio[k + 1] <= 0:
            weight = log_ratio[k] / (log_ratio[k] - log_ratio[k + 1])
            return log_snr[k] + weight * (log_snr[k + 1] - log_snr[k])
    return float("nan")


def _trained_model_panel(context: FigureContext):
    """The views of one trained model (an image run): x0 and eps of one test image over t, and
    the measured eps-MSE and x0-MSE (through eps) over t on test images."""
    run = runs.load_run(context.checkpoint_dir)
    if run.is_toy:
        raise ValueError(
            f"--checkpoint_dir={context.checkpoint_dir!r} holds a toy run; the schedules figure "
            "shows an image model's views (train e.g. --config=ddpm_digits)"
        )
    denoiser: Denoiser = run.denoiser
    process = run.process
    images = jnp.asarray(run.images("test")[0][: context.size(256, 32)])
    times = np.linspace(process.t_min, process.T, 11)
    if process.is_discrete:
        chain = process.chain_times
        times = chain[np.round(np.linspace(0, len(chain) - 1, 11)).astype(int)]
    predict = jax.jit(denoiser.predict)
    rows, strips = [], []
    for index, t in enumerate(times):
        x_t, eps = process.sample_marginal(
            jax.random.fold_in(context.key(30), index), images, jnp.full((len(images),), t)
        )
        eps_pred, x0_pred = predict(x_t, jnp.full((len(images),), t))
        alpha, sigma = float(process.alpha(t)), float(process.sigma(t))
        eps_mse = float(jnp.mean((eps_pred - eps) ** 2))
        x0_mse = float(jnp.mean((x0_pred - images) ** 2))
        rows.append(dict(t=float(t), eps_mse=eps_mse, x0_mse=x0_mse, snr=(alpha / sigma) ** 2))
        strips.append((np.asarray(x_t[0]), np.asarray(x0_pred[0]), np.asarray(eps_pred[0])))
    worst = max(abs(r["x0_mse"] * r["snr"] / r["eps_mse"] - 1) for r in rows)
    checks = [
        check(
            "trained model: max over t |SNR x0-MSE / eps-MSE - 1| (the views agree)",
            worst,
            0.0,
            1e-4,
            note="the views are affine in one another: ||eps - eps^||^2 = SNR ||x0 - x0^||^2",
        )
    ]
    variance = float(jnp.var(images))
    return {
        "rows": rows,
        "strips": strips,
        "times": times,
        "step": run.step,
        "data_variance": variance,
        "data_range": run.data_range,
    }, checks


@register(
    "schedules",
    "alpha, sigma, log-SNR and noise rate of every process; x0/eps/score/v views over t and the "
    "'x0 early, eps late' error (survey Tables III, V); a trained image model with --checkpoint_dir",
)
def schedules(context: FigureContext) -> dict:
    """Schedules and parameterizations (the survey "On the Design Fundamentals of Diffusion Models",
    Tables III and V).

    Top row: alpha, sigma, the half log-SNR lambda and the noise rate -d lambda/dt = g^2/(2 sigma^2)
    for every registered process (defaults) and DDPM with T = 500 (Higham et al.), against the
    normalised time (t - t_min)/(T - t_min). Checks per process: g^2 against
    d sigma^2/dt - 2 f sigma^2 by central differences, t(lambda(t)) = t, lambda decreasing.

    Bottom row: the x0, eps, score and v views of one output of the exact oracle denoiser
    (0.5 N(-1, 0.3^2) + 0.5 N(1, 0.3^2) under the VP SDE) along one noising path; the x0 error of
    an eps-network and of an x0-network with the same 10% relative output error (the exact
    posterior mean plus noise: no trained network is needed to show how an error propagates),
    crossing where sigma/alpha equals the data std. Without --checkpoint_dir the views are the
    oracle's (and the record says so); with the working directory of a trained image run the
    last panels show its x0 and eps views of one test image over t and its measured eps- and
    x0-MSE over t (checked: SNR x0-MSE = eps-MSE).
    """
    checks = []
    processes = _schedule_processes()
    u = np.linspace(0.0, 1.0, 2001)
    curves = {}
    for name, process in processes.items():
        t = process.t_min + u * (process.T - process.t_min)
        values = [np.asarray(v) for v in _schedule(process, jnp.asarray(t))]
        curves[name] = values
        checks += schedule_checks(process, name, t)
    for steps, expected in (
        (1000, np.prod(1 - np.linspace(1e-4, 0.02, 1000))),
        (500, np.prod(1 - np.linspace(1e-4, 0.02, 500))),
    ):
        alpha_bar = float(DDPM(num_steps=steps).alpha(1.0)) ** 2
        checks.append(
            check(
                f"DDPM linear betas, T = {steps}: alpha_bar_T",
                alpha_bar,
                expected,
                1e-10,
                relative=True,
                note="prod (1 - beta_i), Ho et al. 2020 eq. 4",
            )
        )
    views = _oracle_views(context)
    propagation, propagation_checks = _error_propagation(context)
    checks += propagation_checks
    trained = None
    if context.checkpoint_dir is not None:
        trained, trained_checks = _trained_model_panel(context)
        checks += trained_checks

    figure = new_figure(4, 2)
    titles = ("alpha(t)", "sigma(t)", "half log-SNR lambda(t)", "noise rate -d lambda/dt")
    for column, title in enumerate(titles):
        axes = figure.add_subplot(2, 4, column + 1)
        for name, values in curves.items():
            axes.plot(u, values[column], lw=1, label=name)
        if column in (1, 3):
            axes.set_yscale("log")
        axes.set_xlabel("(t - t_min) / (T - t_min)")
        axes.set_title(title, fontsize=9)
        if column == 0:
            axes.legend(fontsize=6)
    axes = figure.add_subplot(2, 4, 5)
    for key_name, colour in (("x0", "tab:blue"), ("eps", "tab:orange"), ("v", "tab:green")):
        axes.plot(views["t"], views[key_name], color=colour, label=f"{key_name} view")
    axes.axhline(views["true_x0"], color="tab:blue", ls=":", lw=1)
    axes.axhline(views["true_eps"], color="tab:orange", ls=":", lw=1)
    axes.set_xlabel("t (VP)")
    axes.set_title("views of the exact denoiser (dotted: truth)", fontsize=9)
    axes.legend(fontsize=6)
    axes = figure.add_subplot(2, 4, 6)
    axes.plot(views["t"], views["score"], color="tab:red", label="score view")
    axes.set_xlabel("t (VP)")
    axes.set_title("score = -eps / sigma", fontsize=9)
    axes = figure.add_subplot(2, 4, 7)
    rows = propagation["rows"]
    lam = [r["log_snr"] for r in rows]
    axes.semilogy(lam, [r["x0_error_eps_net"] for r in rows], label="x0 through eps-network")
    axes.semilogy(lam, [r["x0_error_x0_net"] for r in rows], label="x0 from x0-network")
    axes.axvline(-np.log(propagation["data_std"]), color="0.6", ls="--", lw=1)
    axes.invert_xaxis()
    axes.set_xlabel("lambda (noise increases ->)")
    axes.set_title("x0 early, eps late: 10% output error", fontsize=9)
    axes.legend(fontsize=6)
    axes = figure.add_subplot(2, 4, 8)
    if trained is None:
        axes.text(
            0.5,
            0.5,
            "no --checkpoint_dir:\nviews above are the exact\noracle denoiser's",
            ha="center",
            va="center",
            fontsize=9,
            transform=axes.transAxes,
        )
        axes.set_axis_off()
    else:
        t_values = [r["t"] for r in trained["rows"]]
        axes.semilogy(
            t_values, [r["eps_mse"] for r in trained["rows"]], "o-", ms=3, label="eps-MSE"
        )
        axes.semilogy(
            t_values, [r["x0_mse"] for r in trained["rows"]], "s-", ms=3, label="x0-MSE (via eps)"
        )
        axes.axhline(trained["data_variance"], color="0.6", ls="--", label="data variance")
        axes.set_xlabel("t")
        axes.set_title(f"trained model (step {trained['step']})", fontsize=9)
        axes.legend(fontsize=6)
    figure.suptitle("Schedules and parameterizations (survey Tables III and V)")
    save(figure, context, "schedules")
    record = {
        "settings": {
            "processes": {name: repr(process) for name, process in processes.items()},
            "views_from": "trained model"
            if trained
            else "exact oracle denoiser (no --checkpoint_dir)",
            "relative_output_error": RELATIVE_OUTPUT_ERROR,
        },
        "checks": checks,
        "data": {"error_propagation": rows},
    }
    if trained is not None:
        record["data"]["trained"] = trained["rows"]
        record["settings"]["checkpoint_dir"] = context.checkpoint_dir
        record["settings"]["checkpoint_step"] = trained["step"]
        # Rows: x_t, the x0 view and the eps view of one test image; columns: t increasing.
        views_grid = np.stack([np.stack(view) for view in zip(*trained["strips"], strict=True)])
        save_image_grid(
            context.path("schedules_views.png"),
            views_grid.reshape(-1, *views_grid.shape[2:]),
            trained["data_range"],
            num_columns=len(trained["strips"]),
        )
    return record
