"""Scores and Langevin dynamics (Chan 2024, Figs. 17-19 and eq. 68)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import oracle
from diffusion.processes import EDM
from experiments.figures import common
from experiments.figures.base import FigureContext, check, new_figure, register, save

# The data distribution itself is the marginal at sigma = 0 of x_t = x_0 + t eps (the EDM process at
# t = 0). Langevin runs on the marginal at LANGEVIN_TIME = sigma_min = 0.002 (the annealed Langevin
# sampler scales its step by sigma_t^2 / sigma_L^2, which needs sigma > 0); its target is that
# marginal, whose variance (s^2 + 0.002^2) is used exactly in every comparison.
CLEAN = EDM()
LANGEVIN_TIME = CLEAN.sigma_min

GAUSSIAN = dict(mean=1.0, std=0.8)
MIXTURE_1D = dict(weights=(0.4, 0.6), means=(-1.2, 1.2), stds=(0.5, 0.5))
MIXTURE_2D_MEANS = ((-1.5, -1.0), (1.5, 1.0))
MIXTURE_2D_STD = 0.6
ULA_STEP_RATIOS = (0.02, 0.1, 0.3, 0.6)  # tau / v for the Gaussian target N(mu, v)


def ula_stationary_variance(variance: float, step_size: float) -> float:
    """Stationary variance of unadjusted Langevin on N(mu, v) with step tau (Chan 2024, eq. 68):
    x' - mu = (1 - tau/v)(x - mu) + sqrt(2 tau) z has the fixed point v / (1 - tau / (2 v))."""
    return variance / (1.0 - step_size / (2.0 * variance))


def _score_1d(distribution, x: np.ndarray, t: float) -> np.ndarray:
    return np.asarray(common.score(distribution, CLEAN, jnp.asarray(x)[:, None], t))[:, 0]


@jax.jit
def _autodiff_score_1d(distribution, x: jax.Array) -> jax.Array:
    """d/dx log p_0(x) by autodiff of the oracle's log-density, one point at a time."""
    return jax.vmap(jax.grad(lambda y: distribution.log_prob(CLEAN, y[None, None], 0.0)[0]))(x)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _gradient_descent(distribution, start: jax.Array, step_size: float, num_steps: int):
    """x <- x + tau grad log p(x): the noise-free Langevin step (gradient ascent on log p)."""

    def step(x, _):
        x = x + step_size * distribution.score(CLEAN, x, LANGEVIN_TIME)
        return x, x

    return jnp.concatenate([start[None], jax.lax.scan(step, start, None, length=num_steps)[1]])


