"""The exact oracle against autodiff, quadrature, scipy densities, a numerical ODE solve and sampling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from diffusion import oracle as O
from diffusion import processes as P

PROCESSES = ["vp", "subvp", "ve", "cosine", "ddpm", "edm"]


def mid_time(process, fraction):
    return process.t_min + fraction * (process.T - process.t_min)


@pytest.mark.parametrize("preset", ["ring8_2d", "gaussian_2d", "gmm_64d"])
@pytest.mark.parametrize("name", PROCESSES)
def test_score_is_the_gradient_of_log_prob_and_tweedie_holds(preset, name, x64):
    process = P.make_process(name)
    oracle = O.preset(preset)
    t = jnp.array([mid_time(process, f) for f in (0.02, 0.2, 0.6, 0.95)])
    x = oracle.sample_marginal(jax.random.PRNGKey(0), process, 4, t)
    grad = jax.vmap(jax.grad(lambda xi, ti: oracle.log_prob(process, xi[None], ti[None])[0]))(x, t)
    score = oracle.score(process, x, t)
    np.testing.assert_allclose(score, grad, rtol=1e-8, atol=1e-10)
    # Tweedie: E[x0 | x_t] = (x_t + sigma^2 score) / alpha (REFERENCE I-17), against the direct sum.
    alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
    np.testing.assert_allclose(
        oracle.x0(process, x, t), (x + sigma**2 * score) / alpha, rtol=1e-7, atol=1e-9
    )
    np.testing.assert_allclose(oracle.eps(process, x, t), -sigma * score, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_posterior_mean_equals_direct_integration_in_1d(name, x64):
    """E[x0 | x_t] = int x0 p(x0) q(x_t | x0) dx0 / int p(x0) q(x_t | x0) dx0 for a 1-D mixture."""
    weights, means, stds = np.array([0.3, 0.7]), np.array([-1.0, 0.8]), np.array([0.2, 0.5])
    oracle = O.gaussian_mixture(weights, means[:, None], [np.array([s**2]) for s in stds])
    process = P.make_process(name)
    grid = np.linspace(-6, 6, 400001)
    prior = sum(
        w * stats.norm.pdf(grid, m, s) for w, m, s in zip(weights, means, stds, strict=True)
    )
    for fraction, xt in [(0.05, 0.3), (0.3, -1.1), (0.7, 2.0)]:
        t = mid_time(process, fraction)
        alpha, sigma = float(process.alpha(t)), float(process.sigma(t))
        likelihood = stats.norm.pdf(xt, alpha * grid, sigma)
        direct = np.trapezoid(grid * prior * likelihood, grid) / np.trapezoid(
            prior * likelihood, grid
        )
        got = float(oracle.x0(process, jnp.array([[xt]]), t)[0, 0])
        assert got == pytest.approx(direct, rel=1e-7, abs=1e-9)
        density = np.trapezoid(prior * likelihood, grid)  # p_t(x_t) by integration too
        log_p = float(oracle.log_prob(process, jnp.array([[xt]]), t)[0])
        assert log_p == pytest.approx(math.log(density), abs=1e-7)


def test_gaussian_log_prob_matches_scipy(x64):
    oracle = O.preset("gaussian_2d")
    process = P.SubVPSDE()
    t = 0.37
    alpha, sigma = float(process.alpha(t)), float(process.sigma(t))
    mean = np.array([0.5, -0.25])
    cov = np.array([[1.0, 0.4], [0.4, 0.25]])
    x = np.array([[0.1, 0.2], [-1.0, 3.0]])
    expected = stats.multivariate_normal(
        alpha * mean, alpha**2 * cov + sigma**2 * np.eye(2)
    ).logpdf(x)
    np.testing.assert_allclose(oracle.log_prob(process, jnp.asarray(x), t), expected, rtol=1e-12)


def test_samples_have_the_mixture_moments(x64):
    oracle = O.preset("ring8_2d")
    n = 100000
    x = np.asarray(oracle.sample(jax.random.PRNGKey(1), n))
    radius = np.linalg.norm(x, axis=1)
    assert abs(radius.mean() - 2.0) < 0.01
    angles = np.arctan2(x[:, 1], x[:, 0])
    nearest = np.round(angles / (2 * np.pi / 8)) * (2 * np.pi / 8)
    residual = x - 2.0 * np.stack([np.cos(nearest), np.sin(nearest)], axis=1)
    np.testing.assert_allclose(residual.std(axis=0), 0.05, rtol=0.02)
    counts = np.bincount(np.round(angles / (2 * np.pi / 8)).astype(int) % 8, minlength=8)
    assert stats.chisquare(counts).pvalue > 1e-3
    # noised samples: covariance alpha^2 Cov(x0) + sigma^2 I
    process = P.VPSDE()
    xt = np.asarray(oracle.sample_marginal(jax.random.PRNGKey(2), process, n, 0.4))
    expected = float(process.alpha(0.4)) ** 2 * np.cov(x.T) + float(
        process.sigma(0.4)
    ) ** 2 * np.eye(2)
    np.testing.assert_allclose(np.cov(xt.T), expected, atol=0.03)


def test_gmm_64d_preset_is_fixed():
    a, b = O.PRESETS["gmm_64d"](), O.PRESETS["gmm_64d"]()
    np.testing.assert_array_equal(a.means, b.means)
    assert a.means.shape == (16, 64) and a.eigvecs.shape == (16, 64, 64)
    assert abs(float(a.weights.sum()) - 1) < 1e-6


@pytest.mark.parametrize("name", PROCESSES)
def test_gaussian_ode_flow_matches_a_numerical_solve(name, x64):
    """The affine exact flow against scipy's RK45 on dx/dt = f x - g^2/2 score (Song et al. eq. 13)."""
    oracle = O.preset("gaussian_2d")
    # DDPM's continuous view has kinks at its knots: use few steps and integrate knot to knot.
    process = P.DDPM(num_steps=20) if name == "ddpm" else P.make_process(name)
    t_start, t_stop = mid_time(process, 0.9), mid_time(process, 0.05)
    x_start = np.array([[0.3, -1.2], [2.0, 0.5]])

    @jax.jit
    def velocity(x, t):
        drift, diffusion = process.sde(x, t)
        return drift - 0.5 * diffusion**2 * oracle.score(process, x, t)

    def rhs(t, y):
        return np.asarray(velocity(jnp.asarray(y.reshape(2, 2)), t)).ravel()

    knots = getattr(process, "chain_times", np.array([]))
    inner = np.sort(knots[(knots > t_stop) & (knots < t_start)])[::-1]
    y = x_start.ravel()
    for t_from, t_to in zip(np.r_[t_start, inner], np.r_[inner, t_stop], strict=True):
        y = integrate.solve_ivp(rhs, (t_from, t_to), y, rtol=1e-10, atol=1e-10).y[:, -1]
    solution = y.reshape(2, 2)
    exact = oracle.ode_flow(process, jnp.asarray(x_start), t_start, t_stop)
    np.testing.assert_allclose(exact, solution, rtol=1e-6, atol=1e-7)
    # the flow composes and inverts
    t_mid = mid_time(process, 0.4)
    via_mid = oracle.ode_flow(
        process, oracle.ode_flow(process, x_start, t_start, t_mid), t_mid, t_stop
    )
    np.testing.assert_allclose(via_mid, exact, rtol=1e-10)
    np.testing.assert_allclose(
        oracle.ode_flow(process, exact, t_stop, t_start), x_start, rtol=1e-10
    )


