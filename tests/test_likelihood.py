"""Probability-flow ODE likelihoods against exact densities, Hutchinson against exact traces, NFE
against counted network calls, bits/dim against hand-computed offsets.

Truths: the oracle's exact log p_t of Gaussian-mixture data (docs/references.md
#gaussian-mixture-data), scipy's Gaussian
log-density with the closed-form moments and the affine PF-ODE map of Gaussian data
(docs/references.md #gaussian-data), enumeration of all Rademacher probes, and the bits/dim offsets
(#bits-per-dimension-of-8-bit-data). Every ODE solve is in float64.
"""

import functools
import math
from itertools import product

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion import likelihood as L
from diffusion import oracle as O
from diffusion import processes as P
from diffusion.parameterization import Denoiser

TIGHT = {"rtol": 1e-6, "atol": 1e-6}
ACCURACY_PER_DIM = 1e-3  # nats per dimension
# gaussian_2d written out (its definition in diffusion/oracle.py), for closed forms built here.
GAUSS_MEAN = np.array([0.5, -0.25])
GAUSS_COV = np.array([[1.0, 0.8], [0.8, 1.0]]) * np.outer([1.0, 0.5], [1.0, 0.5])


def exact_prior(oracle, process):
    """The exact log p_T of the oracle's data, so that only the integration error remains."""
    return lambda x_T: oracle.log_prob(process, x_T, process.T)


def gaussian_log_prob_closed_form(process, x, t, mean=GAUSS_MEAN, cov=GAUSS_COV):
    """log N(x; alpha_t mean, alpha_t^2 cov + sigma_t^2 I) by scipy (docs/references.md #gaussian-data)."""
    alpha, sigma = float(process.alpha(t)), float(process.sigma(t))
    marginal = stats.multivariate_normal(
        alpha * mean, alpha**2 * cov + sigma**2 * np.eye(len(mean))
    )
    return marginal.logpdf(np.asarray(x))


def pf_ode_velocity(process, oracle, t):
    """x -> f x - g^2/2 score of the oracle at time t (Song et al. 2021, eq. 13)."""

    def velocity(x):
        linear_drift, diffusion = process.sde(x, t)
        return linear_drift - 0.5 * diffusion**2 * oracle.score(process, x, t)

    return velocity


def counted_denoiser(process, oracle, counter):
    """The oracle's exact denoiser, with every network call recorded in ``counter`` at run time."""
    inner = oracle.denoiser(process)

    def apply_fn(params, x, t):
        jax.debug.callback(lambda: counter.append(1))
        return inner.apply_fn(params, x, t)

    return Denoiser(params=oracle, apply_fn=apply_fn, process=process)