@register(
    "scores_langevin",
    "pdf and score of a Gaussian and a mixture, 2-D score field with Langevin and gradient "
    "descent, Langevin chains against the target and the unadjusted-Langevin bias (Chan Figs 17-19)",
)
def scores_langevin(context: FigureContext) -> dict:
    """Scores and Langevin sampling (Chan 2024, Figs. 17-19).

    Panels: pdf and score of N(1, 0.8^2) and of 0.4 N(-1.2, 0.5^2) + 0.6 N(1.2, 0.5^2); the score
    field of a 2-D two-Gaussian mixture (means (-1.5, -1), (1.5, 1), std 0.6) with one Langevin path
    (tau = 0.02, 1,000 steps) and gradient descent x <- x + tau score from the same start; 20,000
    Langevin chains (quick: 2,000) on the 1-D mixture after 3,000 steps of tau = 0.005 from
    U[-3, 3], against the target; the stationary variance of unadjusted Langevin on the Gaussian for
    tau / v in (0.02, 0.1, 0.3, 0.6), 100,000 chains (quick: 5,000) started at the target, run for
    10 v / tau steps (the start's influence decays like (1 - tau/v)^(2 steps) < e^-20).

    Checks: the oracle's score against autodiff of its log-density and against -(x - mu)/s^2; the
    measured stationary variance against v / (1 - tau/(2v)) within 4 standard errors
    (sqrt(2/n) v* for n chains) and its distance from v; the chains' KS statistic against the
    mixture; the score at gradient descent's end point (a mode: zero).
    """
    num_chains = context.size(20_000, 2_000)
    num_ula = context.size(100_000, 5_000)
    gaussian = oracle.gaussian(np.array([GAUSSIAN["mean"]]), np.array([GAUSSIAN["std"] ** 2]))
    mixture = common.mixture_1d(**MIXTURE_1D)
    checks = []

    # --- pdf and score (Fig. 17): oracle score vs autodiff of the oracle log-density, vs closed form.
    grid = np.linspace(-4.0, 4.0, 401)
    curves = {}
    for name, distribution in (("gaussian", gaussian), ("mixture", mixture)):
        density = common.mixture_density(distribution, CLEAN, grid, 0.0)
        score = _score_1d(distribution, grid, 0.0)
        autodiff = np.asarray(_autodiff_score_1d(distribution, jnp.asarray(grid)))
        checks.append(
            check(
                f"max |score - d/dx log p| ({name}, oracle vs autodiff)",
                np.max(np.abs(score - autodiff)),
                0.0,
                1e-10,
            )
        )
        curves[name] = (density, score)
    closed_form = -(grid - GAUSSIAN["mean"]) / GAUSSIAN["std"] ** 2
    checks.append(
        check(
            "max |score - (-(x - mu)/s^2)| (Gaussian)",
            np.max(np.abs(curves["gaussian"][1] - closed_form)),
            0.0,
            1e-10,
        )
    )

    # --- the 2-D score field, a Langevin path and gradient descent (Fig. 18).
    mixture_2d = oracle.gaussian_mixture(
        np.ones(2), np.array(MIXTURE_2D_MEANS), [np.full(2, MIXTURE_2D_STD**2)] * 2
    )
    denoiser_2d = mixture_2d.denoiser(CLEAN)
    start = jnp.array([[-0.5, 2.5]])
    step_size, num_path_steps = 0.02, 1000
    langevin = np.asarray(
        common.langevin_path(
            denoiser_2d, context.key(0), start, LANGEVIN_TIME, step_size, num_path_steps
        )
    )[:, 0]

    descent = np.asarray(_gradient_descent(mixture_2d, start, step_size, num_path_steps))[:, 0]
    end_score = np.linalg.norm(
        np.asarray(common.score(mixture_2d, CLEAN, jnp.asarray(descent[-1:]), LANGEVIN_TIME))
    )
    checks.append(check("|score| at gradient descent's end point (a mode)", end_score, 0.0, 1e-6))

    # --- many chains on the 1-D mixture against the target (Fig. 19).
    init = jax.random.uniform(context.key(1), (num_chains, 1), minval=-3.0, maxval=3.0)
    chains = common.langevin_at_level(
        mixture.denoiser(CLEAN), context.key(2), init, LANGEVIN_TIME, 0.005, 3000
    )
    chains = np.asarray(chains)[:, 0]
    checks.append(
        common.ks_check(
            "Langevin chains vs the mixture (KS)",
            chains,
            common.mixture_cdf(mixture, CLEAN, LANGEVIN_TIME),
            num_tests=1,
        )
    )

    # --- the unadjusted Langevin bias on the Gaussian target (Chan 2024, eq. 68).
    target_variance = GAUSSIAN["std"] ** 2 + LANGEVIN_TIME**2
    gaussian_denoiser = gaussian.denoiser(CLEAN)
    ula = []
    for index, ratio in enumerate(ULA_STEP_RATIOS):
        tau = ratio * target_variance
        num_steps = math.ceil(10.0 / ratio)
        key_init, key_run = jax.random.split(context.key(10 + index))
        x = GAUSSIAN["mean"] + math.sqrt(target_variance) * jax.random.normal(
            key_init, (num_ula, 1)
        )
        x = np.asarray(
            common.langevin_at_level(gaussian_denoiser, key_run, x, LANGEVIN_TIME, tau, num_steps)
        )[:, 0]
        exact = ula_stationary_variance(target_variance, tau)
        standard_error = math.sqrt(2.0 / num_ula) * exact  # of a Gaussian sample variance
        mean_standard_error = math.sqrt(exact / num_ula)
        measured = float(np.var(x))
        ula.append(
            dict(
                tau=tau,
                num_steps=num_steps,
                measured=measured,
                exact=exact,
                standard_error=standard_error,
            )
        )
        checks.append(
            check(
                f"ULA stationary variance, tau/v = {ratio}",
                measured,
                exact,
                4.0 * standard_error,
                note="closed form v / (1 - tau/(2v)); tolerance 4 standard errors",
            )
        )
        checks.append(
            check(
                f"ULA mean, tau/v = {ratio}",
                np.mean(x),
                GAUSSIAN["mean"],
                4.0 * mean_standard_error,
                note="the mean is exact for any tau; tolerance 4 standard errors",
            )
        )
    largest = ula[-1]
    checks.append(
        check(
            "ULA variance bias at the largest tau, in standard errors (> 4: the bias is real)",
            (largest["measured"] - target_variance) / largest["standard_error"],
            (largest["exact"] - target_variance) / largest["standard_error"],
            4.0,
        )
    )

    # --- drawing
    figure = new_figure(4, 2)
    for column, name in enumerate(("gaussian", "mixture")):
        density, score = curves[name]
        axes = figure.add_subplot(2, 4, 2 * column + 1)
        axes.plot(grid, density, "k")
        axes.set_title(f"p(x), {name}", fontsize=9)
        axes = figure.add_subplot(2, 4, 2 * column + 2)
        axes.plot(grid, score, "tab:red")
        axes.axhline(0, color="0.7", lw=0.5)
        axes.set_ylim(-8, 8)
        axes.set_title(f"score d/dx log p(x), {name}", fontsize=9)
    coords = np.linspace(-3.75, 3.75, 11)
    mesh = np.stack(np.meshgrid(coords, coords), axis=-1).reshape(-1, 2)
    field = np.asarray(common.score(mixture_2d, CLEAN, jnp.asarray(mesh), LANGEVIN_TIME))
    field_norm = np.linalg.norm(field, axis=1, keepdims=True)
    fine = np.linspace(-4.0, 4.0, 161)
    fine_mesh = np.stack(np.meshgrid(fine, fine), axis=-1).reshape(-1, 2)
    log_density = np.asarray(common.log_prob(mixture_2d, CLEAN, jnp.asarray(fine_mesh), 0.0))
    for column, (path, label) in enumerate(((langevin, "Langevin"), (descent, "gradient descent"))):
        axes = figure.add_subplot(2, 4, 5 + column)
        axes.contour(
            fine, fine, log_density.reshape(161, 161), levels=12, colors="0.8", linewidths=0.5
        )
        axes.quiver(
            mesh[:, 0],
            mesh[:, 1],
            *(field / np.maximum(field_norm, 1e-12)).T,
            np.log1p(field_norm[:, 0]),
            cmap="viridis",
            width=0.004,
        )
        axes.plot(path[:, 0], path[:, 1], color="tab:red", lw=0.8)
        axes.plot(*path[0], "ko", ms=3)
        axes.set_aspect("equal")
        axes.set_title(f"score field and {label}", fontsize=9)
    axes = figure.add_subplot(2, 4, 7)
    axes.hist(chains, bins=80, range=(-3.5, 3.5), density=True, alpha=0.6)
    axes.plot(grid, curves["mixture"][0], "k", lw=1)
    axes.set_xlim(-3.5, 3.5)
    axes.set_title(f"{num_chains} Langevin chains vs p(x)", fontsize=9)
    axes = figure.add_subplot(2, 4, 8)
    taus = np.array([row["tau"] for row in ula])
    fine_tau = np.linspace(0, taus.max() * 1.05, 100)
    axes.plot(
        fine_tau, ula_stationary_variance(target_variance, fine_tau), "k", label="v/(1-tau/2v)"
    )
    axes.errorbar(
        taus,
        [row["measured"] for row in ula],
        yerr=[2 * row["standard_error"] for row in ula],
        fmt="o",
        color="tab:red",
        ms=3,
        label="measured",
    )
    axes.axhline(target_variance, color="0.6", ls="--", label="target v")
    axes.set_xlabel("step size tau")
    axes.set_title("unadjusted Langevin: stationary variance", fontsize=9)
    axes.legend(fontsize=7)
    figure.suptitle("Scores and Langevin dynamics (Chan 2024, Figs. 17-19, eq. 68)")
    save(figure, context, "scores_langevin")
    return {
        "settings": {
            "gaussian": GAUSSIAN,
            "mixture_1d": MIXTURE_1D,
            "mixture_2d": {"means": MIXTURE_2D_MEANS, "std": MIXTURE_2D_STD},
            "langevin_time": LANGEVIN_TIME,
            "num_chains": num_chains,
            "num_ula_chains": num_ula,
        },
        "checks": checks,
        "data": {"ula": ula, "langevin_path": langevin, "descent_path": descent},
    }
