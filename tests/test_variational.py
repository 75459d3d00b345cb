"""The variational bound, reverse variances and VDM against closed forms.

Ground truth is Gaussian data N(mu, s^2), whose every reverse kernel q(x_{k-1} | x_k) is Gaussian with
a mean linear in x_k and a constant variance, found here by Gaussian conditioning of the chain's joint
marginals (never through ``Process.posterior``). Then:

* the bound of the exact model (the oracle's mean and the analytic variance with the exact
  E||eps_pred||^2) equals the sum of Gaussian KLs written out by hand, and with the exact marginal
  q(x_T) as prior that sum is exactly -log q(x_0) for every x_0 (the joint of the reverse chain is the
  forward joint; Sohl-Dickstein et al. 2015, Ho et al. 2020 eq. 5);
* every expectation over x_t is taken by Gauss-Hermite quadrature, exact here because every term is a
  quadratic in the noise (Gaussian-data KLs with means linear in x_t);
* the continuous-time bound (Kingma et al. 2021, eq. 17) is the limit of the discrete bound with the
  posterior variances, at a fitted rate of 1/K, and its diffusion term depends on the schedule only
  through its end points (their eq. 20).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import integrate, stats

from diffusion import losses as L
from diffusion import oracle as O
from diffusion import processes as P
from diffusion import variational as V
from diffusion.parameterization import Denoiser
from diffusion.samplers import ancestral as A
from diffusion.samplers import sample

MU, S = 0.3, 0.5  # the 1-D Gaussian data N(MU, S^2) of the closed-form tests
HERMITE_NODES, HERMITE_WEIGHTS = np.polynomial.hermite_e.hermegauss(6)
HERMITE_WEIGHTS = HERMITE_WEIGHTS / HERMITE_WEIGHTS.sum()  # E f(n), n ~ N(0, 1), exact to degree 11


def gaussian_data():
    return O.gaussian(np.array([MU]), np.array([S**2]))


# ================================================================================ by hand
def by_hand_bound(signal, noise, prior_std, x0):
    """The exact model's bound for data N(MU, S^2) on a chain with x_k = signal[k] x_0 + noise[k] eps.

    States k = 1..K (signal[0] = 1, noise[0] = 0 is the data). The model's kernels are the true
    reverse kernels q(x_{k-1} | x_k), from the joint Gaussian of (x_{k-1}, x_k): Cov = r var_{k-1}
    with r = signal[k]/signal[k-1]. The posterior q(x_{k-1} | x_k, x_0) by conditioning the same joint
    on x_0. Each expectation over x_k ~ N(signal[k] x_0, noise[k]^2) of (a + b x_k)^2 is
    (a + b m)^2 + b^2 v. Returns (bound with prior N(0, prior_std^2), bound with prior q(x_K)).
    """
    num_states = len(signal) - 1
    marginal_mean = signal * MU
    marginal_var = signal**2 * S**2 + noise**2
    total = 0.0
    for k in range(1, num_states + 1):
        ratio = signal[k] / signal[k - 1]
        cov = ratio * marginal_var[k - 1]
        reverse_var = marginal_var[k - 1] - cov**2 / marginal_var[k]
        gain = cov / marginal_var[k]
        mean_k, var_k = signal[k] * x0, noise[k] ** 2
        if k == 1:  # -E log N(x_0; m_0 + gain (x_1 - m_1), reverse_var)
            a, b = x0 - marginal_mean[0] + gain * marginal_mean[1], -gain
            squared = (a + b * mean_k) ** 2 + b**2 * var_k
            total += 0.5 * (math.log(2 * math.pi * reverse_var) + squared / reverse_var)
            continue
        # q(x_{k-1} | x_k, x_0): Cov = ratio noise_{k-1}^2 given x_0.
        coef_xt = ratio * noise[k - 1] ** 2 / noise[k] ** 2
        coef_x0 = signal[k - 1] - coef_xt * signal[k]
        posterior_var = noise[k - 1] ** 2 - ratio**2 * noise[k - 1] ** 4 / noise[k] ** 2
        a = coef_x0 * x0 - marginal_mean[k - 1] + gain * marginal_mean[k]
        b = coef_xt - gain
        squared = (a + b * mean_k) ** 2 + b**2 * var_k
        total += 0.5 * (
            math.log(reverse_var / posterior_var) + (posterior_var + squared) / reverse_var - 1.0
        )
    mean_T, var_T = signal[-1] * x0, noise[-1] ** 2
    prior = 0.5 * ((mean_T**2 + var_T) / prior_std**2 - 1.0 - math.log(var_T / prior_std**2))
    exact_prior = 0.5 * (
        math.log(marginal_var[-1] / var_T)
        + (var_T + (mean_T - marginal_mean[-1]) ** 2) / marginal_var[-1]
        - 1.0
    )
    return total + prior, total + exact_prior


def ddpm_chain(num_steps):
    """(signal, noise) of DDPM's states 0..N from its betas (Ho et al. 2020, eq. 4)."""
    betas = np.linspace(1e-4, 0.02, num_steps)
    alphas_bar = np.concatenate([[1.0], np.cumprod(1.0 - betas)])
    return np.sqrt(alphas_bar), np.sqrt(1.0 - alphas_bar)


def smld_chain(num_levels, sigma_min, sigma_max):
    """(signal, noise) of SMLD's chain: the data, then sigma_min ... sigma_max (geometric)."""
    sigmas = np.geomspace(sigma_min, sigma_max, num_levels)
    return np.ones(num_levels + 1), np.concatenate([[0.0], sigmas])


def exact_eps_sq_norm(signal, noise):
    """E||eps_pred||^2 / d = sigma^2 / (alpha^2 s^2 + sigma^2) for data N(MU, S^2) (eps_pred = E[eps|x_t])."""
    return noise**2 / (signal**2 * S**2 + noise**2)


def exact_model(process, signal, noise, **kwargs):
    """The oracle denoiser with the analytic variance at the exact Gamma: the true reverse kernels."""
    times = np.asarray(V.vlb_chain_times(process))
    return V.ReverseModel(
        denoiser=gaussian_data().denoiser(process),
        variance="analytic",
        eps_sq_norm=jnp.asarray(exact_eps_sq_norm(signal[1:], noise[1:])),
        eps_sq_norm_times=jnp.asarray(times),
        **kwargs,
    )


def expected_terms(model, x0_values, times, decoder="gaussian"):
    """E over the noise of every term of the bound at each x_0, by Gauss-Hermite quadrature: (n, K)."""
    num_nodes = len(HERMITE_NODES)
    x0 = jnp.asarray(np.repeat(x0_values, num_nodes))[:, None]
    eps = jnp.asarray(np.tile(HERMITE_NODES, len(x0_values)))[:, None]
    times = jnp.asarray(times)
    terms = jax.jit(jax.vmap(lambda k: V.vlb_term(model, x0, eps, k, times, decoder=decoder)))(
        jnp.arange(times.shape[0])
    )
    terms = np.asarray(terms).reshape(times.shape[0], len(x0_values), num_nodes)
    return (terms * HERMITE_WEIGHTS).sum(-1).T


