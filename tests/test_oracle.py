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
    # Tweedie: E[x0 | x_t] = (x_t + sigma^2 score) / alpha (Efron 2011), against the direct sum.
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

    knots = getattr(process, "chain_times", None)  # None (or absent) for a continuous process
    knots = np.array([]) if knots is None else np.asarray(knots)
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
    """Flowing exact samples of p_T back to t ~ 0 gives N(mu, Sigma) (Song et al. 2021, eq. 13)."""
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


# ================================================================================ labelled mixtures
def labelled_mixture():
    """Three classes over five anisotropic components in 2-D (class 1 owns two, class 2 two)."""
    means = np.array([[-1.0, 0.0], [1.0, 0.3], [0.0, 1.5], [0.5, -1.2], [-1.5, 1.0]])
    covariances = [
        np.array([0.6, 0.3]),
        np.array([[0.4, 0.15], [0.15, 0.3]]),
        np.array([0.5, 0.5]),
        np.array([[0.2, -0.05], [-0.05, 0.4]]),
        np.array([0.3, 0.2]),
    ]
    return O.gaussian_mixture([1.0, 2.0, 1.0, 1.5, 0.5], means, covariances, labels=[0, 1, 1, 2, 2])


@pytest.mark.slow
@pytest.mark.parametrize("name", PROCESSES)
def test_class_conditional_is_the_sub_mixture_of_the_class(name, x64):
    """p_t(x | y) is the noised sub-mixture of class y's components: score, x0, eps and log-density
    with per-row labels equal those of ``class_conditional(y)``, built by selecting rows in numpy."""
    process = P.make_process(name)
    oracle = labelled_mixture()
    t = jnp.array([mid_time(process, f) for f in (0.02, 0.2, 0.5, 0.9, 0.3, 0.7)])
    x = oracle.sample_marginal(jax.random.PRNGKey(5), process, 6, t)
    labels = np.array([0, 1, 2, 2, 1, 0])

    @jax.jit
    def all_views(mixture, x, t, labels=None):
        return [
            getattr(mixture, m)(process, x, t, labels) for m in ("score", "x0", "eps", "log_prob")
        ]

    got = all_views(oracle, x, t, jnp.asarray(labels))
    for label in range(3):
        rows = labels == label
        want = all_views(oracle.class_conditional(label), x[rows], t[rows])
        for got_view, want_view in zip(got, want, strict=True):
            np.testing.assert_allclose(got_view[rows], want_view, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["ve", pytest.param("vp", marks=pytest.mark.slow), "edm"])
def test_bayes_rule_links_conditional_score_and_noisy_classifier(name, x64):
    """grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x) (Bayes' rule; Song et al. 2021,
    Sec. 5.3), each side by its own route: the conditional score in closed form, the classifier
    gradient by autodiff of ``class_log_prob``; and the conditional score is the gradient of the
    conditional log-density."""
    process = P.make_process(name)
    oracle = labelled_mixture()
    t = jnp.array([mid_time(process, f) for f in (0.05, 0.3, 0.6, 0.9)])
    x = oracle.sample_marginal(jax.random.PRNGKey(6), process, 4, t)

    def classifier_log_probs(xi, ti):  # (C,)
        return oracle.class_log_prob(process, xi[None], ti[None])[0]

    def conditional_log_prob(xi, ti, label):
        return oracle.log_prob(process, xi[None], ti[None], labels=label[None])[0]

    @jax.jit
    def both_sides(x, t, labels):
        conditional = oracle.score(process, x, t, labels=labels)
        classifier_grads = jax.vmap(jax.jacrev(classifier_log_probs))(x, t)  # (B, C, D)
        classifier_grad = jnp.take_along_axis(classifier_grads, labels[:, None, None], 1)[:, 0]
        autodiff = jax.vmap(jax.grad(conditional_log_prob))(x, t, labels)
        return conditional, oracle.score(process, x, t) + classifier_grad, autodiff

    for label in range(3):
        conditional, bayes, autodiff = both_sides(x, t, jnp.full((4,), label))
        np.testing.assert_allclose(conditional, bayes, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(conditional, autodiff, rtol=1e-9, atol=1e-11)


def test_noisy_classifier_matches_scipy_densities(x64):
    """p_t(y | x) = sum_{k in y} w_k N_k(x) / sum_k w_k N_k(x), with the noised component densities
    from scipy; each row sums to 1; at t = T the classifier is (nearly) the class prior."""
    oracle = labelled_mixture()
    process = P.SubVPSDE()
    t = 0.31
    alpha, sigma = float(process.alpha(t)), float(process.sigma(t))
    x = np.array([[0.1, 0.2], [-1.0, 3.0], [2.0, -1.0]])
    eigvecs, eigvals = np.asarray(oracle.eigvecs), np.asarray(oracle.eigvals)
    densities = np.stack(
        [
            float(w)
            * stats.multivariate_normal(
                alpha * np.asarray(m), alpha**2 * (u * c) @ u.T + sigma**2 * np.eye(2)
            ).pdf(x)
            for w, m, u, c in zip(oracle.weights, oracle.means, eigvecs, eigvals, strict=True)
        ],
        axis=1,
    )
    membership = np.eye(3)[list(oracle.component_labels)]
    expected = densities @ membership / densities.sum(axis=1, keepdims=True)
    got = np.exp(np.asarray(oracle.class_log_prob(process, jnp.asarray(x), t)))
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-12)
    prior = np.asarray(oracle.class_prior())
    np.testing.assert_allclose(prior, [1 / 6, 1 / 2, 1 / 3], rtol=1e-12)
    at_prior = np.exp(np.asarray(oracle.class_log_prob(process, jnp.asarray(x), process.T)))
    np.testing.assert_allclose(
        at_prior, np.broadcast_to(prior, (3, 3)), atol=1e-2
    )  # alpha_T ~ 7e-3


