"""Explicit and denoising score matching on a kernel density estimate (Chan 2024, Figs. 20-21)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import oracle
from diffusion.processes import EDM
from experiments.figures import common
from experiments.figures.base import (
    FigureContext,
    bound_check,
    check,
    new_figure,
    register,
    save,
)

# Settings the text does not give, chosen here.
NUM_POINTS = 20  # the data set: 20 draws from MIXTURE
MIXTURE = dict(weights=(0.4, 0.6), means=(-1.5, 1.5), stds=(0.5, 0.7))
BANDWIDTH = 0.3  # the kernel width h = the DSM noise level sigma
AFFINE_THETAS = ((-1.0, 0.0), (-0.5, 0.5), (0.0, 0.0), (-2.0, -1.0), (0.5, 1.0), (-4.0, 2.0))
NUM_FEATURES = 61  # Gaussian bumps of width FEATURE_WIDTH centred on [-6, 6], plus 1 and x
FEATURE_WIDTH = 0.2
RIDGE = 1e-6  # ridge penalty per draw: bumps far from the data have no draws to fix them
PROCESS = EDM()  # x_t = x_0 + t eps: at t = h the noised empirical distribution is the KDE


def _features(x: np.ndarray) -> np.ndarray:
    """The score model's features: 1, x and NUM_FEATURES Gaussian bumps (linear in theta)."""
    centres = np.linspace(-6.0, 6.0, NUM_FEATURES)
    bumps = np.exp(-0.5 * ((x[:, None] - centres) / FEATURE_WIDTH) ** 2)
    return np.concatenate([np.ones((len(x), 1)), x[:, None], bumps], axis=1)


def dsm_affine_loss(a: float, b: float, points: np.ndarray, bandwidth: float) -> float:
    """J_DSM of the affine score model s(x) = a x + b in closed form (Vincent 2011, eq. for
    q_sigma(x~ | x) Gaussian): with x~ = x_m + h e, s - grad log q = (a x_m + b) + (a h + 1/h) e, so
    J_DSM = 1/2 mean_m [(a x_m + b)^2 + (a h + 1/h)^2]."""
    return 0.5 * float(np.mean((a * points + b) ** 2) + (a * bandwidth + 1.0 / bandwidth) ** 2)