# ================================================================================ decoders
@pytest.mark.parametrize(
    "mean, std", [(0.0, 0.01), (0.37, 0.2), (-0.996, 0.004), (1.7, 0.5), (-0.2, 3.0), (0.5, 1e-4)]
)
def test_discretized_decoder_sums_to_one_and_matches_integration(x64, mean, std):
    """Ho et al. 2020, eq. 13: the 256 bin masses sum to one and equal the Gaussian's integral over
    each bin (scipy.integrate.quad of the density, edge bins to infinity)."""
    values = 2.0 * np.arange(256) / 255.0 - 1.0
    log_p = np.asarray(
        V.discretized_gaussian_log_likelihood(jnp.asarray(values), mean, 2.0 * math.log(std))
    )
    assert abs(float(jax.nn.logsumexp(jnp.asarray(log_p)))) < 1e-12
    density = stats.norm(mean, std).pdf
    edges = np.concatenate([[-np.inf], values[:-1] + 1.0 / 255.0, [np.inf]])
    for k in range(256):
        lo, hi = edges[k], edges[k + 1]
        # quad needs the peak inside finite limits: split at the mean when it lies in the bin.
        pieces = [(lo, hi)] if not lo < mean < hi else [(lo, mean), (mean, hi)]
        mass = sum(integrate.quad(density, a, b, epsabs=0.0, epsrel=1e-13)[0] for a, b in pieces)
        if mass > 1e-250:
            assert log_p[k] == pytest.approx(math.log(mass), abs=1e-8, rel=1e-9), k


def test_discretized_decoder_gradients_are_finite():
    """Edge bins are computed from finite arguments, so jnp.where leaves no NaN gradient behind."""
    values = jnp.asarray([-1.0, -1.0 + 2 / 255, 0.0, 1.0 - 2 / 255, 1.0])

    def total(mean, log_var):
        return V.discretized_gaussian_log_likelihood(values, mean, log_var).sum()

    grads = jax.grad(total, argnums=(0, 1))(0.3, math.log(0.01))
    assert all(np.isfinite(g) for g in grads)


def test_normal_kl_and_gaussian_likelihood_match_integrals(x64):
    """KL by numerical integration of q log(q/p); log-density against scipy."""
    q, p = stats.norm(0.3, 0.7), stats.norm(-0.4, 1.3)
    kl_numeric = integrate.quad(lambda x: q.pdf(x) * (q.logpdf(x) - p.logpdf(x)), -20, 20)[0]
    kl = V.normal_kl(0.3, 2 * math.log(0.7), -0.4, 2 * math.log(1.3))
    assert float(kl) == pytest.approx(kl_numeric, rel=1e-10)
    x = np.linspace(-3, 3, 7)
    assert np.allclose(
        V.gaussian_log_likelihood(x, 0.3, 2 * math.log(0.7)), q.logpdf(x), rtol=1e-12
    )


def test_bits_per_dim_conventions():
    """Discrete bound: nats / (D ln 2); Gaussian decoder on dequantised [-1, 1] data: + 8 - 1 bits."""
    nats, dim = jnp.asarray([100.0]), 10
    plain = 100.0 / (10 * math.log(2.0))
    assert float(V.vlb_bits_per_dim(nats, dim, "discretized_gaussian")[0]) == pytest.approx(plain)
    assert float(V.vlb_bits_per_dim(nats, dim, "gaussian")[0]) == pytest.approx(plain)
    dequantised = V.vlb_bits_per_dim(nats, dim, "gaussian", data_range=(-1.0, 1.0))
    assert float(dequantised[0]) == pytest.approx(plain + 7.0)


# ================================================================================ the exact bound
CHAINS = {
    "ddpm10": (lambda: P.DDPM(num_steps=10), lambda: ddpm_chain(10), 1.0),
    "ddpm1000": (lambda: P.DDPM(num_steps=1000), lambda: ddpm_chain(1000), 1.0),
    "smld10": (
        lambda: P.SMLD(num_levels=10, sigma_max=5.0),
        lambda: smld_chain(10, 0.01, 5.0),
        5.0,
    ),
}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_exact_model_bound_equals_sum_of_gaussian_kls(x64, chain):
    """The bound of the exact model equals the hand-written sum of Gaussian KLs to 1e-6 relative
    (observed ~1e-12), and with the exact prior q(x_T) that sum is -log q(x_0) for every x_0."""
    make_process, make_chain, prior_std = CHAINS[chain]
    process = make_process()
    signal, noise = make_chain()
    model = exact_model(process, signal, noise)
    x0_values = np.array([-1.0, 0.1, 0.3, 1.2])
    terms = expected_terms(model, x0_values, process.chain_times)
    prior = np.asarray(V.prior_kl(process, jnp.asarray(x0_values)[:, None]))
    library = prior + terms.sum(axis=1)
    for x0, value in zip(x0_values, library, strict=True):
        bound, bound_with_exact_prior = by_hand_bound(signal, noise, prior_std, x0)
        assert value == pytest.approx(bound, rel=1e-6)
        nll = 0.5 * math.log(2 * math.pi * S**2) + (x0 - MU) ** 2 / (2 * S**2)
        assert bound_with_exact_prior == pytest.approx(nll, rel=1e-9, abs=1e-10)


@pytest.mark.slow
def test_importance_sampled_bound_is_unbiased(x64):
    """discrete_vlb with all terms and with 3 importance-sampled terms (skewed p) both average to the
    exact bound; tolerance 4.5 standard errors of the 1024 repeats (fixed seed)."""
    process = P.DDPM(num_steps=10)
    signal, noise = ddpm_chain(10)
    model = exact_model(process, signal, noise)
    x0_value = 0.8
    exact, _ = by_hand_bound(signal, noise, 1.0, x0_value)
    x0 = jnp.full((1024, 1), x0_value)
    probabilities = np.linspace(1.0, 3.0, 10)
    probabilities /= probabilities.sum()
    full, sampled = jax.jit(
        lambda x0: (
            V.discrete_vlb(model, x0, jax.random.key(0), decoder="gaussian"),
            V.discrete_vlb(
                model,
                x0,
                jax.random.key(1),
                decoder="gaussian",
                num_terms=3,
                probabilities=jnp.asarray(probabilities),
            ),
        )
    )(x0)
    assert (full.num_terms_evaluated, sampled.num_terms_evaluated) == (10, 3)
    assert full.terms.shape == (1024, 10) and sampled.indices.shape == (1024, 3)
    for estimate in (full.total, sampled.total):
        estimate = np.asarray(estimate)
        standard_error = estimate.std() / math.sqrt(estimate.size)
        assert abs(estimate.mean() - exact) < 4.5 * standard_error