def test_ode_flow_pushes_the_prior_marginal_to_the_data(x64):
    """Flowing exact samples of p_T back to t ~ 0 gives N(mu, Sigma) (REFERENCE I-15)."""
    oracle = O.preset("gaussian_2d")
    process = P.VPSDE()
    xT = oracle.sample_marginal(jax.random.PRNGKey(3), process, 100000, process.T)
    x0 = np.asarray(oracle.ode_flow(process, xT, process.T, process.t_min))
    np.testing.assert_allclose(x0.mean(axis=0), [0.5, -0.25], atol=0.01)
    np.testing.assert_allclose(np.cov(x0.T), [[1.0, 0.4], [0.4, 0.25]], atol=0.015)


def test_oracle_denoiser_is_exact_and_jits_once(x64):
    oracle = O.preset("ring8_2d")
    process = P.VESDE()
    x = oracle.sample_marginal(jax.random.PRNGKey(4), process, 8, 0.3)
    denoiser = oracle.denoiser(process)
    np.testing.assert_allclose(denoiser.eps(x, 0.3), oracle.eps(process, x, 0.3), rtol=1e-12)
    np.testing.assert_allclose(denoiser.score(x, 0.3), oracle.score(process, x, 0.3), rtol=1e-9)
    traces = []

    @jax.jit
    def run(d, x, t):
        traces.append(1)
        return d.x0(x, t)

    run(oracle.denoiser(process), x, 0.3)
    run(oracle.denoiser(process), x, 0.5)
    assert len(traces) == 1


def test_bad_oracle_arguments():
    with pytest.raises(ValueError, match="components"):
        O.preset("ring8_2d").ode_flow(P.VPSDE(), jnp.zeros((1, 2)), 0.5, 0.1)
    with pytest.raises(ValueError, match="'ring9'"):
        O.preset("ring9")
    with pytest.raises(ValueError, match="positive definite"):
        O.gaussian(np.zeros(2), np.array([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="symmetric"):
        O.gaussian(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="weights"):
        O.gaussian_mixture([1.0, -1.0], np.zeros((2, 2)), [np.ones(2), np.ones(2)])
