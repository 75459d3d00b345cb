"""Stochastic samplers reproduce the data law of an exact denoiser: a sliced Wasserstein-2 distance to
fresh data at the two-sample noise floor, and the exact Gaussian moments of the ancestral chain."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import metrics as M
from diffusion import oracle as O
from diffusion import processes as P
from diffusion.samplers import sample

NUM_POINTS = 4096
NUM_SEEDS = 2  # independent sampler runs (and fresh data sets) averaged per statistic
FLOOR_REPEATS = 8


def ring8_in(dim):
    """ring8_2d (8 modes of std 0.05 on a circle of radius 2) embedded in R^dim (std 0.05 elsewhere)."""
    if dim == 2:
        return O.preset("ring8_2d")
    angles = 2 * np.pi * np.arange(8) / 8
    means = np.zeros((8, dim))
    means[:, 0], means[:, 1] = 2 * np.cos(angles), 2 * np.sin(angles)
    return O.gaussian_mixture(np.ones(8), means, [np.full(dim, 0.05**2)] * 8)


@functools.cache
def oracle_and_floor(dim):
    """The oracle and the mean sliced W2 between independent pairs of its samples (same size)."""
    oracle = ring8_in(dim)

    def draw(seed, num):
        return np.asarray(oracle.sample(jax.random.PRNGKey(seed), num))

    floor = M.sliced_wasserstein_noise_floor(draw, NUM_POINTS, num_repeats=FLOOR_REPEATS, seed=0)
    return oracle, floor


# The Langevin corrector's step 2 alpha (snr ||z|| / ||score||)^2 is per example; in 2-D
# ||z||^2 / ||score||^2 is F(2, 2)-distributed (no mean) and rare huge steps throw samples far out,
# so its pairs run on the ring embedded in 8-D, where the norms concentrate as they do for images.
CASES = [
    # (data dim, process, sampler, options, grid, num_steps)
    (2, "vp", "ancestral", {}, "uniform_t", 100),
    (2, "cosine", "ancestral", {"variance": "beta"}, "uniform_t", 100),
    (2, "subvp", "euler_maruyama", {}, "uniform_t", 100),
    (2, "ve", "reverse_diffusion", {}, "uniform_t", 100),
    (2, "ve", "pc", {"predictor": "reverse_diffusion", "corrector": "annealed_langevin"}, "uniform_t", 100),
    (2, "vp", "pc", {"predictor": "ancestral", "corrector": "annealed_langevin"}, "uniform_t", 100),
    (2, "ddpm", "pc", {"predictor": "euler_maruyama", "corrector": "none"}, "leading", 99),
    (2, "ve", "pc", {"predictor": "none", "corrector": "annealed_langevin", "n_corrector_steps": 2},
     "uniform_t", 100),
    (2, "ve", "annealed_langevin", {"n_steps_each": 5}, "uniform_t", 100),
    (2, "vp", "edm_stochastic", {"S_churn": 30.0, "S_tmin": 0.01, "S_tmax": 1.0}, "karras", 50),
    (8, "ve", "pc", {}, "uniform_t", 100),
    (8, "vp", "pc", {"predictor": "euler_maruyama", "corrector": "langevin"}, "uniform_t", 100),
    (8, "subvp", "pc", {"predictor": "ancestral", "corrector": "langevin"}, "uniform_t", 100),
]  # fmt: skip


@pytest.mark.parametrize(("dim", "process_name", "name", "options", "grid", "num_steps"), CASES)
def test_stochastic_sampler_reaches_the_two_sample_noise_floor(
    dim, process_name, name, options, grid, num_steps
):
    oracle, floor = oracle_and_floor(dim)
    process = P.make_process(process_name)
    denoiser = oracle.denoiser(process)
    distances = []
    for seed in range(NUM_SEEDS):
        result = sample(
            name,
            denoiser,
            jax.random.PRNGKey(100 + seed),
            (NUM_POINTS, dim),
            grid=grid,
            num_steps=num_steps,
            denoise_final=True,
            **options,
        )
        fresh = np.asarray(oracle.sample(jax.random.PRNGKey(1000 + seed), NUM_POINTS))
        distances.append(M.sliced_wasserstein_distance(result.samples, fresh, seed=seed))
    ratio = np.mean(distances) / floor
    assert ratio < 1.5, (
        f"sliced W2 = {np.mean(distances):.4f} is {ratio:.2f} x the floor {floor:.4f}"
    )


# ================================================================================ Gaussian moments
def ddpm_chain_moments(process, indices, variance, mean, covariance):
    """Exact law of Ho et al.'s ancestral chain for N(mean, covariance) data and the exact denoiser.

    Every step is affine-Gaussian in x, so N(m, S) maps to N(A m + b, A S A^T + v I), written here in
    Ho et al.'s notation (eq. 7: mu-tilde = c0 x0 + ct x_t; beta-tilde; x0 = E[x0 | x_t], docs/references.md
    #gaussian-data), from x_T ~ N(0, I) along the decreasing 0-based chain ``indices``, then x0 at the last.
    """
    alphas_bar = process.alphas_bar
    identity = np.eye(len(mean))

    def posterior_mean_gain(alpha_bar):  # x0_pred = mean + gain (x - sqrt(alpha_bar) mean)
        scale = np.sqrt(alpha_bar)
        return (
            scale * covariance @ np.linalg.inv(alpha_bar * covariance + (1 - alpha_bar) * identity)
        )

    m, s = np.zeros(len(mean)), identity
    for t_index, s_index in itertools.pairwise(indices):
        abar_t, abar_s = alphas_bar[t_index], alphas_bar[s_index]
        beta = 1 - abar_t / abar_s  # the effective beta of the (possibly strided) step
        coef_x0 = np.sqrt(abar_s) * beta / (1 - abar_t)
        coef_xt = np.sqrt(1 - beta) * (1 - abar_s) / (1 - abar_t)
        gain = posterior_mean_gain(abar_t)
        step_matrix = coef_x0 * gain + coef_xt * identity
        offset = coef_x0 * (mean - gain @ (np.sqrt(abar_t) * mean))
        step_variance = (1 - abar_s) / (1 - abar_t) * beta if variance == "beta_tilde" else beta
        m = step_matrix @ m + offset
        s = step_matrix @ s @ step_matrix.T + step_variance * identity
    gain = posterior_mean_gain(alphas_bar[indices[-1]])
    return mean + gain @ (m - np.sqrt(alphas_bar[indices[-1]]) * mean), gain @ s @ gain.T


@pytest.mark.slow
@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_ancestral_on_the_ddpm_chain_reproduces_gaussian_data(variance):
    """Sample moments match the chain's exact law, and that law tends to N(mu, Sigma) as the chain is
    refined (O(1/N): stride 4, 2, 1 of the 1000-step chain)."""
    process = P.DDPM(num_steps=1000)
    oracle = O.preset("gaussian_2d")
    mean, covariance = np.array([0.5, -0.25]), np.array([[1.0, 0.4], [0.4, 0.25]])
    num = 6000
    result = sample(
        "ancestral",
        oracle.denoiser(process),
        jax.random.PRNGKey(3),
        (num, 2),
        grid="linspace",
        num_steps=999,
        denoise_final=True,
        variance=variance,
    )
    x = np.asarray(result.samples, dtype=np.float64)
    chain_mean, chain_cov = ddpm_chain_moments(
        process, np.arange(1000)[::-1], variance, mean, covariance
    )
    std = np.sqrt(np.diag(chain_cov))
    np.testing.assert_array_less(np.abs(x.mean(0) - chain_mean), 4.5 * std / np.sqrt(num))
    # Var of a sample covariance entry: (S_ij^2 + S_ii S_jj) / n for Gaussian data.
    cov_se = np.sqrt((chain_cov**2 + np.outer(np.diag(chain_cov), np.diag(chain_cov))) / num)
    np.testing.assert_array_less(np.abs(np.cov(x.T) - chain_cov), 4.5 * cov_se)

    gaps = []
    for stride in [4, 2, 1]:
        indices = np.arange(1000)[::-1][::stride]
        chain_mean, chain_cov = ddpm_chain_moments(process, indices, variance, mean, covariance)
        gaps.append(np.abs(chain_cov - covariance).max() + np.abs(chain_mean - mean).max())
    assert gaps[0] / gaps[1] > 1.6 and gaps[1] / gaps[2] > 1.6  # ~ halves with the step size
    assert gaps[2] < 0.01


@pytest.mark.slow
def test_ddim_with_eta_one_and_ancestral_agree_in_distribution():
    """Different noise, same law: first two moments agree within sampling error (#ddim-and-dpm-solver-1)."""
    process = P.VPSDE()
    denoiser = O.preset("gaussian_2d").denoiser(process)
    num = 20000
    runs = [
        np.asarray(
            sample(
                name, denoiser, jax.random.PRNGKey(seed), (num, 2), num_steps=20, **options
            ).samples,
            dtype=np.float64,
        )
        for name, options, seed in [("ddim", {"eta": 1.0}, 4), ("ancestral", {}, 5)]
    ]
    scale = np.sqrt(np.diag(np.cov(runs[1].T)))
    np.testing.assert_array_less(
        np.abs(runs[0].mean(0) - runs[1].mean(0)), 4.5 * scale * np.sqrt(2 / num)
    )
    cov_gap = np.abs(np.cov(runs[0].T) - np.cov(runs[1].T))
    np.testing.assert_array_less(cov_gap, 4.5 * np.outer(scale, scale) * np.sqrt(2 * 2 / num))
    assert float(jnp.abs(jnp.asarray(runs[0]) - runs[1]).mean()) > 0.1  # not the same draws