def test_term_history_matches_a_list_implementation():
    """Nichol & Dhariwal 2021, Sec. 3.3: uniform until 10 values of every term, then p ~ sqrt(E[L^2]),
    mixed with 0.001 uniform; the history keeps the newest values."""
    rng = np.random.default_rng(0)
    num_terms, history = 4, 3
    state = V.init_term_history(num_terms, history)
    reference = [[] for _ in range(num_terms)]
    for round_ in range(5):
        indices = rng.integers(0, num_terms, 6)
        losses = rng.uniform(0.5, 2.0, 6) * (indices + 1)
        state = V.update_term_history(state, jnp.asarray(indices), jnp.asarray(losses))
        for k, loss in zip(indices, losses, strict=True):
            reference[k] = ([*reference[k], loss])[-history:]
        warm = all(len(values) == history for values in reference)
        p = np.asarray(V.term_probabilities(state))
        if warm:
            weights = np.sqrt([np.mean(np.square(values)) for values in reference])
            expected = 0.999 * weights / weights.sum() + 0.001 / num_terms
        else:
            expected = np.full(num_terms, 1.0 / num_terms)
        assert np.allclose(p, expected, rtol=1e-5), round_
    assert warm
    for k in range(num_terms):
        assert np.allclose(np.asarray(state.values[k]), reference[k], rtol=1e-6)


# ================================================================================ variances
def analytic_variance_figures(num_samples_list=(64, 16384)):
    """Gamma_t by Monte Carlo on 2-D Gaussian data (DDPM, 10 steps) against the exact value, and the
    analytic variances against the true reverse variances; float64 expected."""
    num_steps, dim = 10, 2
    process = P.DDPM(num_steps=num_steps, beta_start=0.01, beta_end=0.5)
    data = O.gaussian(np.full(dim, MU), np.full(dim, S**2))
    times = process.chain_times
    alphas_bar = np.cumprod(1.0 - np.linspace(0.01, 0.5, num_steps))
    signal = np.concatenate([[1.0], np.sqrt(alphas_bar)])
    noise = np.concatenate([[0.0], np.sqrt(1.0 - alphas_bar)])
    exact = exact_eps_sq_norm(signal[1:], noise[1:])
    marginal_var = signal**2 * S**2 + noise**2
    ratio = signal[1:] / signal[:-1]
    true_reverse_var = marginal_var[:-1] - (ratio * marginal_var[:-1]) ** 2 / marginal_var[1:]

    def variances(gamma):
        steps = V.analytic_variance(process, times[:-1], times[1:], gamma[1:])
        return np.r_[float(V.expected_x0_variance(process, times[0], gamma[0])), np.asarray(steps)]

    # d variance / d Gamma = -coef_x0^2 sigma^2 / alpha^2 (coef_x0 = 1 for the decoder step).
    coef_x0 = np.r_[1.0, np.asarray(process.posterior(times[:-1], times[1:])[0])]
    sensitivity = coef_x0**2 * noise[1:] ** 2 / signal[1:] ** 2
    denoiser = data.denoiser(process)
    estimate_fn = jax.jit(lambda x0: V.estimate_eps_sq_norm(denoiser, x0, jax.random.key(7), times))
    figures = {
        "exact_gamma_variance_error": np.abs(variances(exact) / true_reverse_var - 1.0).max(),
        "runs": {},
    }
    for num_samples in num_samples_list:
        estimate = np.asarray(estimate_fn(data.sample(jax.random.key(num_samples), num_samples)))
        standard_error = exact * math.sqrt(2.0 / (dim * num_samples))
        variance_error = np.abs(variances(estimate) - true_reverse_var)
        figures["runs"][num_samples] = {
            "gamma_error_in_standard_errors": np.abs(estimate - exact) / standard_error,
            "variance_error_in_standard_errors": variance_error / (sensitivity * standard_error),
            "max_relative_variance_error": (variance_error / true_reverse_var).max(),
        }
    return figures


@pytest.mark.slow
def test_analytic_variance_monte_carlo_converges(x64):
    """Bao et al. 2022, Thm. 1: with the exact Gamma_t the analytic variance is the true reverse
    variance of Gaussian data (Gaussian conditioning, 1e-12). Gamma_t estimated from M samples is within
    4.5 standard errors of the exact sigma^2/(alpha^2 s^2 + sigma^2) at every step (exact SE:
    ||eps_pred||^2/d is a scaled chi-square, variance 2 Gamma^2/d), and so is the variance (the SE
    propagated through coef_x0^2 sigma^2/alpha^2), for M = 64 and M = 16384: it converges at M^-1/2."""
    figures = analytic_variance_figures()
    assert figures["exact_gamma_variance_error"] < 1e-12
    for num_samples, run in figures["runs"].items():
        assert np.all(run["gamma_error_in_standard_errors"] < 4.5), num_samples
        assert np.all(run["variance_error_in_standard_errors"] < 4.5), num_samples
    worst = {m: run["max_relative_variance_error"] for m, run in figures["runs"].items()}
    assert worst[16384] < 0.02 and worst[16384] < worst[64]


def test_learned_variance_split_and_interpolation():
    """Nichol & Dhariwal 2021, eq. 15: v = 0 gives beta-tilde, v = 1 beta, a zero output their
    geometric mean; the prediction is the first half of the channels."""
    process = P.DDPM(num_steps=10)
    output = jnp.concatenate([jnp.full((2, 3), 7.0), jnp.asarray([[-1.0] * 3, [1.0] * 3])], -1)
    prediction, v = V.split_learned_variance_output(output)
    assert np.array_equal(prediction, np.full((2, 3), 7.0)) and np.array_equal(v[:, 0], [0.0, 1.0])
    with pytest.raises(ValueError, match="2C channels"):
        V.split_learned_variance_output(jnp.zeros((2, 3)))

    def apply_fn(params, x, t):
        return jnp.concatenate([x, params * jnp.ones_like(x)], axis=-1)

    t, s = process.chain_times[5], process.chain_times[4]
    log_beta, log_beta_tilde = (float(a) for a in V.step_log_variances(process, s, t))
    assert math.exp(log_beta) == pytest.approx(process.betas[5], rel=1e-6)
    x = jnp.ones((1, 2))
    for raw, expected in (
        (-1.0, log_beta_tilde),
        (1.0, log_beta),
        (0.0, 0.5 * (log_beta + log_beta_tilde)),
    ):
        model = V.ReverseModel(
            denoiser=Denoiser(params=jnp.asarray(raw), apply_fn=apply_fn, process=process),
            variance="learned",
        )
        _, log_var = model.reverse_moments(x, t, s)
        assert np.allclose(log_var, expected, rtol=1e-6)
        # predict sees the first C channels only (eps = x here).
        assert np.allclose(model.eps(x, t), x)
    # The same 2C network under a fixed rule: the prediction is split off, the variance is beta.
    fixed = V.ReverseModel(
        denoiser=Denoiser(params=jnp.asarray(0.3), apply_fn=apply_fn, process=process),
        variance="fixed_large",
        outputs_variance=True,
    )
    mean, log_var = fixed.reverse_moments(x, t, s)
    assert mean.shape == x.shape and np.allclose(log_var, log_beta, rtol=1e-6)