def test_null_label_is_unconditional_and_the_denoiser_takes_labels_as_y(x64):
    oracle = labelled_mixture()
    process = P.VPSDE()
    x = oracle.sample_marginal(jax.random.PRNGKey(7), process, 4, 0.4)
    denoiser = oracle.denoiser(process)

    @jax.jit
    def views(x):
        null = jnp.full((4,), oracle.num_classes)
        labels = jnp.array([0, 1, 2, 3])  # the last row is unconditional
        by_rows = jnp.concatenate(
            [oracle.eps(process, x[:3], 0.4, labels=labels[:3]), oracle.eps(process, x[3:], 0.4)]
        )
        return (
            oracle.score(process, x, 0.4, labels=null),
            oracle.score(process, x, 0.4),
            denoiser.eps(x, 0.4, y=labels),
            by_rows,
            denoiser.eps(x, 0.4),
            oracle.eps(process, x, 0.4),
        )

    null_score, score, labelled_eps, by_rows, network_eps, eps = views(x)
    np.testing.assert_array_equal(null_score, score)
    np.testing.assert_allclose(labelled_eps, by_rows, rtol=1e-12)
    np.testing.assert_array_equal(network_eps, eps)


def test_labelled_samples_follow_the_components():
    oracle = labelled_mixture()
    x, labels = oracle.sample_with_labels(jax.random.PRNGKey(8), 60000)
    np.testing.assert_array_equal(x, oracle.sample(jax.random.PRNGKey(8), 60000))
    counts = np.bincount(np.asarray(labels), minlength=3)
    assert stats.chisquare(counts, 60000 * np.array([1 / 6, 1 / 2, 1 / 3])).pvalue > 1e-3
    # each sample's label is the class of the component that generated it: class 0 is one Gaussian
    class_zero = np.asarray(x)[np.asarray(labels) == 0]
    np.testing.assert_allclose(class_zero.mean(axis=0), [-1.0, 0.0], atol=0.03)
    np.testing.assert_allclose(class_zero.var(axis=0), [0.6, 0.3], rtol=0.05)


def test_condition_on_coordinates_matches_gaussian_conditioning_and_bayes(x64):
    """A single Gaussian against the textbook formulas; a labelled mixture against Bayes' rule:
    log p(u | k) = log p(u, k) - log p(k), every density from scipy."""
    rng = np.random.default_rng(3)
    factor = rng.normal(size=(4, 4))
    covariance = factor @ factor.T / 4 + 0.2 * np.eye(4)
    mean = rng.normal(size=4)
    known = np.array([False, True, False, True])
    values = np.array([0.0, 0.7, 0.0, -0.4])
    conditional = O.gaussian(mean, covariance).condition_on_coordinates(known, values)
    gain = covariance[np.ix_(~known, known)] @ np.linalg.inv(covariance[np.ix_(known, known)])
    expected_mean = mean[~known] + gain @ (values[known] - mean[known])
    expected_cov = covariance[np.ix_(~known, ~known)] - gain @ covariance[np.ix_(known, ~known)]
    cond_cov = (conditional.eigvecs[0] * conditional.eigvals[0]) @ conditional.eigvecs[0].T
    np.testing.assert_allclose(conditional.means[0], expected_mean, rtol=1e-12)
    np.testing.assert_allclose(cond_cov, expected_cov, rtol=1e-10, atol=1e-12)

    mixture = labelled_mixture()
    known2 = np.array([True, False])
    given = mixture.condition_on_coordinates(known2, [0.3])
    assert given.component_labels == mixture.component_labels and given.dim == 1
    covariances = [(u * c) @ u.T for u, c in zip(mixture.eigvecs, mixture.eigvals, strict=True)]
    components = list(zip(mixture.weights, mixture.means, covariances, strict=True))

    def joint(point):
        return sum(w * stats.multivariate_normal(m, c).pdf(point) for w, m, c in components)

    marginal = sum(w * stats.norm(m[0], np.sqrt(c[0, 0])).pdf(0.3) for w, m, c in components)
    unknown = np.array([-1.0, 0.2, 1.4])
    expected = [math.log(joint([0.3, u]) / marginal) for u in unknown]
    # the conditional mixture's log-density at "t = 0" through a process whose sigma is ~0
    process = P.VESDE(sigma_min=1e-9)
    got = given.log_prob(process, jnp.asarray(unknown[:, None]), process.t_min)
    np.testing.assert_allclose(got, expected, rtol=1e-7)


def test_bad_label_arguments():
    oracle = labelled_mixture()
    process = P.VPSDE()
    x = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="label 4 is out of range"):
        oracle.score(process, x, 0.5, labels=jnp.array([0, 4]))
    with pytest.raises(ValueError, match="label -1 is out of range"):
        oracle.eps(process, x, 0.5, labels=-1)
    with pytest.raises(ValueError, match="integers"):
        oracle.log_prob(process, x, 0.5, labels=jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="no class labels"):
        O.preset("ring8_2d").score(process, x, 0.5, labels=0)
    with pytest.raises(ValueError, match="no class labels"):
        O.preset("ring8_2d").class_log_prob(process, x, 0.5)
    with pytest.raises(ValueError, match="every class used"):
        O.preset("ring8_2d").with_labels([0, 2, 0, 2, 0, 2, 0, 2])
    with pytest.raises(ValueError, match="one label per component"):
        O.preset("ring8_2d").with_labels([0, 1])
    with pytest.raises(ValueError, match=r"label must be an integer in \[0, 3\)"):
        oracle.class_conditional(3)
    with pytest.raises(ValueError, match="both known and unknown"):
        oracle.condition_on_coordinates(np.array([True, True]), [0.0, 0.0])