# ================================================================================ exact oracles
@pytest.mark.slow
@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize(("preset", "num_points"), [("ring8_2d", 6), ("gmm_64d", 3)])
def test_ode_log_density_equals_the_oracles_exact_log_density(preset, num_points, name, x64):
    process = P.make_process(name)
    oracle = O.preset(preset)
    t0 = process.t_min
    x = oracle.sample_marginal(jax.random.PRNGKey(0), process, num_points, t0)
    calls = []
    result = L.ode_log_likelihood(
        counted_denoiser(process, oracle, calls),
        x,
        prior_logp=exact_prior(oracle, process),
        **TIGHT,
    )
    error_per_dim = np.abs(result.log_prob - oracle.log_prob(process, x, t0)) / oracle.dim
    assert error_per_dim.max() < ACCURACY_PER_DIM
    jax.effects_barrier()
    assert int(result.nfe) == len(calls)  # the reported NFE is the number of network calls


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "cosine", "ddpm", "edm", "flow"])
def test_gaussian_data_matches_the_closed_form_for_every_process(name, x64):
    """log p_t0 and the ODE's endpoint x_T against the closed forms of Gaussian data.

    DDPM's continuous view has a piecewise-linear log alpha(t): its drift jumps at each of the 1000
    step times, so it is integrated in the log-SNR variable, where the drift is smooth.
    """
    process = P.make_process(name)
    oracle = O.preset("gaussian_2d")
    t0 = process.t_min
    x = oracle.sample_marginal(jax.random.PRNGKey(1), process, 64, t0)
    closed_form_prior = lambda x_T: gaussian_log_prob_closed_form(process, x_T, process.T)  # noqa: E731
    time_variable = "log_snr" if name == "ddpm" else "t"
    result = L.ode_log_likelihood(
        oracle.denoiser(process),
        x,
        prior_logp=closed_form_prior,
        time_variable=time_variable,
        **TIGHT,
    )
    error = np.abs(result.log_prob - gaussian_log_prob_closed_form(process, x, t0))
    assert error.max() / 2 < ACCURACY_PER_DIM
    # The flow is affine for Gaussian data: x_T = alpha_T mu + gain (x - alpha_t0 mu).
    np.testing.assert_allclose(
        result.latent, oracle.ode_flow(process, x, t0, process.T), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(("name", "max_mismatch_per_dim"), [("vp", 5e-3), ("ve", 2e-2)])
def test_standard_prior_mismatch_is_the_prior_kl_and_tiny(name, max_mismatch_per_dim, x64):
    """With the process's prior instead of the exact p_T, log p_t0 is off by log prior(x_T) - log
    p_T(x_T), whose mean over data is -KL(p_T || prior) (the ODE maps p_t0 onto p_T exactly).

    For VP alpha_T = exp(-5.025) = 0.0066, so p_T = N(0.0066 mu, ~I): KL ~ 1e-5 nats and no
    example is off by more than a few 1e-3 nats per dimension. VE: p_T = N(mu, C + 50^2 I) vs
    N(0, 50^2 I): KL ~ 1e-4, but x_T ~ 50 makes the per-example mismatch mu.x_T / 50^2 ~ 1e-2.
    """
    process = P.make_process(name)
    oracle = O.preset("gaussian_2d")
    t0 = process.t_min
    x = oracle.sample_marginal(jax.random.PRNGKey(1), process, 64, t0)  # as in the test above
    result = L.ode_log_likelihood(oracle.denoiser(process), x, **TIGHT)
    np.testing.assert_allclose(result.prior_log_prob, process.prior_logp(result.latent))
    mismatch = np.asarray(result.log_prob) - gaussian_log_prob_closed_form(process, x, t0)
    # KL(N(m, S) || N(0, s^2 I)) in closed form (docs/references.md #gaussian-kl-divergences).
    alpha_T, sigma_T, prior_var = (
        float(process.alpha(process.T)),
        float(process.sigma(process.T)),
        process.prior_std**2,
    )
    mean_T, cov_T = alpha_T * GAUSS_MEAN, alpha_T**2 * GAUSS_COV + sigma_T**2 * np.eye(2)
    kl = 0.5 * (
        np.trace(cov_T) / prior_var
        + mean_T @ mean_T / prior_var
        - 2
        + 2 * math.log(prior_var)
        - np.linalg.slogdet(cov_T)[1]
    )
    assert 0 < kl < 1e-4
    standard_error = mismatch.std(ddof=1) / math.sqrt(len(mismatch))
    assert abs(mismatch.mean() + kl) < 4 * standard_error + 2 * 1e-4
    assert np.abs(mismatch).max() / 2 < max_mismatch_per_dim


# ================================================================================ Hutchinson
def random_matrix_field(dim=5, seed=0):
    matrix = np.random.default_rng(seed).normal(size=(dim, dim))
    return matrix, lambda x: x @ jnp.asarray(matrix).T


def test_exact_divergence_of_a_linear_map_is_its_trace(x64):
    matrix, field = random_matrix_field()
    value, divergence = L.exact_divergence(field, jnp.ones((3, 5)))
    np.testing.assert_allclose(divergence, np.full(3, np.trace(matrix)), rtol=1e-13)
    np.testing.assert_allclose(value, np.ones((3, 5)) @ matrix.T, rtol=1e-13)


def test_rademacher_estimates_are_exactly_unbiased_on_a_random_matrix(x64):
    """Per probe the estimate is p^T A p; averaged over all 2^5 sign vectors it is tr(A) exactly."""
    matrix, field = random_matrix_field()
    signs = np.array(list(product([-1.0, 1.0], repeat=5)))  # every Rademacher probe
    per_probe = jax.vmap(
        lambda p: L.hutchinson_divergence(field, jnp.ones((1, 5)), p[None, None])[1]
    )
    estimates = np.asarray(per_probe(jnp.asarray(signs)))[:, 0]
    np.testing.assert_allclose(
        estimates, np.einsum("pi,ij,pj->p", signs, matrix, signs), rtol=1e-12
    )
    assert estimates.mean() == pytest.approx(np.trace(matrix), rel=1e-12)
    assert estimates.std() > 1.0  # single probes really are noisy
    averaged = L.hutchinson_divergence(field, jnp.ones((1, 5)), jnp.asarray(signs)[:, None])[1]
    assert float(averaged[0]) == pytest.approx(np.trace(matrix), rel=1e-12)


def per_probe_estimates(field, x, probes):
    """Single-probe Hutchinson estimates, one per leading entry of probes (num_probes, *x.shape)."""
    return jax.vmap(lambda probe: L.hutchinson_divergence(field, x, probe[None])[1])(probes)


def test_gaussian_probe_estimates_are_unbiased_with_the_known_variance(x64):
    """For p ~ N(0, I), p^T A p has cumulants kappa_r = 2^(r-1) (r-1)! tr(S^r), S = (A + A^T)/2:
    mean tr(A) and variance 2 tr(S^2) (Hutchinson 1989), both met within 4 standard errors."""
    matrix, field = random_matrix_field()
    num_probes = 20000
    probes = L.sample_probes(jax.random.PRNGKey(3), (num_probes, 1, 5), "gaussian")
    estimates = np.asarray(per_probe_estimates(field, jnp.ones((1, 5)), probes))[:, 0]
    standard_error = estimates.std(ddof=1) / math.sqrt(num_probes)
    assert abs(estimates.mean() - np.trace(matrix)) < 4 * standard_error
    symmetric = 0.5 * (matrix + matrix.T)
    kappa2 = 2 * np.trace(symmetric @ symmetric)
    kappa4 = 48 * np.trace(np.linalg.matrix_power(symmetric, 4))
    variance_standard_error = math.sqrt((kappa4 + 2 * kappa2**2) / num_probes)
    assert abs(estimates.var(ddof=1) - kappa2) < 4 * variance_standard_error


@pytest.mark.slow
def test_hutchinson_agrees_with_the_exact_divergence_of_the_oracle_flow(x64):
    """On the 64-D mixture's PF-ODE velocity: exact divergence = trace of the autodiff Jacobian, and
    the mean of 2000 single-probe estimates is within 4 standard errors of it, for both probes."""
    process = P.make_process("vp")
    oracle = O.preset("gmm_64d")
    t = 0.3
    x = oracle.sample_marginal(jax.random.PRNGKey(4), process, 2, t)
    velocity = pf_ode_velocity(process, oracle, t)
    num_probes = 2000

    @jax.jit
    def divergences(x, key):
        jacobians = jax.vmap(jax.jacfwd(lambda xi: velocity(xi[None])[0]))(x)
        estimates = {
            probe: per_probe_estimates(
                velocity, x, L.sample_probes(key, (num_probes, *x.shape), probe)
            )
            for probe in L.PROBES
        }
        return L.exact_divergence(velocity, x)[1], jnp.trace(jacobians, axis1=1, axis2=2), estimates

    exact, jacobian_trace, estimates = divergences(x, jax.random.PRNGKey(5))
    np.testing.assert_allclose(exact, jacobian_trace, rtol=1e-10)
    for forms in estimates.values():
        standard_error = forms.std(axis=0, ddof=1) / math.sqrt(num_probes)
        assert np.all(np.abs(forms.mean(axis=0) - exact) < 4 * standard_error)
        assert np.all(standard_error > 1e-3)  # a real estimate, not the exact value in disguise


@pytest.mark.slow
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_log_likelihood_is_unbiased(probe, x64):
    """32 copies of each point get independent probes, fixed along their trajectory: their mean is
    within 4 standard errors (plus the ODE tolerance) of the exact log p_t0 of the 64-D mixture."""
    process = P.make_process("vp")
    oracle = O.preset("gmm_64d")
    t0 = process.t_min
    points = oracle.sample_marginal(jax.random.PRNGKey(6), process, 2, t0)
    copies = 32
    x = jnp.repeat(points, copies, axis=0)
    result = L.ode_log_likelihood(
        oracle.denoiser(process),
        x,
        jax.random.PRNGKey(7),
        divergence="hutchinson",
        probe=probe,
        prior_logp=exact_prior(oracle, process),
    )
    estimates = np.asarray(result.log_prob).reshape(2, copies)
    standard_error = estimates.std(axis=1, ddof=1) / math.sqrt(copies)
    exact = np.asarray(oracle.log_prob(process, points, t0))
    assert np.all(np.abs(estimates.mean(axis=1) - exact) < 4 * standard_error + 64 * 1e-4)
    assert np.all(standard_error > 1e-3)


# ================================================================================ NFE
@pytest.mark.slow
def test_reported_nfe_equals_counted_network_calls_under_jit(x64):
    """The NFE from the solver's step count equals the calls the network actually received, for the
    whole computation under jax.jit (rejected steps included), with the non-default options (Tsit5,
    Hutchinson, log-SNR variable, t0 > t_min) and the default prior, on VP (one step rejected).

    The default options (Dopri5, exact divergence, t) are counted in the oracle test above.
    """
    process = P.make_process("vp")
    oracle = O.preset("ring8_2d")
    t0 = 0.05
    calls = []
    x = oracle.sample_marginal(jax.random.PRNGKey(8), process, 4, t0)
    options = {"solver": "tsit5", "divergence": "hutchinson", "time_variable": "log_snr"}
    solve = jax.jit(functools.partial(L.ode_log_likelihood, t0=t0, **options))
    result = solve(counted_denoiser(process, oracle, calls), x, jax.random.PRNGKey(9))
    jax.effects_barrier()
    assert int(result.nfe) == len(calls)
    assert len(calls) > 50  # an adaptive solve, not a handful of steps


# ================================================================================ bits per dim
@pytest.mark.parametrize(("data_range", "offset"), [((-1.0, 1.0), 7.0), ((0.0, 1.0), 8.0)])
def test_bits_per_dim_offset_by_hand(data_range, offset):
    """-log p / (D ln 2) + 8 - log2(hi - lo): a density of 2^-3 per dimension is 3 bits/dim + offset."""
    for dim in (1, 3072):
        log_prob = jnp.array([-3.0 * dim * math.log(2.0), 0.0])
        bits = L.bits_per_dim_from_log_prob(log_prob, dim, data_range)
        np.testing.assert_allclose(bits, [3.0 + offset, offset], rtol=1e-6)


def scaled_gaussian_oracle(data_range):
    """N(0.5, 0.2^2 I) on [0, 1]-scaled pixels, pushed forward to data_range (x -> lo + (hi - lo) x)."""
    lo, hi = data_range
    width = hi - lo
    mean, std = lo + width * 0.5, width * 0.2
    return O.gaussian(np.full(3, mean), np.full(3, std**2)), mean, std


def test_image_bits_per_dim_closed_form_and_independent_of_the_data_range(x64):
    """The same dequantised pixels under the same pixel-space model give the same bits/dim whether
    the model works on [-1, 1] or [0, 1] data: the +7 / +8 offsets compensate the factor-2 density.

    Each is also checked against the closed form -log N(x; alpha m, alpha^2 s^2 + sigma^2) / (D ln 2)
    + offset at t0 (VP, exact divergence and exact prior).
    """
    process = P.make_process("vp")
    pixels = jnp.asarray(np.random.default_rng(2).integers(60, 196, size=(5, 3)), jnp.uint8)
    unit = (np.asarray(pixels) + np.random.default_rng(3).uniform(size=(5, 3))) / 256
    bits = {}
    for data_range, offset in [((-1.0, 1.0), 7.0), ((0.0, 1.0), 8.0)]:
        oracle, mean, std = scaled_gaussian_oracle(data_range)
        data = jnp.asarray(data_range[0] + (data_range[1] - data_range[0]) * unit)
        bits[data_range], _ = L.image_bits_per_dim(
            oracle.denoiser(process),
            data,
            jax.random.PRNGKey(0),
            data_range=data_range,
            prior_logp=exact_prior(oracle, process),
            **TIGHT,
        )
        alpha, sigma = float(process.alpha(process.t_min)), float(process.sigma(process.t_min))
        log_prob = stats.norm(alpha * mean, math.sqrt(alpha**2 * std**2 + sigma**2)).logpdf(data)
        by_hand = -log_prob.sum(axis=1) / (3 * math.log(2)) + offset
        np.testing.assert_allclose(bits[data_range], by_hand, atol=1e-4)
    np.testing.assert_allclose(bits[(-1.0, 1.0)], bits[(0.0, 1.0)], atol=1e-4)
    # A Gaussian of std 0.2 * 256 = 51 levels: log2(sqrt(2 pi e) 51) = 7.7 bits/dim at most.
    assert np.all((bits[(0.0, 1.0)] > 5.0) & (bits[(0.0, 1.0)] < 8.0))


def test_uint8_images_are_dequantised_with_the_first_half_of_the_key(x64):
    process = P.make_process("vp")
    oracle, _, _ = scaled_gaussian_oracle((-1.0, 1.0))
    pixels = jnp.asarray(np.random.default_rng(2).integers(60, 196, size=(5, 3)), jnp.uint8)
    key = jax.random.PRNGKey(11)
    options = {"prior_logp": exact_prior(oracle, process), **TIGHT}
    from_pixels, _ = L.image_bits_per_dim(oracle.denoiser(process), pixels, key, **options)
    data = L.dequantize(jax.random.split(key)[0], pixels)
    from_data, _ = L.image_bits_per_dim(oracle.denoiser(process), data, key, **options)
    np.testing.assert_allclose(from_pixels, from_data, rtol=1e-12)


@pytest.mark.parametrize("data_range", [(-1.0, 1.0), (0.0, 1.0)])
def test_dequantised_pixels_fill_their_bins_uniformly(data_range, x64):
    """lo + (hi - lo)(x + u)/256 with u ~ U[0, 1): inside pixel x's bin, uniform within it."""
    lo, hi = data_range
    pixels = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(200, 50)), jnp.uint8)
    data = np.asarray(L.dequantize(jax.random.PRNGKey(0), pixels, data_range))
    noise = (data - lo) / (hi - lo) * 256 - np.asarray(pixels)
    assert noise.min() >= -1e-9 and noise.max() < 1.0
    assert stats.kstest(noise.ravel(), "uniform").pvalue > 1e-3