@pytest.mark.slow
def test_learned_variance_end_points_give_the_fixed_bounds_on_8bit_images():
    """On NHWC 8-bit data with the discretised decoder, a learned-variance network whose v is 1
    everywhere has exactly the 'fixed_large' bound and v = 0 the 'fixed_small' bound (eq. 15 of
    Nichol & Dhariwal 2021 at its ends, decoder included), term by term for the same noise."""
    process = P.DDPM(num_steps=10, beta_start=0.01, beta_end=0.3)
    pixels = jax.random.randint(jax.random.key(0), (4, 2, 2, 3), 0, 256)
    x0 = 2.0 * pixels / 255.0 - 1.0

    def eps_network(params, x, t):
        return 0.3 * x * (1.0 + t[:, None, None, None])

    def learned_network(raw_v, x, t):
        return jnp.concatenate([eps_network(None, x, t), raw_v * jnp.ones_like(x)], axis=-1)

    def bound(network, params, variance):
        denoiser = Denoiser(params=params, apply_fn=network, process=process)
        model = V.ReverseModel(denoiser=denoiser, variance=variance)
        return V.discrete_vlb(model, x0, jax.random.key(1)).terms

    fixed_large, fixed_small, v_one, v_zero = jax.jit(
        lambda: (
            bound(eps_network, None, "fixed_large"),
            bound(eps_network, None, "fixed_small"),
            bound(learned_network, 1.0, "learned"),
            bound(learned_network, -1.0, "learned"),
        )
    )()
    # A learned-variance network evaluated with a fixed rule ignores its v.
    split = V.ReverseModel(
        denoiser=Denoiser(params=0.2, apply_fn=learned_network, process=process),
        variance="fixed_large",
        outputs_variance=True,
    )
    assert np.allclose(V.discrete_vlb(split, x0, jax.random.key(1)).terms, fixed_large, rtol=1e-5)
    assert np.all(np.isfinite(fixed_large)) and fixed_large.shape == (4, 10)
    assert np.allclose(v_one, fixed_large, rtol=1e-5)
    assert np.allclose(v_zero, fixed_small, rtol=1e-5)
    assert not np.allclose(fixed_large, fixed_small, rtol=1e-3)


def test_discretized_decoder_tends_to_the_density_times_the_bin_width(x64):
    """For a decoder much wider than a bin, -log P = -log N(x; m, s^2) - log(2/255) + O((w/s)^2)."""
    x0 = 2.0 * jnp.arange(0, 256, 17)[:, None] / 255.0 - 1.0
    mean, log_var = 0.1 * x0 + 0.05, 2.0 * math.log(0.5)
    discrete = V.decoder_nll("discretized_gaussian", x0, mean, log_var)
    continuous = V.decoder_nll("gaussian", x0, mean, log_var) - math.log(2.0 / 255.0)
    inner = np.abs(np.asarray(x0[:, 0])) < 1.0  # the edge bins extend to infinity
    assert np.allclose(np.asarray(discrete)[inner], np.asarray(continuous)[inner], rtol=1e-4)


def test_reverse_model_fixed_variances_are_the_sampler_steps():
    """'fixed_small' / 'fixed_large' steps equal ancestral sampling's 'beta_tilde' / 'beta' steps."""
    process = P.DDPM(num_steps=100)
    denoiser = gaussian_data().denoiser(process)
    x = jnp.linspace(-2.0, 2.0, 8)[:, None]
    t, s = jnp.asarray(process.chain_times[40]), jnp.asarray(process.chain_times[39])
    key = jax.random.key(3)
    for ours, theirs in (("fixed_small", "beta_tilde"), ("fixed_large", "beta")):
        model = V.ReverseModel(denoiser=denoiser, variance=ours)
        expected, expected_x0 = A.ancestral_step(denoiser, x, t, s, key, theirs)
        got, got_x0 = model.reverse_step(x, t, s, key)
        assert np.allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert np.allclose(got_x0, expected_x0, rtol=1e-5, atol=1e-6)


def test_ancestral_sampler_draws_from_the_models_own_kernel():
    """sample('ancestral', variance='model') runs the ReverseModel's steps: with 'fixed_small' the
    same samples as the 'beta_tilde' sampler on the plain denoiser; a plain denoiser is refused."""
    process = P.DDPM(num_steps=100)
    denoiser = gaussian_data().denoiser(process)
    key, x_init = jax.random.key(4), jnp.linspace(-2.0, 2.0, 8)[:, None]
    common = dict(grid="linspace", num_steps=20, denoise_final=True)
    model = V.ReverseModel(denoiser=denoiser, variance="fixed_small")
    ours = sample("ancestral", model, key, x_init, variance="model", **common)
    plain = sample("ancestral", denoiser, key, x_init, variance="beta_tilde", **common)
    np.testing.assert_allclose(ours.samples, plain.samples, rtol=1e-5, atol=1e-6)
    assert int(ours.nfe) == int(plain.nfe) == 21
    with pytest.raises(ValueError, match="own reverse kernel"):
        sample("ancestral", denoiser, key, x_init, variance="model", **common)


def learned_head_errors():
    """(initial, final) max relative error of a per-step v trained with the hybrid loss (exact mean,
    lambda = 0.001, 300 Adam steps on batches of 1024) against the optimal variance beta-tilde +
    coef_x0^2 Var[x_0 | x_t] of Gaussian data (Gaussian conditioning), 10 DDPM steps."""
    num_steps = 10
    process = P.DDPM(num_steps=num_steps, beta_start=0.01, beta_end=0.5)
    data = gaussian_data()

    def apply_fn(params, x, index):
        eps = data.eps(process, x, (index + 1.0) / num_steps)
        v_raw = params[jnp.round(index).astype(jnp.int32)][:, None]
        return jnp.concatenate([eps, v_raw * jnp.ones_like(x)], axis=-1)

    denoiser = Denoiser(params=None, apply_fn=apply_fn, process=process, time_input="index")
    loss = V.HybridLoss(denoiser=denoiser, decoder="gaussian")
    optimizer = optax.adam(optax.exponential_decay(0.05, 300, 0.1))

    @jax.jit
    def train(params):
        def step(carry, key):
            params, state = carry
            key_data, key_loss = jax.random.split(key)
            batch = {"x": MU + S * jax.random.normal(key_data, (1024, 1))}
            grads = jax.grad(lambda p: loss(p, batch, key_loss, train=False)[0])(params)
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        keys = jax.random.split(jax.random.key(0), 300)
        return jax.lax.scan(step, (params, optimizer.init(params)), keys)[0][0]

    @jax.jit
    def learned_variances(params):
        model = V.ReverseModel(
            denoiser=Denoiser(
                params=params, apply_fn=apply_fn, process=process, time_input="index"
            ),
            variance="learned",
        )
        times, x = process.chain_times, jnp.zeros((1, 1))
        v = [model.predict_with_interpolation(x, t)[2] for t in times]
        log_vars = [model.decoder_log_variance(times[0], times[1], v[0])]
        log_vars += [
            model.step_log_variance(times[k], times[k - 1], v[k]) for k in range(1, num_steps)
        ]
        return jnp.exp(jnp.stack([jnp.ravel(log_var)[0] for log_var in log_vars]))

    alphas_bar = np.cumprod(1.0 - np.linspace(0.01, 0.5, num_steps))
    signal = np.concatenate([[1.0], np.sqrt(alphas_bar)])
    noise = np.concatenate([[0.0], np.sqrt(1.0 - alphas_bar)])
    marginal_var = signal**2 * S**2 + noise**2
    ratio = signal[1:] / signal[:-1]
    optimum = marginal_var[:-1] - (ratio * marginal_var[:-1]) ** 2 / marginal_var[1:]
    params = jnp.zeros(num_steps)
    initial_error = np.abs(np.asarray(learned_variances(params)) / optimum - 1.0).max()
    return initial_error, np.abs(np.asarray(learned_variances(train(params))) / optimum - 1.0).max()


