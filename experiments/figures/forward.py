"""The forward process of DDPM on a 1-D two-Gaussian mixture (Chan 2024, Figs. 11-12 and 14)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.processes import DDPM
from experiments.figures import common
from experiments.figures.base import FigureContext, check, new_figure, register, save

SNAPSHOT_STEPS = (1, 5, 10, 30, 40, 50, 100, 200)
# Settings the text does not give, chosen here: a constant alpha_t = 1 - beta_t = 0.97 (the chain is
# close to N(0, 1) by t = 200), and p_0 = 0.3 N(-2, 0.3^2) + 0.7 N(2, 0.5^2).
ALPHA_PER_STEP = 0.97
MIXTURE = dict(weights=(0.3, 0.7), means=(-2.0, 2.0), stds=(0.3, 0.5))


def forward_chain(process: DDPM, key: jax.Array, x0: jax.Array, num_traced: int):
    """Iterate q(x_i | x_{i-1}) = N(sqrt(1 - beta_i) x_{i-1}, beta_i) for i = 1..N in one lax.scan
    (Ho et al. 2020, eq. 2; the kernel is ``process.transition`` between consecutive chain times).

    Returns the states at every step, (N, num), and the first ``num_traced`` paths, (N, num_traced).
    """
    times = jnp.concatenate([jnp.zeros(1), jnp.asarray(process.chain_times)])

    def step(x, inputs):
        s, t, step_key = inputs
        scale, std = process.transition(s, t)
        x = scale * x + std * jax.random.normal(step_key, x.shape, x.dtype)
        return x, x

    keys = jax.random.split(key, process.num_steps)
    _, states = jax.lax.scan(step, x0, (times[:-1], times[1:], keys))
    return states, states[:, :num_traced]


@register(
    "forward_process",
    "DDPM forward chain on a 1-D mixture: histograms at t = 1..200 over the exact marginal, "
    "trajectories, one-shot q(x_t | x_0) against the chain (Chan Figs 11-12, 14)",
)
def forward_process(context: FigureContext) -> dict:
    """Histograms of x_t under the DDPM chain against the exact marginal p_t (Chan 2024, Figs. 11-12),
    a few trajectories, and one-shot sampling from q(x_t | x_0) against iterating the chain (Fig. 14).

    Settings: alpha_t = 0.97 for every step (beta = 0.03, T = 200), p_0 = 0.3 N(-2, 0.3^2) +
    0.7 N(2, 0.5^2); 100,000 samples (quick: 4,000). Checks: KS of the chain's samples and of the
    one-shot samples against the exact CDF of p_t = sum_k w_k N(alpha_bar^1/2 mu_k, alpha_bar s_k^2 +
    1 - alpha_bar) at every snapshot step, the two-sample KS between them, and the variance
    recursion v_t = alpha_t v_{t-1} + beta_t against 1 - alpha_bar_t (Ho et al. 2020, eq. 4).
    """
    num = context.size(100_000, 4_000)
    beta = 1.0 - ALPHA_PER_STEP
    process = DDPM(num_steps=200, schedule="linear", beta_start=beta, beta_end=beta)
    mixture = common.mixture_1d(**MIXTURE)
    x0 = mixture.sample(context.key(0), num)[:, 0]
    chain_states, traced = jax.jit(forward_chain, static_argnums=(0, 3))(
        process, context.key(1), x0, 8
    )
    chain_states, traced = np.asarray(chain_states), np.asarray(traced)

    num_tests = 3 * len(SNAPSHOT_STEPS)
    checks, histograms = [], {}
    one_shot_key = context.key(2)
    for step in SNAPSHOT_STEPS:
        t = float(process.chain_times[step - 1])
        cdf = common.mixture_cdf(mixture, process, t)
        chain = chain_states[step - 1]
        one_shot_key, key = jax.random.split(one_shot_key)
        one_shot = np.asarray(process.sample_marginal(key, x0, jnp.full((num,), t))[0])
        checks.append(common.ks_check(f"chain x_{step} vs exact p_t", chain, cdf, num_tests))
        checks.append(common.ks_check(f"one-shot x_{step} vs exact p_t", one_shot, cdf, num_tests))
        checks.append(
            common.two_sample_ks_check(
                f"chain vs one-shot at t = {step}", chain, one_shot, num_tests
            )
        )
        histograms[step] = (t, chain, one_shot)

    # Variance recursion v_i = (1 - beta_i) v_{i-1} + beta_i, v_0 = 0, against sigma(t_i)^2 = 1 - alpha_bar_i.
    variance, errors = 0.0, []
    for beta_i, t_i in zip(process.betas, process.chain_times, strict=True):
        variance = (1.0 - beta_i) * variance + beta_i
        errors.append(abs(variance - float(process.sigma(t_i)) ** 2))
    checks.append(
        check("max_t |v_t - (1 - alpha_bar_t)| (variance recursion)", max(errors), 0.0, 1e-12)
    )

    figure = new_figure(4, 3)
    grid = np.linspace(-4.5, 4.5, 400)
    for index, step in enumerate(SNAPSHOT_STEPS):
        t, chain, _ = histograms[step]
        axes = figure.add_subplot(3, 4, index + 1)
        axes.hist(chain, bins=80, range=(-4.5, 4.5), density=True, color="tab:blue", alpha=0.6)
        axes.plot(grid, common.mixture_density(mixture, process, grid, t), "k", lw=1)
        axes.set_title(f"t = {step}", fontsize=9)
        axes.set_yticks([])
    axes = figure.add_subplot(3, 4, (9, 10))
    steps = np.arange(0, process.num_steps + 1)
    paths = np.concatenate([np.asarray(x0[:8])[None], traced], axis=0)
    axes.plot(steps, paths, lw=0.7)
    axes.set_xlabel("step t")
    axes.set_ylabel("x_t")
    axes.set_title("forward trajectories", fontsize=9)
    for offset, step in enumerate((10, 50)):
        t, chain, one_shot = histograms[step]
        axes = figure.add_subplot(3, 4, 11 + offset)
        axes.hist(chain, bins=60, range=(-4.5, 4.5), density=True, alpha=0.5, label="chain")
        axes.hist(one_shot, bins=60, range=(-4.5, 4.5), density=True, alpha=0.5, label="one-shot")
        axes.plot(grid, common.mixture_density(mixture, process, grid, t), "k", lw=1)
        axes.set_title(f"q(x_t | x_0) vs chain, t = {step}", fontsize=9)
        axes.legend(fontsize=7, loc="upper left")
        axes.set_yticks([])
    figure.suptitle("DDPM forward process, alpha_t = 0.97 (Chan 2024, Figs. 11-12, 14)")
    save(figure, context, "forward_process")
    return {
        "settings": {
            "alpha_per_step": ALPHA_PER_STEP,
            "num_steps": process.num_steps,
            "mixture": MIXTURE,
            "num_samples": num,
        },
        "checks": checks,
        "data": {
            "snapshot_steps": SNAPSHOT_STEPS,
            "chain_mean": [float(histograms[s][1].mean()) for s in SNAPSHOT_STEPS],
            "chain_var": [float(histograms[s][1].var()) for s in SNAPSHOT_STEPS],
            "exact_alpha": [float(process.alpha(histograms[s][0])) for s in SNAPSHOT_STEPS],
            "exact_sigma": [float(process.sigma(histograms[s][0])) for s in SNAPSHOT_STEPS],
        },
    }