# ================================================================================ bad options
def vp_denoiser():
    return O.preset("gaussian_2d").denoiser(P.make_process("vp"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"divergence": "trace"}, "unknown divergence 'trace'"),
        ({"divergence": "hutchinson", "probe": "uniform"}, "unknown probe 'uniform'"),
        ({"solver": "rk4"}, "unknown solver 'rk4'"),
        ({"time_variable": "lambda"}, "unknown time_variable 'lambda'"),
        ({"rtol": 0.0}, "rtol must be"),
        ({"rtol": -1e-5}, "rtol must be"),
        ({"atol": -1e-5}, "atol must be"),
        ({"t0": 1.0}, r"t0=1.0 must be a number in \[t_min, T\)"),
        ({"t0": 5e-6}, r"t0=5e-06 must be a number in \[t_min, T\)"),
        ({"num_probes": 0}, "num_probes must be"),
        ({"max_steps": 0}, "max_steps must be"),
    ],
)
def test_bad_options_raise_value_error(options, message):
    with pytest.raises(ValueError, match=message):
        L.ode_log_likelihood(vp_denoiser(), jnp.zeros((2, 2)), jax.random.PRNGKey(0), **options)


def test_missing_key_and_unbatched_data_raise_value_error():
    with pytest.raises(ValueError, match="needs a PRNG key"):
        L.ode_log_likelihood(vp_denoiser(), jnp.zeros((2, 2)), divergence="hutchinson")
    with pytest.raises(ValueError, match="must be a batch"):
        L.ode_log_likelihood(vp_denoiser(), jnp.zeros(2))
    with pytest.raises(ValueError, match="unknown probe"):
        L.sample_probes(jax.random.PRNGKey(0), (2,), "sphere")


def test_bad_data_range_and_pixels_raise_value_error():
    pixels = jnp.zeros((2, 2), jnp.uint8)
    with pytest.raises(ValueError, match="data_range"):
        L.image_bits_per_dim(vp_denoiser(), pixels, jax.random.PRNGKey(0), data_range=(0, 255))
    with pytest.raises(ValueError, match="data_range"):
        L.bits_per_dim_from_log_prob(jnp.zeros(2), 2, data_range=(-0.5, 0.5))
    with pytest.raises(ValueError, match="dim must be"):
        L.bits_per_dim_from_log_prob(jnp.zeros(2), 0)
    with pytest.raises(ValueError, match="integer"):
        L.dequantize(jax.random.PRNGKey(0), jnp.zeros((2, 2)))