@pytest.mark.slow
def test_learned_variance_head_approaches_the_optimum():
    """The learned variance reaches the optimum within 5% at every step, from a start 5x further
    away (the noise floor of this training is ~2%, seed fixed)."""
    initial_error, error = learned_head_errors()
    assert error < 0.05 and error < initial_error / 5, (error, initial_error)


def test_hybrid_loss_stops_the_mean_gradient_in_l_vlb():
    """Nichol & Dhariwal 2021, Sec. 3.1: L_vlb trains v only. The mean's gradient is the same with
    lambda = 0.001 and lambda = 0; v's gradient is zero at lambda = 0 and not at 0.001."""
    process = P.DDPM(num_steps=20)
    data = gaussian_data()

    def apply_fn(params, x, t):
        eps = params["scale"] * data.eps(process, x, t)
        return jnp.concatenate([eps, params["v_raw"] * jnp.ones_like(x)], axis=-1)

    params = {"scale": jnp.asarray(0.9), "v_raw": jnp.asarray(0.3)}
    batch = {"x": MU + S * jax.random.normal(jax.random.key(0), (64, 1))}

    @jax.jit
    def gradients(params):
        return {
            lam: jax.grad(
                lambda p, lam=lam: V.HybridLoss(
                    denoiser=Denoiser(params=None, apply_fn=apply_fn, process=process),
                    decoder="gaussian",
                    lambda_vlb=lam,
                )(p, batch, jax.random.key(1), train=False)[0]
            )(params)
            for lam in (0.0, 0.001)
        }

    grads = gradients(params)
    assert float(grads[0.0]["scale"]) == pytest.approx(float(grads[0.001]["scale"]), rel=1e-6)
    assert float(grads[0.0]["v_raw"]) == 0.0 and abs(float(grads[0.001]["v_raw"])) > 1e-6


# ================================================================================ continuous time
def linear_schedule(dtype=None):
    return V.LearnedSchedule(params=V.linear_schedule_params(4, dtype))


def continuous_model(process):
    """Oracle mean, 'fixed_small' steps, and the exact decoder Var[x_0 | x_{t_min}] ('analytic')."""
    table_times = np.array([process.t_min, process.T])
    alpha_sq = np.exp(2 * np.asarray(process.log_alpha(table_times)))
    sigma_sq = np.exp(2 * np.asarray(process.log_sigma(table_times)))
    return V.ReverseModel(
        denoiser=gaussian_data().denoiser(process),
        variance="fixed_small",
        decoder_variance="analytic",
        eps_sq_norm=jnp.asarray(sigma_sq / (alpha_sq * S**2 + sigma_sq)),
        eps_sq_norm_times=jnp.asarray(table_times),
    )


def quadrature_batch(num_nodes=5):
    """Tensor Gauss-Hermite nodes over (x_0 ~ N(MU, S^2), eps ~ N(0, 1)) and their weights."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(num_nodes)
    weights = weights / weights.sum()
    x0 = jnp.asarray(np.repeat(MU + S * nodes, num_nodes))[:, None]
    eps = jnp.asarray(np.tile(nodes, num_nodes))[:, None]
    return x0, eps, np.outer(weights, weights).ravel()


def exact_continuous_bound(model, x0, eps, weights, num_time_nodes=200):
    """E over the data of prior + reconstruction + the diffusion integral (Gauss-Legendre in t)."""
    process = model.process
    prior = np.asarray(V.prior_kl(process, x0)) @ weights
    decoder_times = jnp.asarray([process.t_min, process.T])
    reconstruction = np.asarray(V.vlb_term(model, x0, eps, 0, decoder_times, decoder="gaussian"))
    nodes, node_weights = np.polynomial.legendre.leggauss(num_time_nodes)
    span = process.T - process.t_min
    t = process.t_min + 0.5 * span * (nodes + 1.0)
    integrand = jax.jit(jax.vmap(lambda t: V.continuous_diffusion_integrand(model, x0, t, eps)))
    diffusion = 0.5 * span * (np.asarray(integrand(jnp.asarray(t))) @ weights) @ node_weights
    return prior + reconstruction @ weights + diffusion, diffusion


def continuous_limit_figures(grid_sizes=(64, 128, 256, 512, 1024)):
    """The exact continuous bound of Gaussian data (oracle, linear log-SNR schedule), the data's
    entropy, and the exact discrete bounds on K uniform steps with the posterior variances."""
    model = continuous_model(linear_schedule())
    x0, eps, weights = quadrature_batch()
    continuous, diffusion = exact_continuous_bound(model, x0, eps, weights)
    # Every step t -> s of every grid in one compiled call: a two-state chain [s, t], term 1.
    steps = [(k / size, (k + 1) / size) for size in grid_sizes for k in range(size)]
    s, t = (jnp.asarray(a) for a in zip(*steps, strict=True))
    step_kl = jax.jit(
        jax.vmap(lambda s, t: V.vlb_term(model, x0, eps, 1, jnp.stack([s, t]), decoder="gaussian"))
    )
    kls = np.asarray(step_kl(s, t)) @ weights
    bounds, start = [], 0
    for size in grid_sizes:
        bounds.append(continuous - diffusion + kls[start : start + size].sum())
        start += size
    gaps = np.array(bounds) - continuous
    return {
        "continuous": continuous,
        "entropy": 0.5 * math.log(2 * math.pi * math.e * S**2),
        "grid_sizes": list(grid_sizes),
        "discrete": bounds,
        "gaps": gaps,
        "fitted_rate": np.polyfit(np.log(grid_sizes), np.log(gaps), 1)[0],
        "richardson_error": 2 * bounds[-1] - bounds[-2] - continuous,
    }


@pytest.mark.slow
def test_continuous_bound_is_the_limit_of_the_discrete_bound(x64):
    """Kingma et al. 2021: with the posterior variances on K uniform steps of a linear log-SNR schedule
    the discrete bound decreases to the continuous one at the fitted rate K^-1 (slope within 0.05;
    Richardson's extrapolation within 1.5e-3), and the continuous bound exceeds the data's exact
    negative log-likelihood, the entropy 1/2 log(2 pi e s^2)."""
    figures = continuous_limit_figures()
    assert figures["continuous"] > figures["entropy"]
    gaps = figures["gaps"]
    assert np.all(gaps > 0) and np.all(np.diff(gaps) < 0)
    assert abs(figures["fitted_rate"] + 1.0) < 0.05, figures["fitted_rate"]
    assert abs(figures["richardson_error"]) < 1.5e-3


@pytest.mark.slow
def test_continuous_diffusion_term_depends_only_on_the_end_points(x64):
    """Kingma et al. 2021, eq. 20: for the exact denoiser the diffusion integral is the same for the
    linear schedule and a strongly curved monotone one with the same gamma_min and gamma_max."""
    params = V.init_schedule_params(jax.random.key(0), 16, stddev=4.0)
    params["linear_weight"] = jnp.asarray(0.05)  # the sigmoid layer dominates: an S-shaped gamma
    curved = V.LearnedSchedule(params=params)
    gammas = np.asarray(curved.gamma(jnp.linspace(0.0, 1.0, 11)))
    linear = np.linspace(V.GAMMA_MIN, V.GAMMA_MAX, 11)
    assert np.abs(gammas - linear).max() > 2.0  # really another schedule
    x0, eps, weights = quadrature_batch()
    values = [
        exact_continuous_bound(continuous_model(process), x0, eps, weights, 400)[1]
        for process in (linear_schedule(), curved)
    ]
    assert values[0] == pytest.approx(values[1], rel=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("time_sampling", ["uniform", "importance"])
def test_continuous_bound_monte_carlo_matches_quadrature(x64, time_sampling):
    """continuous_vlb's per-example estimates average to the exact bound (4.5 standard errors of
    4096 examples, fixed seed), uniform in t or uniform in log-SNR with its weights."""
    model = continuous_model(linear_schedule())
    exact, _ = exact_continuous_bound(model, *quadrature_batch())
    x0 = gaussian_data().sample(jax.random.key(0), 4096)
    estimate = jax.jit(
        lambda x0: V.continuous_vlb(
            model, x0, jax.random.key(1), decoder="gaussian", time_sampling=time_sampling
        )
    )(x0)
    assert estimate.num_terms_evaluated == 2
    total = np.asarray(estimate.total)
    assert abs(total.mean() - exact) < 4.5 * total.std() / math.sqrt(total.size)


# ================================================================================ learned schedule
@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearLogSNR(P.Process):
    """VDM's fixed schedule written independently: alpha^2 = 1/(1 + e^gamma), gamma linear in t."""

    name = "linear_log_snr_test"
    t_min: float = 0.0
    T: float = 1.0

    def _gamma(self, t):
        return V.GAMMA_MIN + (V.GAMMA_MAX - V.GAMMA_MIN) * jnp.asarray(t, dtype=float)

    def log_alpha(self, t):
        return -0.5 * jnp.log1p(jnp.exp(self._gamma(t)))

    def log_sigma(self, t):
        return 0.5 * self._gamma(t) - 0.5 * jnp.log1p(jnp.exp(self._gamma(t)))

    @property
    def sampling_t_end(self):
        return 0.0


