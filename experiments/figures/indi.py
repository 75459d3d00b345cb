"""Inversion by direct iteration, InDI (Delbracio & Milanfar 2023; Chan 2024, Sec. 2.9)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import oracle, samplers
from diffusion.processes import EDM
from experiments.figures import common
from experiments.figures.base import FigureContext, check, new_figure, register, save

NOISE = 1.5  # y = x + NOISE n: the degraded observation InDI starts from at t = 1
MIXTURE = dict(weights=(0.5, 0.5), means=(-1.5, 1.5), stds=(0.25, 0.4))
GAUSSIAN = dict(mean=0.5, std=0.8)
# x_t = (1 - t) x + t y = x + t NOISE n is the EDM process (alpha = 1, sigma = tau) at tau = NOISE t.
PROCESS = EDM(sigma_min=1e-3, sigma_max=NOISE)


@functools.partial(jax.jit, static_argnums=1)
def indi_sampler(mixture: oracle.GaussianMixture, num_steps: int, y: jax.Array) -> jax.Array:
    """InDI's sampler with the exact posterior mean D(x_t, t) = E[x | x_t] (Delbracio & Milanfar
    2023, eq. 6; Chan 2024, eq. 62): x_{t - d} = (d/t) D(x_t, t) + (1 - d/t) x_t from x_1 = y down
    the uniform grid t_i = 1 - i/N, d = 1/N; the last step (d = t) returns D itself. Returns the
    path (N + 1, *y.shape)."""
    step_size = 1.0 / num_steps

    def step(x, t):
        posterior_mean = mixture.x0(PROCESS, x, NOISE * t)  # E[x | x_t], x_t = x + t NOISE n
        x = (step_size / t) * posterior_mean + (1.0 - step_size / t) * x
        return x, x

    times = 1.0 - jnp.arange(num_steps) * step_size
    return jnp.concatenate([y[None], jax.lax.scan(step, y, times)[1]])


@register(
    "indi",
    "InDI: the interpolation x_t = (1 - t) x + t y, its sampler and loss; with the exact "
    "posterior mean it is Euler on the VE probability-flow ODE with sigma_t = t sigma (Chan Sec. 2.9)",
)
def indi(context: FigureContext) -> dict:
    """Inversion by direct iteration (Delbracio & Milanfar 2023; Chan 2024, Sec. 2.9, eqs. 62-64).

    Clean data p_0 = 0.5 N(-1.5, 0.25^2) + 0.5 N(1.5, 0.4^2) and observations y = x + 1.5 n; the
    interpolation x_t = (1 - t) x + t y has the law of the VE process x + sigma_t n with
    sigma_t = 1.5 t, here the library's EDM process at tau = 1.5 t. With the exact posterior mean
    D = E[x | x_t] (the oracle), InDI's step x_{t-d} = (d/t) D + (1 - d/t) x_t equals Euler's step
    of the VE probability-flow ODE dx/dtau = (x - D)/tau (Karras et al. 2022, eq. 3; Song et al.
    2021, eq. 13 with f = 0, g^2 = 2 tau) from tau = 1.5 t to 1.5 (t - d), and its last step
    (d = t) is the final denoising step. Checks: InDI written out against the library's 'euler'
    sampler with ``denoise_final`` on that grid (200 steps, 20,000 observations; quick: 2,000);
    Tweedie, D = x_t + sigma_t^2 grad log p_t; the samples against p_0 (KS); InDI's training loss
    E (D(x_t, t) - x)^2 of the exact posterior mean for Gaussian data N(0.5, 0.8^2) against its
    closed form s^2 sigma_t^2 / (s^2 + sigma_t^2) (within 4 standard errors).
    """
    num = context.size(20_000, 2_000)
    num_steps = 200
    mixture = common.mixture_1d(**MIXTURE)
    x = mixture.sample(context.key(0), num)
    y = x + NOISE * jax.random.normal(context.key(1), x.shape, x.dtype)
    checks = []

    path = np.asarray(indi_sampler(mixture, num_steps, y))
    # The same thing as the library's Euler solver of the probability-flow ODE on the EDM process.
    times = PROCESS.sigma_max * (1.0 - jnp.arange(num_steps) / num_steps)  # tau_i, i < N
    euler = samplers.sampler_program("euler", denoise_final=True)(
        mixture.denoiser(PROCESS), context.key(2), y, times
    )
    checks.append(
        check(
            "max |InDI - Euler on the VE probability-flow ODE (+ final denoising)|",
            np.max(np.abs(path[-1] - np.asarray(euler.samples))),
            0.0,
            1e-12,
            note=f"{num_steps} steps, NFE {int(euler.nfe)}",
        )
    )
    tau = jnp.full((num,), 0.7 * NOISE)
    tweedie = y + tau[:, None] ** 2 * common.score(mixture, PROCESS, y, tau)
    checks.append(
        check(
            "max |E[x | x_t] - (x_t + sigma_t^2 score)| (Tweedie)",
            np.max(np.abs(np.asarray(common.posterior_mean(mixture, PROCESS, y, tau) - tweedie))),
            0.0,
            1e-12,
        )
    )
    checks.append(
        common.ks_check(
            f"InDI samples ({num_steps} steps) vs p_0 (KS)",
            path[-1],
            common.mixture_cdf(mixture, PROCESS, 0.0),
            num_tests=1,
        )
    )

    # InDI's training loss E (D(x_t, t) - x)^2 at the exact posterior mean, Gaussian data.
    gaussian = oracle.gaussian(np.array([GAUSSIAN["mean"]]), np.array([GAUSSIAN["std"] ** 2]))
    x_gauss = gaussian.sample(context.key(3), num)
    noise = jax.random.normal(context.key(4), x_gauss.shape, x_gauss.dtype)
    loss_times = np.linspace(0.05, 1.0, 20)
    loss_rows = []
    for t in loss_times:
        x_t = (1 - t) * x_gauss + t * (x_gauss + NOISE * noise)  # the interpolation itself
        sigma_t = NOISE * t
        squared = np.asarray(
            (common.posterior_mean(gaussian, PROCESS, x_t, jnp.full((num,), sigma_t)) - x_gauss)
            ** 2
        )[:, 0]
        mixture_squared = np.asarray(
            (
                common.posterior_mean(
                    mixture, PROCESS, (1 - t) * x + t * y, jnp.full((num,), sigma_t)
                )
                - x
            )
            ** 2
        )[:, 0]
        exact = GAUSSIAN["std"] ** 2 * sigma_t**2 / (GAUSSIAN["std"] ** 2 + sigma_t**2)
        loss_rows.append(
            dict(
                t=float(t),
                gaussian=float(squared.mean()),
                gaussian_se=float(squared.std() / math.sqrt(num)),
                gaussian_exact=exact,
                mixture=float(mixture_squared.mean()),
                identity=sigma_t**2,
            )
        )
    worst = max(
        loss_rows, key=lambda r: abs(r["gaussian"] - r["gaussian_exact"]) / r["gaussian_se"]
    )
    checks.append(
        check(
            "InDI loss of the exact posterior mean (Gaussian data), worst t, in standard errors",
            (worst["gaussian"] - worst["gaussian_exact"]) / worst["gaussian_se"],
            0.0,
            4.0,
            note="exact: s^2 sigma_t^2 / (s^2 + sigma_t^2)",
        )
    )

    figure = new_figure(4, 1)
    axes = figure.add_subplot(1, 4, 1)
    t_line = np.array([0.0, 1.0])
    for k in range(12):
        axes.plot(t_line, [float(x[k, 0]), float(y[k, 0])], lw=0.7)
    axes.set_xlabel("t")
    axes.set_title("x_t = (1 - t) x + t y", fontsize=9)
    axes = figure.add_subplot(1, 4, 2)
    t_path = 1.0 - np.arange(num_steps + 1) / num_steps
    axes.plot(t_path, path[:, :12, 0], lw=0.7)
    axes.set_xlabel("t")
    axes.invert_xaxis()
    axes.set_title("InDI sampler from y (t = 1) to x (t = 0)", fontsize=9)
    axes = figure.add_subplot(1, 4, 3)
    grid = np.linspace(-5, 5, 400)
    one_step = np.asarray(common.posterior_mean(mixture, PROCESS, y, jnp.full((num,), NOISE)))
    axes.hist(np.asarray(y)[:, 0], bins=100, range=(-5, 5), density=True, alpha=0.3, label="y")
    axes.hist(
        one_step[:, 0], bins=100, range=(-5, 5), density=True, alpha=0.5, label="1 step: E[x|y]"
    )
    axes.hist(
        path[-1, :, 0], bins=100, range=(-5, 5), density=True, alpha=0.5, label=f"{num_steps} steps"
    )
    axes.plot(grid, common.mixture_density(mixture, PROCESS, grid, 0.0), "k", lw=1, label="p(x)")
    axes.set_title("restorations", fontsize=9)
    axes.legend(fontsize=6, loc="upper left")
    axes = figure.add_subplot(1, 4, 4)
    axes.plot(loss_times, [r["identity"] for r in loss_rows], "0.6", ls="--", label="D = x_t")
    axes.plot(loss_times, [r["mixture"] for r in loss_rows], "tab:blue", label="E[x|x_t], mixture")
    axes.plot(loss_times, [r["gaussian_exact"] for r in loss_rows], "k", label="Gaussian, exact")
    axes.plot(loss_times, [r["gaussian"] for r in loss_rows], "r.", ms=4, label="Gaussian, MC")
    axes.set_xlabel("t")
    axes.set_title("InDI loss E (D(x_t, t) - x)^2", fontsize=9)
    axes.legend(fontsize=6)
    figure.suptitle("InDI (Delbracio & Milanfar 2023; Chan 2024, Sec. 2.9)")
    save(figure, context, "indi")
    return {
        "settings": {
            "noise": NOISE,
            "mixture": MIXTURE,
            "gaussian": GAUSSIAN,
            "num_steps": num_steps,
            "num_samples": num,
        },
        "checks": checks,
        "data": {"loss": loss_rows},
    }
