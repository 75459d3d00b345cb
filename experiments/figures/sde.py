"""Stochastic and ordinary differential equations of diffusion (Chan 2024, Sec. 4)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import oracle, samplers
from diffusion.flow import probability_flow
from diffusion.processes import VESDE, VPSDE
from experiments.figures import common
from experiments.figures.base import (
    FigureContext,
    bound_check,
    check,
    new_figure,
    register,
    save,
)

MIXTURE = dict(weights=(0.3, 0.7), means=(-2.0, 1.5), stds=(0.3, 0.5))
OU_START, OU_RATE = 3.0, 1.0  # dx = -theta x dt + sqrt(2 theta) dW from x_0 = 3
GAUSSIAN = dict(mean=0.5, std=0.5)  # data of the ODE whose flow is known exactly


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def euler_maruyama_paths(
    key: jax.Array, num_paths: int, num_steps: int, horizon: float, rate: float, start: float = 0.0
) -> jax.Array:
    """Euler-Maruyama paths of the Ornstein-Uhlenbeck SDE dx = -rate x dt + sqrt(2 rate) dW on
    [0, horizon] from x_0 = ``start`` (Chan 2024, Sec. 4); ``rate`` = 0 is Brownian motion
    dx = dW. Returns (num_steps + 1, num_paths)."""
    dt = horizon / num_steps
    noise_scale = math.sqrt(2.0 * rate) if rate > 0 else 1.0
    increments = math.sqrt(dt) * jax.random.normal(key, (num_steps, num_paths))

    def step(x, dw):
        x = x - rate * x * dt + noise_scale * dw
        return x, x

    x0 = jnp.full((num_paths,), start)
    return jnp.concatenate([x0[None], jax.lax.scan(step, x0, increments)[1]])


def rk4(denoiser, x: jax.Array, times: jax.Array) -> jax.Array:
    """Classical fourth-order Runge-Kutta on the probability-flow ODE down ``times`` (one lax.scan;
    Kutta 1901). Not a registered sampler: it is here as the fourth-order reference of the
    convergence-order panel."""

    def step(x, pair):
        t, s = pair
        h = s - t
        k1 = probability_flow(denoiser, x, t)
        k2 = probability_flow(denoiser, x + 0.5 * h * k1, t + 0.5 * h)
        k3 = probability_flow(denoiser, x + 0.5 * h * k2, t + 0.5 * h)
        k4 = probability_flow(denoiser, x + h * k3, s)
        return x + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6, None

    return jax.lax.scan(step, x, (times[:-1], times[1:]))[0]


def _order(steps: np.ndarray, errors: np.ndarray) -> float:
    """Least-squares slope of log error against log step size (step size = 1/steps)."""
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])


def _ks_distance(samples: np.ndarray, cdf) -> float:
    from scipy import stats

    return float(stats.kstest(np.ravel(samples), cdf).statistic)


@register(
    "sde_demos",
    "Brownian motion, Ornstein-Uhlenbeck, the reverse SDE with the exact score, forward and "
    "reverse VP trajectories, Euler/Heun/RK4 orders, PC vs Euler-Maruyama at equal NFE (Chan Sec. 4)",
)
def sde_demos(context: FigureContext) -> dict:
    """The SDE section of Chan 2024 (Sec. 4) as six panels.

    1. Brownian motion: 2,000 paths (quick: 500) of 1,000 steps on [0, 1]; check Var W_1 = 1.
    2. Ornstein-Uhlenbeck dx = -x dt + sqrt(2) dW from x_0 = 3 relaxing to N(0, 1): Euler-Maruyama,
       dt = 1e-3, 10,000 paths (quick: 2,000); checks mean 3 e^-t and variance 1 - e^-2t at t = 0.5,
       1, 3 within 4 standard errors (EM's own bias, O(dt), is 20 times smaller).
    3. The reverse SDE with the exact score (Song et al. 2021, eq. 6) takes N(0, 1) at T = 1 of the
       VP SDE back to p_0 = 0.3 N(-2, 0.3^2) + 0.7 N(1.5, 0.5^2): the registered Euler-Maruyama
       sampler, 1,000 steps to t = 1e-3, 20,000 samples (quick: 2,000); KS against the exact p_t.
    4. Forward (exact transitions) and reverse (that sampler, composed over sub-grids for
       snapshots) VP trajectories of the mixture.
    5. Euler (library), Heun (library) and classical RK4 on the probability-flow ODE of Gaussian
       data N(0.5, 0.5^2) under the VP SDE from T = 1 to 1e-3, whose exact flow is the oracle's
       ``ode_flow``; measured orders from 8 to 256 uniform steps (Euler 1, Heun 2, RK4 4).
    6. Predictor-corrector (Euler-Maruyama + Langevin corrector, snr 0.16; Song et al. 2021,
       Alg. 1-3) against Euler-Maruyama alone at equal NFE on the mixture, for the VP and VE
       (sigma 0.01 -> 10) SDEs: KS distance to the exact p_t_end against NFE, with the KS noise floor
       of exact samples of the same size.
    """
    checks = []
    mixture = common.mixture_1d(**MIXTURE)
    vp = VPSDE()

    # 1. Brownian motion.
    num_bm = context.size(2000, 500)
    brownian = np.asarray(euler_maruyama_paths(context.key(0), num_bm, 1000, 1.0, 0.0))
    variance_se = math.sqrt(2.0 / num_bm)
    checks.append(check("Var W_1 (Brownian motion)", np.var(brownian[-1]), 1.0, 4 * variance_se))

    # 2. Ornstein-Uhlenbeck from x_0 = 3.
    num_ou = context.size(10_000, 2_000)
    horizon, ou_steps = 3.0, 3000
    ou = np.asarray(
        euler_maruyama_paths(context.key(1), num_ou, ou_steps, horizon, OU_RATE, OU_START)
    )
    for t in (0.5, 1.0, 3.0):
        row = ou[round(t / horizon * ou_steps)]
        exact_var = 1.0 - math.exp(-2 * t)
        checks.append(
            check(
                f"OU mean at t = {t}",
                row.mean(),
                OU_START * math.exp(-t),
                4 * math.sqrt(exact_var / num_ou),
            )
        )
        checks.append(
            check(
                f"OU variance at t = {t}",
                row.var(),
                exact_var,
                4 * math.sqrt(2.0 / num_ou) * exact_var,
            )
        )

    # 3-4. Reverse SDE with the exact score, with snapshots; forward trajectories.
    num_reverse = context.size(20_000, 2_000)
    t_end = 1e-3
    times = samplers.time_grid(vp, "uniform_t", 1000, t_end=t_end)
    x_init = vp.prior_sample(context.key(2), (num_reverse, 1))
    snapshot_indices = list(range(0, 1001, 20))
    reverse_states = common.sample_with_snapshots(
        "euler_maruyama", mixture.denoiser(vp), context.key(3), x_init, times, snapshot_indices
    )
    reverse_final = reverse_states[-1][:, 0]
    checks.append(
        common.ks_check(
            "reverse SDE samples vs exact p_t_end (KS)",
            reverse_final,
            common.mixture_cdf(mixture, vp, t_end),
            num_tests=1,
        )
    )
    forward_times = np.asarray(times[::-1])
    forward_paths = _forward_paths(
        vp, context.key(4), mixture.sample(context.key(5), 8), forward_times
    )

    # 5. Convergence orders on the Gaussian probability-flow ODE.
    gaussian = oracle.gaussian(np.array([GAUSSIAN["mean"]]), np.array([GAUSSIAN["std"] ** 2]))
    gaussian_denoiser = gaussian.denoiser(vp)
    x_start = jnp.linspace(-2.5, 2.5, 16)[:, None]
    exact_end = np.asarray(gaussian.ode_flow(vp, x_start, vp.T, t_end))
    step_counts = np.array([8, 16, 32, 64, 128, 256])
    solvers = {
        "euler": lambda times: (
            samplers.sampler_program("euler")(
                gaussian_denoiser, context.key(6), x_start, times
            ).samples
        ),
        "heun": lambda times: (
            samplers.sampler_program("heun")(
                gaussian_denoiser, context.key(6), x_start, times
            ).samples
        ),
        "rk4": jax.jit(lambda times: rk4(gaussian_denoiser, x_start, times)),
    }
    expected_orders = {"euler": 1, "heun": 2, "rk4": 4}
    order_errors = {}
    for name, solve in solvers.items():
        errors = []
        for steps in step_counts:
            grid = samplers.time_grid(vp, "uniform_t", int(steps), t_end=t_end)
            errors.append(float(np.max(np.abs(np.asarray(solve(grid)) - exact_end))))
        order_errors[name] = errors
        # The order from the three finest grids (the asymptotic regime).
        measured = _order(step_counts[-3:], np.array(errors[-3:]))
        checks.append(
            check(
                f"convergence order of {name} (probability-flow ODE, Gaussian data)",
                measured,
                expected_orders[name],
                0.25,
            )
        )

    # 6. PC vs Euler-Maruyama at equal NFE.
    num_pc = context.size(20_000, 2_000)
    nfes = (10, 20, 50, 100, 200) if not context.quick else (10, 40)
    ve = VESDE(sigma_min=0.01, sigma_max=10.0)
    comparison = {}
    for process in (vp, ve):
        denoiser = mixture.denoiser(process)
        t_last = process.sampling_t_end
        cdf = common.mixture_cdf(mixture, process, t_last)
        x_prior = process.prior_sample(context.key(7), (num_pc, 1))
        rows = []
        for nfe in nfes:
            em = samplers.sample("euler_maruyama", denoiser, context.key(8), x_prior, num_steps=nfe)
            pc = samplers.sample(
                "pc",
                denoiser,
                context.key(9),
                x_prior,
                num_steps=nfe // 2,
                predictor="euler_maruyama",
                corrector="langevin",
                snr=0.16,
            )
            assert int(em.nfe) == int(pc.nfe) == nfe
            rows.append(
                dict(
                    nfe=nfe,
                    euler_maruyama=_ks_distance(np.asarray(em.samples), cdf),
                    pc=_ks_distance(np.asarray(pc.samples), cdf),
                )
            )
        comparison[process.name] = rows
    # The expected KS distance of exact samples of this size (the mean of Kolmogorov's law).
    noise_floor = math.sqrt(math.pi / 2) * math.log(2) / math.sqrt(num_pc)
    for process_name, rows in comparison.items():
        best = rows[-1]
        checks.append(
            bound_check(
                f"{process_name}: KS of the better sampler at NFE {best['nfe']}",
                min(best["euler_maruyama"], best["pc"]),
                common.bonferroni_ks_bound(num_pc, 1) * context.size(3, 3),
                note="3x the KS critical value: both samplers converge to p_t_end as NFE grows",
            )
        )

    # --- drawing
    figure = new_figure(4, 2)
    axes = figure.add_subplot(2, 4, 1)
    grid_bm = np.linspace(0, 1, 1001)
    axes.plot(grid_bm, brownian[:, :20], lw=0.5)
    axes.plot(grid_bm, 2 * np.sqrt(grid_bm), "k--", lw=1)
    axes.plot(grid_bm, -2 * np.sqrt(grid_bm), "k--", lw=1)
    axes.set_title("Brownian motion (+-2 sqrt t)", fontsize=9)
    axes = figure.add_subplot(2, 4, 2)
    grid_ou = np.linspace(0, horizon, ou_steps + 1)
    axes.plot(grid_ou, ou[:, :20], lw=0.5)
    mean_ou = OU_START * np.exp(-grid_ou)
    std_ou = np.sqrt(1 - np.exp(-2 * grid_ou))
    axes.plot(grid_ou, mean_ou, "k", lw=1)
    axes.plot(grid_ou, mean_ou + 2 * std_ou, "k--", lw=1)
    axes.plot(grid_ou, mean_ou - 2 * std_ou, "k--", lw=1)
    axes.set_title("Ornstein-Uhlenbeck -> N(0, 1)", fontsize=9)
    axes = figure.add_subplot(2, 4, 3)
    x_grid = np.linspace(-4, 4, 400)
    axes.hist(
        np.asarray(x_init)[:, 0],
        bins=80,
        range=(-4, 4),
        density=True,
        alpha=0.4,
        label="x_T ~ N(0,1)",
    )
    axes.hist(reverse_final, bins=80, range=(-4, 4), density=True, alpha=0.6, label="reverse SDE")
    axes.plot(x_grid, common.mixture_density(mixture, vp, x_grid, t_end), "k", lw=1, label="p_0")
    axes.set_title("reverse SDE, exact score", fontsize=9)
    axes.legend(fontsize=6, loc="upper left")
    axes = figure.add_subplot(2, 4, 4)
    axes.plot(forward_times, forward_paths, lw=0.5, color="tab:blue")
    snapshot_times = np.asarray(times)[snapshot_indices]
    reverse_paths = np.stack([state[:8, 0] for state in reverse_states])
    axes.plot(snapshot_times, reverse_paths, lw=0.6, color="tab:red")
    axes.set_xlabel("t: forward (blue) 0 -> 1, reverse (red) 1 -> 0")
    axes.set_title("VP trajectories", fontsize=9)
    axes = figure.add_subplot(2, 4, (5, 6))
    for name, errors in order_errors.items():
        axes.loglog(
            step_counts, errors, "o-", ms=3, label=f"{name} (order {expected_orders[name]})"
        )
    axes.set_xlabel("steps")
    axes.set_ylabel("max error at t = 1e-3")
    axes.set_title("probability-flow ODE, Gaussian data: error vs exact flow", fontsize=9)
    axes.legend(fontsize=7)
    for column, (process_name, rows) in enumerate(comparison.items()):
        axes = figure.add_subplot(2, 4, 7 + column)
        nfe_values = [row["nfe"] for row in rows]
        axes.loglog(
            nfe_values, [row["euler_maruyama"] for row in rows], "o-", ms=3, label="Euler-Maruyama"
        )
        axes.loglog(nfe_values, [row["pc"] for row in rows], "s-", ms=3, label="PC (EM + Langevin)")
        axes.axhline(noise_floor, color="0.6", ls="--", label="noise floor")
        axes.set_xticks(nfe_values, [str(n) for n in nfe_values])
        axes.minorticks_off()
        axes.set_xlabel("NFE")
        axes.set_ylabel("KS distance to p_t_end")
        axes.set_title(f"{process_name.upper()}: PC vs EM at equal NFE", fontsize=9)
        axes.legend(fontsize=6)
    figure.suptitle("Differential equations of diffusion (Chan 2024, Sec. 4)")
    save(figure, context, "sde_demos")
    return {
        "settings": {
            "mixture": MIXTURE,
            "ou": {"start": OU_START, "rate": OU_RATE, "dt": horizon / ou_steps},
            "ode_data": GAUSSIAN,
            "num_reverse_samples": num_reverse,
            "num_pc_samples": num_pc,
            "ve": {"sigma_min": ve.sigma_min, "sigma_max": ve.sigma_max},
        },
        "checks": checks,
        "data": {
            "order_steps": step_counts,
            "order_errors": order_errors,
            "pc_vs_em": comparison,
            "ks_noise_floor": noise_floor,
        },
    }


def _forward_paths(process, key: jax.Array, x0: jax.Array, times: np.ndarray) -> np.ndarray:
    """Forward paths at increasing ``times`` through the exact transitions q(x_t | x_s)."""

    @jax.jit
    def run(key, x0, times):
        def step(x, inputs):
            s, t, step_key = inputs
            scale, std = process.transition(s, t)
            x = scale * x + std * jax.random.normal(step_key, x.shape, x.dtype)
            return x, x

        keys = jax.random.split(key, times.shape[0] - 1)
        return jax.lax.scan(step, x0, (times[:-1], times[1:], keys))[1]

    path = run(key, x0[:, 0], jnp.asarray(times))
    return np.concatenate([np.asarray(x0)[None, :, 0], np.asarray(path)])