def gaussian_eps_network(params, z, log_sigma_hat):
    """The exact eps of N(MU, S^2) data under any VP process, from the noise level sigma/alpha."""
    sigma_hat_sq = jnp.exp(2.0 * log_sigma_hat)[:, None]
    alpha_sq, sigma_sq = 1.0 / (1.0 + sigma_hat_sq), sigma_hat_sq / (1.0 + sigma_hat_sq)
    eps = jnp.sqrt(sigma_sq) * (z - jnp.sqrt(alpha_sq) * MU) / (alpha_sq * S**2 + sigma_sq)
    return params["scale"] * eps


def oracle_vdm_loss(process=None, **options):
    """VDMLoss of ``gaussian_eps_network`` (conditioned on log sigma_hat) on ``process``, or with a
    trained schedule (params {'denoiser', 'schedule'}) when process is None."""
    train_schedule = process is None
    if train_schedule:
        process = V.LearnedSchedule(params=V.linear_schedule_params(4))
    denoiser = Denoiser(
        params=None, apply_fn=gaussian_eps_network, process=process, time_input="log_sigma"
    )
    return V.VDMLoss(denoiser=denoiser, train_schedule=train_schedule, **options)


def likelihood_denoising_loss(process):
    """DenoisingLoss with the 'likelihood' weighting and summed squares, of gaussian_eps_network."""
    denoiser = Denoiser(
        params=None, apply_fn=gaussian_eps_network, process=process, time_input="log_sigma"
    )
    return L.DenoisingLoss(denoiser=denoiser, weighting="likelihood", reduction="sum")


def test_learned_schedule_is_monotone_with_fixed_end_points(x64):
    """gamma(0) = gamma_min, gamma(1) = gamma_max and gamma' > 0 for random raw weights of any sign;
    alpha^2 + sigma^2 = 1 and log-SNR = -gamma/2."""

    @jax.jit
    def evaluate(params):
        process = V.LearnedSchedule(params=params, gamma_min=-10.0, gamma_max=8.0)
        t = jnp.linspace(0.0, 1.0, 2001)
        total = jnp.exp(2 * process.log_alpha(t)) + jnp.exp(2 * process.log_sigma(t))
        slope = jax.vmap(jax.grad(process.gamma))(t)
        return process.gamma(t), slope, total, process.log_snr(t)

    for seed in range(3):
        params = V.init_schedule_params(jax.random.key(seed), 32, stddev=3.0)
        params["linear_weight"] = jnp.asarray(-0.1)  # the absolute value makes any sign monotone
        gamma, slope, total, log_snr = (np.asarray(a) for a in evaluate(params))
        assert gamma[0] == pytest.approx(-10.0, abs=1e-12)
        assert gamma[-1] == pytest.approx(8.0, abs=1e-12)
        assert np.all(slope > 0) and np.all(np.diff(gamma) > 0)
        assert np.allclose(total, 1.0, atol=1e-14)
        assert np.allclose(log_snr, -0.5 * gamma, atol=1e-12)