@register(
    "score_matching",
    "explicit vs denoising score matching on a KDE: the losses differ by a constant (Vincent "
    "2011), DSM's learned score against the exact smoothed score (Chan Figs 20-21)",
)
def score_matching(context: FigureContext) -> dict:
    """Explicit score matching (ESM) on a kernel density estimate and denoising score matching (DSM).

    The data are 20 draws from 0.4 N(-1.5, 0.5^2) + 0.6 N(1.5, 0.7^2); the KDE with bandwidth
    h = 0.3 is the empirical distribution noised by x = x_m + h eps, i.e. the mixture
    (1/M) sum_m N(x_m, h^2), whose score S(x) is exact (the oracle). With the DSM target
    T = -(x - x_m)/h^2 = -eps/h (the conditional score),

        J_ESM(theta) = 1/2 E_{p_h} (s_theta - S)^2,   J_DSM(theta) = 1/2 E (s_theta - T)^2,

    and J_ESM - J_DSM = 1/2 E[S^2] - 1/2 E[T^2] (cross terms agree since E[T | x] = S), a constant
    (Vincent 2011, "A Connection Between Score Matching and Denoising Autoencoders"; Chan 2024,
    Sec. 3.3). Checks: for six affine models s = a x + b, J_ESM by quadrature (4,001 points on
    [-7, 7]) minus J_DSM in closed form equals C = 1/2 E_{p_h}[S^2] - 1/(2 h^2) (quadrature) to
    1e-9; the Monte-Carlo estimates (common random numbers, 200,000 draws, quick: 20,000) of the
    difference agree with C within 4 standard errors; DSM's ridge least-squares fit of a 63-feature linear
    model on the same draws (Chan Fig. 21) matches the exact smoothed score to a relative
    p_h-weighted L2 error below 5% (quick: 20%).
    """
    num_draws = context.size(200_000, 20_000)
    data = common.mixture_1d(**MIXTURE)
    points = np.asarray(data.sample(context.key(0), NUM_POINTS))[:, 0]
    kde = oracle.gaussian_mixture(
        np.ones(NUM_POINTS), points[:, None], [np.array([BANDWIDTH**2])] * NUM_POINTS
    )
    # Draws from the KDE through the library's forward process: x = x_m + h eps.
    index = jax.random.randint(context.key(1), (num_draws,), 0, NUM_POINTS)
    x0 = jnp.asarray(points)[index][:, None]
    x, eps = PROCESS.sample_marginal(context.key(2), x0, jnp.full((num_draws,), BANDWIDTH))
    x, eps = np.asarray(x)[:, 0], np.asarray(eps)[:, 0]
    dsm_target = -eps / BANDWIDTH  # grad_x log q(x | x_m) = -(x - x_m)/h^2
    exact_score = np.asarray(common.score(kde, PROCESS, jnp.asarray(x)[:, None], 0.0))[:, 0]

    # Quadrature of the exact smoothed density and score.
    grid = np.linspace(-7.0, 7.0, 4001)
    density = common.mixture_density(kde, PROCESS, grid, 0.0)
    grid_score = np.asarray(common.score(kde, PROCESS, jnp.asarray(grid)[:, None], 0.0))[:, 0]
    fisher = np.trapezoid(density * grid_score**2, grid)
    constant = 0.5 * fisher - 0.5 / BANDWIDTH**2  # J_ESM - J_DSM

    rows, checks = [], []
    for a, b in AFFINE_THETAS:
        model_grid = a * grid + b
        esm_exact = 0.5 * np.trapezoid(density * (model_grid - grid_score) ** 2, grid)
        dsm_exact = dsm_affine_loss(a, b, points, BANDWIDTH)
        model = a * x + b
        # Monte-Carlo with common random numbers: the difference's noise is that of the cross
        # term E[s (T - S)] plus 1/2 (S^2 - T^2), estimated per draw.
        per_draw = 0.5 * (model - exact_score) ** 2 - 0.5 * (model - dsm_target) ** 2
        rows.append(
            dict(
                a=a,
                b=b,
                esm=esm_exact,
                dsm=dsm_exact,
                esm_mc=float(np.mean(0.5 * (model - exact_score) ** 2)),
                dsm_mc=float(np.mean(0.5 * (model - dsm_target) ** 2)),
                difference_mc=float(per_draw.mean()),
                difference_se=float(per_draw.std() / np.sqrt(num_draws)),
            )
        )
    differences = np.array([row["esm"] - row["dsm"] for row in rows])
    checks.append(
        check(
            "max over theta |(J_ESM - J_DSM) - C| (quadrature / closed form)",
            np.max(np.abs(differences - constant)),
            0.0,
            1e-9,
            note=f"C = 1/2 E[S^2] - 1/(2 h^2) = {constant:.6f}",
        )
    )
    checks.append(check("spread of J_ESM - J_DSM over theta", np.ptp(differences), 0.0, 1e-9))
    worst = max(rows, key=lambda row: abs(row["difference_mc"] - constant) / row["difference_se"])
    checks.append(
        check(
            "Monte-Carlo J_ESM - J_DSM, worst theta, in standard errors from C",
            (worst["difference_mc"] - constant) / worst["difference_se"],
            0.0,
            4.0,
        )
    )

    # DSM and ESM least-squares fits of the linear-in-theta model (Chan Fig. 21).
    design = _features(x)
    gram = design.T @ design + RIDGE * num_draws * np.eye(design.shape[1])
    theta_dsm = np.linalg.solve(gram, design.T @ dsm_target)
    theta_esm = np.linalg.solve(gram, design.T @ exact_score)
    fitted_dsm = _features(grid) @ theta_dsm
    fitted_esm = _features(grid) @ theta_esm
    norm = np.trapezoid(density * grid_score**2, grid)
    error_dsm = np.sqrt(np.trapezoid(density * (fitted_dsm - grid_score) ** 2, grid) / norm)
    error_esm = np.sqrt(np.trapezoid(density * (fitted_esm - grid_score) ** 2, grid) / norm)
    checks.append(
        bound_check(
            "relative p_h-weighted L2 error of DSM's learned score",
            error_dsm,
            context.size(0.05, 0.2),
            note=f"ESM's fit of the same model on the same draws: {error_esm:.4f}",
        )
    )

    figure = new_figure(4, 1)
    axes = figure.add_subplot(1, 4, 1)
    axes.plot(grid, density, "k", label="KDE p_h")
    axes.plot(points, np.zeros_like(points), "|", color="tab:red", ms=12, label="data")
    axes.set_xlim(-5, 5)
    axes.set_title(f"{NUM_POINTS} points, KDE h = {BANDWIDTH}", fontsize=9)
    axes.legend(fontsize=7)
    axes = figure.add_subplot(1, 4, 2)
    axes.plot(grid, grid_score, "k", label="exact smoothed score")
    axes.plot(grid, fitted_dsm, "tab:red", ls="--", label="DSM fit")
    axes.plot(grid, fitted_esm, "tab:blue", ls=":", label="ESM fit")
    axes.set_xlim(-5, 5)
    axes.set_ylim(-12, 12)
    axes.set_title("score at sigma = h", fontsize=9)
    axes.legend(fontsize=7)
    axes = figure.add_subplot(1, 4, 3)
    slopes = np.linspace(-5.0, 1.0, 61)
    esm_curve = [0.5 * np.trapezoid(density * (s * grid - grid_score) ** 2, grid) for s in slopes]
    dsm_curve = [dsm_affine_loss(s, 0.0, points, BANDWIDTH) for s in slopes]
    axes.plot(slopes, esm_curve, "tab:blue", label="J_ESM (quadrature)")
    axes.plot(slopes, dsm_curve, "tab:red", label="J_DSM (closed form)")
    axes.plot(slopes, np.array(dsm_curve) + constant, "k:", label="J_DSM + C")
    axes.set_xlabel("a in s(x) = a x")
    axes.set_yscale("log")
    axes.set_title("losses along a family of models", fontsize=9)
    axes.legend(fontsize=7)
    axes = figure.add_subplot(1, 4, 4)
    labels = [f"({row['a']:g},{row['b']:g})" for row in rows]
    axes.errorbar(
        range(len(rows)),
        [row["difference_mc"] for row in rows],
        yerr=[2 * row["difference_se"] for row in rows],
        fmt="o",
        ms=3,
        label="Monte Carlo, 2 SE",
    )
    axes.axhline(constant, color="k", lw=1, label=f"C = {constant:.3f}")
    axes.set_xticks(range(len(rows)), labels, fontsize=6, rotation=30)
    axes.set_xlabel("theta = (a, b)")
    axes.set_title("J_ESM - J_DSM is constant in theta", fontsize=9)
    axes.legend(fontsize=7)
    figure.suptitle("Explicit vs denoising score matching (Chan 2024, Figs. 20-21; Vincent 2011)")
    save(figure, context, "score_matching")
    return {
        "settings": {
            "mixture": MIXTURE,
            "num_points": NUM_POINTS,
            "bandwidth": BANDWIDTH,
            "num_draws": num_draws,
            "num_features": NUM_FEATURES + 2,
        },
        "checks": checks,
        "data": {
            "points": points,
            "constant": constant,
            "affine_models": rows,
            "dsm_relative_error": error_dsm,
            "esm_relative_error": error_esm,
        },
    }