def test_learned_schedule_frozen_linear_equals_fixed_schedule_losses(x64):
    """Frozen at VDM's linear schedule, the learned process gives the fixed schedule's losses: the
    VDM loss (all terms) and DenoisingLoss with the 'likelihood' weighting; the diffusion term is
    VDM's 1/2 gamma' ||eps - eps_hat||^2 with gamma' = gamma_max - gamma_min (here the network is a
    scaled oracle, so eps_hat = 0.8 eps_oracle)."""
    params = {"scale": jnp.asarray(0.8)}
    batch = {"x": MU + S * jax.random.normal(jax.random.key(0), (64, 1))}
    key = jax.random.key(1)
    schedule = V.linear_schedule_params(8)
    fixed = oracle_vdm_loss(LinearLogSNR(), antithetic=False)
    learned = oracle_vdm_loss(antithetic=False)
    (fixed_loss, fixed_aux), (learned_loss, learned_aux) = jax.jit(
        lambda params, schedule: (
            fixed(params, batch, key, train=False),
            learned({"denoiser": params, "schedule": schedule}, batch, key, train=False),
        )
    )(params, schedule)
    assert float(learned_loss) == pytest.approx(float(fixed_loss), rel=1e-12)
    for name in fixed_aux:
        assert float(learned_aux[name]) == pytest.approx(float(fixed_aux[name]), rel=1e-12)
    for process in (LinearLogSNR(), V.LearnedSchedule(params=schedule)):
        denoising_loss = likelihood_denoising_loss(process)
        denoising = jax.jit(lambda p, loss=denoising_loss: loss(p, batch, key, train=False)[0])(
            params
        )
        # diffusion nats = (T - t_min)/2 E[w ||eps - eps_hat||^2]; D = 1.
        assert float(fixed_aux["bpd_diffusion"]) == pytest.approx(
            float(denoising) / (2 * math.log(2)), rel=1e-10
        )
    # By hand: the keys are split (time, noise, decoder, dropout), t = U[0, 1), eps ~ N(0, 1).
    key_time, key_noise, _, _ = jax.random.split(key, 4)
    t = np.asarray(jax.random.uniform(key_time, (64,)))
    eps = np.asarray(jax.random.normal(key_noise, (64, 1)))[:, 0]
    gamma = V.GAMMA_MIN + (V.GAMMA_MAX - V.GAMMA_MIN) * t
    alpha, sigma = np.sqrt(1 / (1 + np.exp(gamma))), np.sqrt(1 / (1 + np.exp(-gamma)))
    z = alpha * np.asarray(batch["x"])[:, 0] + sigma * eps
    eps_hat = 0.8 * sigma * (z - alpha * MU) / (alpha**2 * S**2 + sigma**2)
    by_hand = 0.5 * (V.GAMMA_MAX - V.GAMMA_MIN) * (eps - eps_hat) ** 2 / math.log(2)
    assert float(fixed_aux["bpd_diffusion"]) == pytest.approx(by_hand.mean(), rel=1e-10)


def test_vdm_discrete_time_loss_is_the_kl_of_the_step(x64):
    """Kingma et al. 2021, eq. 13: with one step the diffusion term 1/2 (SNR(0)/SNR(1) - 1)
    ||eps - eps_hat||^2 is the KL of the posterior-variance step 1 -> 0 at the same noise."""
    params = {"scale": jnp.asarray(0.8)}
    x = MU + S * jax.random.normal(jax.random.key(0), (16, 1))
    key = jax.random.key(2)
    loss = oracle_vdm_loss(LinearLogSNR(), num_steps=1)
    diffusion = jax.jit(lambda p: loss.per_example(p, {"x": x}, key, train=False)["diffusion"])(
        params
    )
    _, key_noise, _, _ = jax.random.split(key, 4)
    eps = jax.random.normal(key_noise, x.shape)
    denoiser = Denoiser(
        params=params,
        apply_fn=gaussian_eps_network,
        process=LinearLogSNR(),
        time_input="log_sigma",
    )
    model = V.ReverseModel(
        denoiser=denoiser, variance="fixed_small", decoder_variance="fixed_large"
    )
    kl = V.vlb_term(model, x, eps, 1, jnp.asarray([0.0, 1.0]), decoder="gaussian")
    assert np.allclose(np.asarray(diffusion), np.asarray(kl) / math.log(2), rtol=1e-9)


@pytest.mark.slow
def test_vdm_schedule_gradient_is_the_squared_loss_gradient(x64):
    """One backward pass gives the denoiser grad E[L] and the schedule grad E[L_diffusion^2]
    (Kingma et al. 2021, Sec. 5.2), checked against plain autodiff of both."""
    loss = oracle_vdm_loss()
    params = {
        "denoiser": {"scale": jnp.asarray(0.9)},
        "schedule": V.init_schedule_params(jax.random.key(3), 16, stddev=0.5),
    }
    batch = {"x": MU + S * jax.random.normal(jax.random.key(0), (32, 1))}
    key = jax.random.key(1)

    def mean_total(p):
        terms = loss.per_example(p, batch, key, train=False)
        return jnp.mean(terms["prior"] + terms["reconstruction"] + terms["diffusion"])

    def mean_square(p):
        return jnp.mean(loss.per_example(p, batch, key, train=False)["diffusion"] ** 2)

    @jax.jit
    def gradients(params):
        ours = jax.grad(lambda p: loss(p, batch, key, train=False)[0])(params)
        return (
            ours,
            jax.grad(mean_total)(params)["denoiser"],
            jax.grad(mean_square)(params)["schedule"],
        )

    grads, denoiser_grad, schedule_grad = gradients(params)
    assert float(grads["denoiser"]["scale"]) == pytest.approx(
        float(denoiser_grad["scale"]), rel=1e-10
    )
    for name in V.SCHEDULE_PARAM_NAMES:
        assert np.allclose(grads["schedule"][name], schedule_grad[name], rtol=1e-9, atol=1e-12)


def schedule_training_figures(num_train_steps=300):
    """Variance and mean of the diffusion term's estimator before and after training only the schedule
    (exact denoiser, Adam 0.1, batches of 256), from 2^16 fresh examples, with the closed forms.

    Given t, eps - eps_hat ~ N(0, h) with h(gamma) = s^2/(s^2 + e^gamma), so the term is
    1/2 gamma' h chi^2_1 and, with C = int h dgamma, Var = 3/4 int gamma'^2 h^2 dt - C^2/4: for the
    linear schedule 3/4 (gamma_max - gamma_min) int h^2 dgamma - C^2/4, and at least C^2/2 for any
    schedule (Cauchy-Schwarz; equality when gamma' h is constant). In bits^2."""
    h = lambda gamma: S**2 / (S**2 + np.exp(gamma))  # noqa: E731
    span = V.GAMMA_MAX - V.GAMMA_MIN
    c = integrate.quad(h, V.GAMMA_MIN, V.GAMMA_MAX)[0]
    c2 = integrate.quad(lambda g: h(g) ** 2, V.GAMMA_MIN, V.GAMMA_MAX)[0]
    bits_sq = 1.0 / math.log(2.0) ** 2

    loss = oracle_vdm_loss()
    reference = oracle_vdm_loss(antithetic=False)
    denoiser = {"scale": jnp.asarray(1.0)}
    schedule = V.init_schedule_params(jax.random.key(5), 64)  # close to linear
    optimizer = optax.adam(0.1)
    state = optimizer.init(schedule)

    @jax.jit
    def train_step(schedule, state, key):
        key_data, key_loss = jax.random.split(key)
        batch = {"x": MU + S * jax.random.normal(key_data, (256, 1))}

        def objective(schedule):
            params = {"denoiser": denoiser, "schedule": schedule}
            return loss(params, batch, key_loss, train=False)[0]

        updates, state = optimizer.update(jax.grad(objective)(schedule), state)
        return optax.apply_updates(schedule, updates), state

    @jax.jit
    def diffusion_terms(schedule):
        batch = {"x": MU + S * jax.random.normal(jax.random.key(100), (2**16, 1))}
        params = {"denoiser": denoiser, "schedule": schedule}
        return reference.per_example(params, batch, jax.random.key(101), train=False)["diffusion"]

    def statistics(terms):
        centred = terms - terms.mean()
        variance_error = math.sqrt((np.mean(centred**4) - centred.var() ** 2) / terms.size)
        return {
            "mean": terms.mean(),
            "mean_error": terms.std() / math.sqrt(terms.size),
            "variance": centred.var(),
            "variance_error": variance_error,
        }

    before = statistics(np.asarray(diffusion_terms(schedule)))
    for step in range(num_train_steps):
        schedule, state = train_step(schedule, state, jax.random.key(1000 + step))
    return {
        "linear_variance": (0.75 * span * c2 - c**2 / 4) * bits_sq,
        "minimum_variance": 0.5 * c**2 * bits_sq,
        "before": before,
        "after": statistics(np.asarray(diffusion_terms(schedule))),
        "gamma": np.asarray(V.LearnedSchedule(params=schedule).gamma(jnp.linspace(0, 1, 1001))),
    }


@pytest.mark.slow
def test_vdm_schedule_training_reduces_the_estimator_variance(x64):
    """Training only the schedule (exact denoiser) lowers the variance of the diffusion term's
    estimator towards its closed-form minimum (from the linear schedule's closed form), keeps its mean
    (E[L] depends on the end points only) and keeps the schedule monotone with its end points.
    Tolerances: 4.5 standard errors (the variance's from the sample fourth moment), fixed seeds."""
    figures = schedule_training_figures()
    before, after = figures["before"], figures["after"]
    assert abs(before["variance"] - figures["linear_variance"]) < 4.5 * before["variance_error"]
    assert abs(after["mean"] - before["mean"]) < 4.5 * math.hypot(
        before["mean_error"], after["mean_error"]
    )
    assert (
        figures["minimum_variance"] - 4.5 * after["variance_error"]
        < after["variance"]
        < 0.85 * before["variance"]
    ), (before, after)
    gamma = figures["gamma"]
    assert np.all(np.diff(gamma) > 0)
    assert (gamma[0], gamma[-1]) == pytest.approx((V.GAMMA_MIN, V.GAMMA_MAX), abs=1e-10)


@pytest.mark.slow
def test_learned_schedule_is_a_hashable_process_for_every_sampler():
    """Equal parameters: equal and same hash (the compiled sampler is reused); other parameters: not
    equal. A pytree of its parameters. DDIM (eta = 0, 100 log-SNR steps) with the oracle on the learned
    process returns N(MU, S^2): mean and std within 4.5 standard errors of 4096 samples (fixed seed)."""
    params = V.init_schedule_params(jax.random.key(0), 16, stddev=1.0)
    process = V.LearnedSchedule(params=params)
    same = V.LearnedSchedule(params=jax.tree.map(jnp.array, params))
    other = V.LearnedSchedule(params={**params, "linear_weight": jnp.asarray(2.0)})
    assert process == same and hash(process) == hash(same) and process != other
    assert len(jax.tree.leaves(process)) == len(V.SCHEDULE_PARAM_NAMES)
    rebuilt = jax.tree.map(lambda a: a, process)
    assert rebuilt == process
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda p: hash(V.LearnedSchedule(params=p)))(params)
    result = sample(
        "ddim",
        gaussian_data().denoiser(process),
        jax.random.key(1),
        (4096, 1),
        grid="uniform_log_snr",
        num_steps=100,
        denoise_final=True,
    )
    samples = np.asarray(result.samples)[:, 0]
    assert abs(samples.mean() - MU) < 4.5 * S / math.sqrt(samples.size)
    assert abs(samples.std() - S) < 4.5 * S / math.sqrt(2 * samples.size)


# ================================================================================ bad input
def test_bad_input_is_refused_before_compute():
    process = P.DDPM(num_steps=10)
    denoiser = gaussian_data().denoiser(process)
    with pytest.raises(ValueError, match="unknown variance 'small'"):
        V.ReverseModel(denoiser=denoiser, variance="small")
    with pytest.raises(ValueError, match="eps_sq_norm"):
        V.ReverseModel(denoiser=denoiser, variance="analytic")
    with pytest.raises(ValueError, match="decoder_variance='learned' needs variance='learned'"):
        V.ReverseModel(denoiser=denoiser, decoder_variance="learned")
    with pytest.raises(ValueError, match="strictly increasing"):
        V.ReverseModel(
            denoiser=denoiser,
            variance="analytic",
            eps_sq_norm=jnp.ones(2),
            eps_sq_norm_times=jnp.asarray([0.5, 0.1]),
        )
    model = V.ReverseModel(denoiser=denoiser)
    x0 = jnp.zeros((2, 1))
    with pytest.raises(ValueError, match="unknown decoder"):
        V.discrete_vlb(model, x0, jax.random.key(0), decoder="logistic")
    with pytest.raises(ValueError, match="num_terms"):
        V.discrete_vlb(model, x0, jax.random.key(0), num_terms=0)
    with pytest.raises(ValueError, match="one entry per term"):
        V.discrete_vlb(model, x0, jax.random.key(0), num_terms=2, probabilities=jnp.ones(3) / 3)
    with pytest.raises(ValueError, match="no next time"):
        V.continuous_vlb(model, x0, jax.random.key(0))
    with pytest.raises(ValueError, match="continuous process"):
        V.discrete_vlb(
            V.ReverseModel(denoiser=gaussian_data().denoiser(P.VPSDE())), x0, jax.random.key(0)
        )
    with pytest.raises(ValueError, match="continuous process"):
        V.HybridLoss(denoiser=Denoiser(params=None, apply_fn=lambda p, x, t: x, process=P.VPSDE()))
    with pytest.raises(ValueError, match="lambda_vlb"):
        V.HybridLoss(denoiser=denoiser, lambda_vlb=-1.0)
    with pytest.raises(ValueError, match="gamma_min < gamma_max"):
        V.LearnedSchedule(params=V.linear_schedule_params(2), gamma_min=5.0, gamma_max=-5.0)
    with pytest.raises(ValueError, match="params must be a mapping"):
        V.LearnedSchedule(params={"linear_weight": jnp.ones(())})
    with pytest.raises(ValueError, match="num_steps"):
        oracle_vdm_loss(LinearLogSNR(), num_steps=-1)
    with pytest.raises(ValueError, match="'denoiser'"):
        oracle_vdm_loss()({"scale": 1.0}, {"x": x0}, jax.random.key(0))
    with pytest.raises(ValueError, match="needs the denoiser's process to be a LearnedSchedule"):
        V.VDMLoss(denoiser=denoiser, train_schedule=True)
    with pytest.raises(ValueError, match=r"must be a diffusion\.parameterization\.Denoiser"):
        V.VDMLoss(denoiser=gaussian_eps_network)
