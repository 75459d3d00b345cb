"""Denoising score matching losses against independent truths (identities: docs/references.md).

* Bayes optimality: at the oracle's exact denoiser the loss gradient vanishes for every weighting and
  parameterization, and not at a perturbed one (#bayes-optimal-denoiser,
  #denoising-score-matching-target, #explicit-and-denoising-score-matching).
* Values: the expected loss of the exact denoiser of Gaussian data, whose eps-MSE is
  D alpha^2 s^2 / (alpha^2 s^2 + sigma^2) (#gaussian-data, #bayes-optimal-denoiser), integrated by
  quadrature over the time law with weights written out here from the papers, against Monte-Carlo
  means of the loss.
* #loss-conversions: all parameterizations give the same loss for the same denoiser.
* Ho et al. (2020) Alg. 1, Song & Ermon (2019) eq. 6 and Karras et al. (2022) eq. 8 recomputed by
  hand from alphas_bar, the sigmas and the EDM preconditioning table.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from diffusion import losses as L
from diffusion import oracle as O
from diffusion import parameterization as PZ
from diffusion import processes as P
from diffusion.models import MLP, UNet

SIGMA_DATA = 0.5
# The eagerly run tests share one batch shape (and float64), so that JAX compiles each primitive once.
SMALL_BATCH = (64, 2)


def rng(seed):
    """A PRNG key: RBG keys compile several times faster on CPU than threefry (see test_models)."""
    return jax.random.key(seed, impl="rbg")


def bump(x, t, sigma_hat):
    """A fixed smooth perturbation direction h(x, t) in eps space, decaying at high noise levels
    (so that no weighting, e.g. 'edm' ~ sigma_hat^2, makes its loss gradient heavy-tailed)."""
    return (1.0 + 0.5 * jnp.sin(3.0 * x + t[:, None])) / (1.0 + sigma_hat)


def oracle_network(oracle, process, parameterization):
    """The oracle's exact eps plus theta * bump, written as a raw network in ``parameterization``.

    The same underlying denoiser eps_hat = eps* + theta h is expressed through
    ``prediction_from_eps_x0`` of (eps_hat, x0_hat = (x - sigma eps_hat) / alpha). With the EDM
    parameterization the network sees (c_in x_hat, c_noise = ln(sigma_hat) / 4), from which x and t
    are recovered.
    """

    def apply_fn(params, x_in, t_in, **unused):
        if parameterization == "edm":
            log_sigma_hat = 4.0 * t_in
            t = process.t_from_log_snr(-log_sigma_hat)
            c_in_inverse = jnp.sqrt(jnp.exp(2.0 * log_sigma_hat) + SIGMA_DATA**2)
            x = x_in * (process.alpha(t) * c_in_inverse)[:, None]
        else:
            t, x = t_in, x_in
        alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
        perturbation = bump(x, t, sigma / alpha)
        eps_hat = oracle.eps(process, x, t) + params["theta"] * perturbation
        x0_hat = (x - sigma * eps_hat) / alpha
        return PZ.prediction_from_eps_x0(
            eps_hat, x0_hat, parameterization, alpha, sigma, SIGMA_DATA
        )

    return apply_fn


def make_loss(process, parameterization, apply_fn, *, time_input="t", sigma_data=0.5, **options):
    """DenoisingLoss of the network ``apply_fn`` seen as a denoiser of ``process``."""
    denoiser = PZ.Denoiser(
        params=None,
        apply_fn=apply_fn,
        process=process,
        parameterization=parameterization,
        time_input=time_input,
        sigma_data=sigma_data,
    )
    return L.DenoisingLoss(denoiser=denoiser, **options)


def oracle_loss(oracle, process, parameterization, weighting, **options):
    return make_loss(
        process=process,
        parameterization=parameterization,
        apply_fn=oracle_network(oracle, process, parameterization),
        weighting=weighting,
        sigma_data=SIGMA_DATA,
        time_input="quarter_log_sigma" if parameterization == "edm" else "t",  # EDM's c_noise
        **options,
    )


# ================================================================================ Bayes optimality
# Each weighting with a process and time law it is used with in the literature, and a
# parameterization (each appears at least once). Together with
# test_every_parameterization_gives_the_eps_loss (equal losses, hence equal gradients, for all
# parameterizations at every weighting) this covers every (weighting, parameterization) pair.
GRADIENT_CASES = [
    ("simple", "eps", lambda: P.DDPM(num_steps=100), "discrete"),  # Ho et al. 2020, Alg. 1
    ("sigma_sq", "score", lambda: P.SMLD(num_levels=10, sigma_max=3.0), "discrete"),  # NCSN
    ("likelihood", "x0", P.VPSDE, "importance"),  # Song, Durkan et al. 2021
    ("snr", "v", P.SubVPSDE, "uniform"),
    ("min_snr", "edm", P.CosineVP, "uniform"),
    ("v", "x0", P.VPSDE, "uniform"),
    ("edm", "edm", P.EDM, "log_normal"),  # Karras et al. 2022
]


def per_example_gradients(loss_fn, theta, x0, keys):
    """d loss / d theta for each example (a single-example batch and its own key each).

    Run eagerly: the programs are tiny and a compile per configuration would cost more.
    """

    def gradient(x, example_key):
        def loss_of_theta(theta):
            return loss_fn({"theta": theta}, {"x": x[None]}, example_key, train=False)[0]

        return jax.grad(loss_of_theta)(theta)

    return np.asarray(jax.vmap(gradient)(x0, keys))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("weighting", "parameterization", "make_process", "time_sampling"),
    GRADIENT_CASES,
    ids=[f"{case[0]}-{case[1]}-{case[3]}" for case in GRADIENT_CASES],
)
def test_gradient_vanishes_at_the_exact_denoiser(
    weighting, parameterization, make_process, time_sampling, x64
):
    """d E[loss] / d theta = 0 at theta = 0 (the Bayes denoiser E[eps | x_t], docs/references.md
    #bayes-optimal-denoiser, #denoising-score-matching-target)
    within 4 Monte-Carlo standard errors (estimated from 2048 per-example gradients), and more
    than 8 standard errors at theta = 0.5."""
    oracle = O.preset("ring8_2d")
    num = 2048
    x0 = oracle.sample(rng(0), num)
    keys = jax.random.split(rng(1), num)
    loss_fn = oracle_loss(
        oracle, make_process(), parameterization, weighting, time_sampling=time_sampling
    )
    z_scores = []
    for theta in (0.0, 0.5):
        gradients = per_example_gradients(loss_fn, jnp.float64(theta), x0, keys)
        z_scores.append(gradients.mean() / (gradients.std(ddof=1) / math.sqrt(num)))
    assert abs(z_scores[0]) < 4.0, z_scores
    assert z_scores[1] > 8.0, z_scores


# ================================================================================ values
DIM, DATA_MEAN, DATA_STD = 2, 0.3, 0.7
BETA_MIN, BETA_MAX = 0.1, 20.0


def vp_closed_form(t):
    """alpha, sigma and g^2 = beta(t) of the VP SDE (Song et al. 2021, eqs. 11 and 33)."""
    integral = BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t**2
    return (
        np.exp(-0.5 * integral),
        np.sqrt(-np.expm1(-integral)),
        BETA_MIN + t * (BETA_MAX - BETA_MIN),
    )


def vp_time_of_sigma_hat(sigma_hat):
    """t with sigma/alpha = sigma_hat on the VP SDE: int_0^t beta = log(1 + sigma_hat^2)."""
    integral = np.log1p(sigma_hat**2)
    slope = BETA_MAX - BETA_MIN
    return (-BETA_MIN + np.sqrt(BETA_MIN**2 + 2.0 * slope * integral)) / slope


def eps_weight_from_papers(weighting, alpha, sigma, g_sq):
    """w(t) on the eps-MSE, restated from each paper's loss (see the module doc of losses)."""
    snr = alpha**2 / sigma**2
    if weighting == "sigma_sq":  # sigma^2 ||s - s_hat||^2 with s = -eps / sigma
        return sigma**2 / sigma**2
    if weighting == "snr":  # SNR ||x0 - x0_hat||^2 with x0 error = eps error / sqrt(SNR)
        return snr / snr
    if weighting == "likelihood":  # g^2 ||s - s_hat||^2
        return g_sq / sigma**2
    if weighting == "min_snr":  # min(SNR, 5) ||x0 - x0_hat||^2
        return min(snr, 5.0) / snr
    if weighting == "v":  # ||v - v_hat||^2, v = alpha eps - sigma x0
        return (alpha**2 + sigma**2) ** 2 / alpha**2
    if weighting == "edm":  # lambda(sigma_hat) ||x0 - x0_hat||^2, Karras et al. eq. 8
        sigma_hat_sq = 1.0 / snr
        return (sigma_hat_sq + SIGMA_DATA**2) / (sigma_hat_sq * SIGMA_DATA**2) * sigma_hat_sq
    return 1.0  # simple


def exact_eps_mse(alpha, sigma):
    """E ||eps - E[eps | x_t]||^2 for N(mu, s^2 I) data in DIM dimensions (docs/references.md
    #gaussian-data, #bayes-optimal-denoiser)."""
    return DIM * alpha**2 * DATA_STD**2 / (alpha**2 * DATA_STD**2 + sigma**2)


def expected_loss(weighting, time_sampling, process_name, t_min):
    """E[loss] by quadrature over the time law, with 'sum' reduction."""

    def integrand(alpha, sigma, g_sq):
        return eps_weight_from_papers(weighting, alpha, sigma, g_sq) * exact_eps_mse(alpha, sigma)

    if process_name == "ddpm":
        alphas_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 100))
        return np.mean([integrand(math.sqrt(ab), math.sqrt(1 - ab), None) for ab in alphas_bar])
    if process_name == "smld":
        sigmas = np.geomspace(1.0, 0.01, 10)
        return np.mean([integrand(1.0, sigma, None) for sigma in sigmas])
    if process_name == "vp":
        at_time = lambda t: integrand(*vp_closed_form(t))  # noqa: E731
        t_max, time_of_sigma_hat = 1.0, vp_time_of_sigma_hat
    else:  # EDM: alpha = 1, sigma = t, g^2 = 2 t
        at_time = lambda t: integrand(1.0, t, 2.0 * t)  # noqa: E731
        t_min, t_max, time_of_sigma_hat = 0.002, 80.0, lambda sigma_hat: sigma_hat
    if time_sampling in ("uniform", "importance"):  # importance sampling: same objective
        value, _ = integrate.quad(at_time, t_min, t_max, limit=200, points=[0.01, 0.1, 1.0])
        return value / (t_max - t_min)
    # ln sigma_hat ~ N(-1.2, 1.2^2) (Karras et al. 2022, Table 1), t clipped to [t_min, T].
    value, _ = integrate.quad(
        lambda z: (
            stats.norm.pdf(z)
            * at_time(np.clip(time_of_sigma_hat(math.exp(-1.2 + 1.2 * z)), t_min, t_max))
        ),
        -12.0,
        12.0,
        limit=200,
    )
    return value


VALUE_CASES = [
    # weighting, time_sampling, process, parameterization, reduction
    ("simple", "uniform", "vp", "eps", "sum"),
    ("sigma_sq", "uniform", "vp", "score", "mean"),
    ("snr", "uniform", "vp", "x0", "sum"),
    ("min_snr", "uniform", "vp", "v", "sum"),
    ("v", "uniform", "vp", "v", "mean"),
    ("likelihood", "uniform", "vp", "eps", "sum"),
    ("likelihood", "importance", "vp", "x0", "sum"),
    ("simple", "importance", "vp", "eps", "sum"),
    ("simple", "log_normal", "vp", "eps", "sum"),
    ("edm", "log_normal", "edm", "edm", "sum"),
    ("edm", "uniform", "edm", "eps", "sum"),
    ("simple", "discrete", "ddpm", "eps", "sum"),
    ("sigma_sq", "discrete", "smld", "score", "sum"),
]
VALUE_PROCESSES = {
    # t_min = 1e-2 keeps the variance of the likelihood-weighted loss with uniform t (~ 1/t_min)
    # small enough for 8192 samples.
    "vp": lambda: P.VPSDE(t_min=1e-2),
    "edm": P.EDM,
    "ddpm": lambda: P.DDPM(num_steps=100),
    "smld": lambda: P.SMLD(num_levels=10),
}


def per_example_losses(loss_fn, x0, keys, theta=0.0):
    """(loss, eps_mse) of each example (a single-example batch and its own key each), run eagerly."""

    def loss(x, example_key):
        return loss_fn({"theta": theta}, {"x": x[None]}, example_key, train=False)

    value, aux = jax.vmap(loss)(x0, keys)
    return np.asarray(value), np.asarray(aux["eps_mse"])


@pytest.mark.parametrize(
    ("weighting", "time_sampling", "process_name", "parameterization", "reduction"), VALUE_CASES
)
def test_loss_matches_quadrature(
    weighting, time_sampling, process_name, parameterization, reduction, x64
):
    """Mean of 4 x 2048 single-example losses = quadrature of w(t) E||eps - eps*||^2 within
    4.5 standard errors (and the standard error is below 5% of the value)."""
    process = VALUE_PROCESSES[process_name]()
    oracle = O.gaussian(np.full(DIM, DATA_MEAN), np.full(DIM, DATA_STD**2))
    loss_fn = oracle_loss(
        oracle,
        process,
        parameterization,
        weighting,
        time_sampling=time_sampling,
        reduction=reduction,
    )
    losses = []
    for chunk in range(4):  # same shapes as test_gradient_vanishes_at_the_exact_denoiser
        x0 = DATA_MEAN + DATA_STD * jax.random.normal(rng(100 + chunk), (2048, DIM))
        keys = jax.random.split(rng(200 + chunk), 2048)
        losses.append(per_example_losses(loss_fn, x0, keys)[0])
    losses = np.concatenate(losses)
    standard_error = losses.std(ddof=1) / math.sqrt(losses.size)
    expected = expected_loss(weighting, time_sampling, process_name, process.t_min)
    if reduction == "mean":
        expected /= DIM
    assert standard_error < 0.05 * expected  # the comparison below is informative
    assert abs(losses.mean() - expected) < 4.5 * standard_error, (losses.mean(), expected)


# ================================================================================
# docs/references.md #loss-conversions
@pytest.mark.parametrize("process", [P.VPSDE(), P.VESDE()], ids=["vp", "ve"])
def test_every_parameterization_gives_the_eps_loss(process, x64):
    """docs/references.md #loss-conversions. Same denoiser (theta = 0.5), same keys: each example's
    loss and eps_mse from
    every parameterization's raw output equal the eps ones (rtol 1e-9), so every weighting (a
    function of t) agrees too; this is why lambda = sigma^2 on the score MSE ('sigma_sq') and SNR on
    the x0 MSE ('snr') are w = 1 on the eps-MSE. 'sum' is D * 'mean'."""
    oracle = O.preset("ring8_2d")
    x0 = oracle.sample(rng(4), 2048)
    keys = jax.random.split(rng(5), 2048)

    def losses(parameterization, weighting, **options):
        loss_fn = oracle_loss(oracle, process, parameterization, weighting, **options)
        return per_example_losses(loss_fn, x0, keys, theta=0.5)

    for weighting in ("simple", "edm"):
        eps_loss, eps_mse = losses("eps", weighting)
        for parameterization in list(PZ.PARAMETERIZATIONS)[1:]:
            loss, mse = losses(parameterization, weighting)
            np.testing.assert_allclose(loss, eps_loss, rtol=1e-9, err_msg=parameterization)
            np.testing.assert_allclose(mse, eps_mse, rtol=1e-9, err_msg=parameterization)
    summed = losses("v", "v", reduction="sum")
    meaned = losses("v", "v", reduction="mean")
    np.testing.assert_allclose(summed, 2.0 * np.asarray(meaned), rtol=1e-12)


# ================================================================================ by hand
def loss_keys(key):
    """The documented key contract of DenoisingLoss: (time, noise, dropout, label)."""
    key_time, key_noise, _, _ = jax.random.split(key, 4)
    return key_time, key_noise


def test_ddpm_loss_is_ho_algorithm_1(x64):
    """Ho et al. 2020, Alg. 1: i ~ U{1..N}, ||eps - eps_theta(sqrt(ab_i) x0 + sqrt(1 - ab_i) eps, i)||^2."""
    process = P.DDPM(num_steps=50)
    x0 = jax.random.normal(rng(8), SMALL_BATCH)
    key = rng(9)

    def eps_network(params, x, step_index, **unused):  # conditioned on the 0-based step i - 1
        return params * x + 0.01 * step_index[:, None]

    loss, aux = make_loss(
        process=process,
        parameterization="eps",
        apply_fn=eps_network,
        weighting="simple",
        time_input="index",
        time_sampling="discrete",
        reduction="sum",
    )(0.3, {"x": x0}, key)

    key_time, key_noise = loss_keys(key)
    step = np.asarray(jax.random.randint(key_time, SMALL_BATCH[:1], 0, 50)) + 1  # i in 1..N
    alphas_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 50))[step - 1][:, None]
    eps = jax.random.normal(key_noise, x0.shape)
    x_t = np.sqrt(alphas_bar) * x0 + np.sqrt(1.0 - alphas_bar) * eps
    by_hand = np.mean(np.sum((eps - eps_network(0.3, x_t, step - 1.0)) ** 2, axis=1))
    np.testing.assert_allclose(loss, by_hand, rtol=1e-10)
    np.testing.assert_allclose(aux["eps_mse"], by_hand, rtol=1e-10)


def test_smld_loss_is_twice_ncsn(x64):
    """Song & Ermon 2019, eqs. 5-6 with lambda = sigma^2: (1/2) sigma_i^2 ||s_theta + (x~ - x)/sigma_i^2||^2
    at a uniform level i; ours has no factor 1/2."""
    process = P.SMLD(num_levels=10)
    x0 = jax.random.normal(rng(10), SMALL_BATCH)
    key = rng(11)

    def score_network(params, x, level, **unused):  # NCSN level index, 0 = largest sigma
        return -params * x / (1.0 + level[:, None])

    loss, _ = make_loss(
        process=process,
        parameterization="score",
        apply_fn=score_network,
        weighting="sigma_sq",
        time_input="index",
        time_sampling="discrete",
        reduction="sum",
    )(2.0, {"x": x0}, key)

    key_time, key_noise = loss_keys(key)
    # Index into chain_times (increasing noise).
    chain_index = np.asarray(jax.random.randint(key_time, SMALL_BATCH[:1], 0, 10))
    level = 9 - chain_index  # NCSN's i - 1: sigma_1 = 1 is level 0
    sigma = np.geomspace(1.0, 0.01, 10)[level][:, None]
    perturbed = x0 + sigma * jax.random.normal(key_noise, x0.shape)
    score = score_network(2.0, perturbed, jnp.asarray(level, jnp.float64))
    ncsn = np.mean(0.5 * np.sum(sigma**2 * (score + (perturbed - x0) / sigma**2) ** 2, axis=1))
    np.testing.assert_allclose(loss, 2.0 * ncsn, rtol=1e-10)


def test_edm_loss_is_karras_equation_8(x64):
    """Karras et al. 2022, eq. 8 with Table 1: ln sigma ~ N(-1.2, 1.2^2), lambda(sigma) ||D(y + n) - y||^2,
    D = c_skip x + c_out F(c_in x, ln(sigma) / 4)."""
    x0 = 0.5 * jax.random.normal(rng(12), SMALL_BATCH)
    key = rng(13)

    def network(params, x_in, c_noise, **unused):
        return jnp.tanh(params * x_in) * (1.0 + c_noise[:, None])

    loss, _ = make_loss(
        process=P.EDM(),
        parameterization="edm",
        apply_fn=network,
        time_input="quarter_log_sigma",
        weighting="edm",
        time_sampling="log_normal",
        reduction="sum",
    )(1.5, {"x": x0}, key)

    key_time, key_noise = loss_keys(key)
    sigma = np.exp(-1.2 + 1.2 * np.asarray(jax.random.normal(key_time, SMALL_BATCH[:1])))
    sigma = np.clip(sigma, 0.002, 80.0)[:, None]
    noisy = x0 + sigma * jax.random.normal(key_noise, x0.shape)
    c_skip = 0.25 / (sigma**2 + 0.25)
    c_out = sigma * 0.5 / np.sqrt(sigma**2 + 0.25)
    c_in = 1.0 / np.sqrt(sigma**2 + 0.25)
    denoised = c_skip * noisy + c_out * network(1.5, c_in * noisy, np.log(sigma[:, 0]) / 4)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    np.testing.assert_allclose(
        loss, np.mean(np.sum(weight * (denoised - x0) ** 2, axis=1)), rtol=1e-10
    )


def test_flow_matching_loss_is_the_conditional_flow_matching_objective(x64):
    """Lipman et al. 2022, eq. 23 / Liu et al. 2022, Alg. 1: ||(eps - x0) - v_theta((1 - t) x0 +
    t eps, t)||^2 at t ~ U[t_min, T], recomputed by hand, is the velocity parameterization with the
    'velocity' weighting on the flow process."""
    process = P.RectifiedFlow()
    x0 = jax.random.normal(rng(30), SMALL_BATCH)
    key = rng(31)

    def velocity_network(params, x, t, **unused):
        return params * x - 0.2 * t[:, None]

    loss, aux = make_loss(
        process=process,
        parameterization="velocity",
        apply_fn=velocity_network,
        weighting="velocity",
        reduction="sum",
    )(0.7, {"x": x0}, key)
    key_time, key_noise = loss_keys(key)
    t = process.t_min + (process.T - process.t_min) * jax.random.uniform(key_time, SMALL_BATCH[:1])
    eps = jax.random.normal(key_noise, x0.shape)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    by_hand = np.mean(np.sum((eps - x0 - velocity_network(0.7, x_t, t)) ** 2, axis=1))
    np.testing.assert_allclose(loss, by_hand, rtol=1e-10)
    # The eps-MSE of the same prediction: ||u - u_hat||^2 = ||eps - eps_hat||^2 / (1 - t)^2.
    u_error = np.sum((eps - x0 - velocity_network(0.7, x_t, t)) ** 2, axis=1)
    np.testing.assert_allclose(aux["eps_mse"], np.mean(u_error * (1 - t) ** 2), rtol=1e-10)


# ================================================================================ time laws
@pytest.mark.parametrize(
    "process", [P.DDPM(num_steps=20), P.SMLD(num_levels=7)], ids=["ddpm", "smld"]
)
def test_discrete_times_are_uniform_on_the_chain(process):
    """Only chain times, with uniform frequencies (chi-square p > 1e-3 for 20000 draws)."""
    t, weight = L.sample_time("discrete", process, rng(14), 20000)
    chain_times = np.asarray(process.chain_times, np.float32)
    matches = np.asarray(t)[:, None] == chain_times[None]
    assert np.all(matches.sum(axis=1) == 1)
    assert stats.chisquare(matches.sum(axis=0)).pvalue > 1e-3
    assert np.all(np.asarray(weight) == 1.0)


def test_importance_times_have_uniform_log_snr(x64):
    """Density proportional to g^2/sigma^2 = -2 dlambda/dt <=> lambda(t) uniform (KS p > 1e-3)."""
    process = P.VPSDE()
    t, weight = L.sample_time("importance", process, rng(15), 5000)
    t = np.asarray(t)
    assert process.t_min <= t.min() and t.max() <= process.T
    low, high = float(process.log_snr(process.T)), float(process.log_snr(process.t_min))
    log_snr = np.asarray(process.log_snr(t))
    assert stats.kstest(log_snr, stats.uniform(low, high - low).cdf).pvalue > 1e-3
    # weight = (1 / (T - t_min)) / p(t) with p(t) = beta(t) / (2 sigma^2 (high - low)) (VP: g^2 = beta).
    _, sigma, g_sq = vp_closed_form(t)
    np.testing.assert_allclose(
        weight, 2.0 * sigma**2 * (high - low) / (g_sq * (1.0 - process.t_min)), rtol=1e-6
    )


def test_log_normal_times_have_log_normal_sigma_hat():
    """EDM: ln sigma ~ N(-1.2, 1.2^2) (KS p > 1e-3; clipping at 0.002 / 80 has mass 1.4e-5)."""
    t, _ = L.sample_time("log_normal", P.EDM(), rng(16), 5000)
    assert stats.kstest(np.log(np.asarray(t)), stats.norm(-1.2, 1.2).cdf).pvalue > 1e-3


def test_logit_normal_times_have_logit_normal_fractions():
    """Esser et al. 2024, Sec. 3.1: logit((t - t_min) / (T - t_min)) ~ N(0, 1) (KS p > 1e-3)."""
    process = P.RectifiedFlow()
    t, weight = L.sample_time("logit_normal", process, rng(32), 5000)
    fraction = (np.asarray(t, np.float64) - process.t_min) / (process.T - process.t_min)
    assert stats.kstest(np.log(fraction / (1 - fraction)), stats.norm(0, 1).cdf).pvalue > 1e-3
    assert np.all(np.asarray(weight) == 1.0)


# ================================================================================ labels
def test_drop_labels_frequency():
    labels = jnp.arange(20000) % 3
    dropped = np.asarray(L.drop_labels(rng(17), labels, 0.3, 3))
    is_null = dropped == 3
    assert np.all(dropped[~is_null] == np.asarray(labels)[~is_null])
    assert abs(is_null.mean() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 20000)


def test_labels_reach_the_network_only_when_conditional(x64):
    x0 = jax.random.normal(rng(18), SMALL_BATCH)
    batch = {"x": x0, "label": jnp.arange(SMALL_BATCH[0]) % 3}
    key = rng(19)

    def unconditional(params, x, t):  # no y keyword: a label would raise TypeError
        return params * x

    def conditional(params, x, t, y, **unused):
        return params * x + 0.1 * y[:, None]

    def make(apply_fn, **options):
        return make_loss(
            process=P.VPSDE(),
            parameterization="eps",
            apply_fn=apply_fn,
            weighting="simple",
            **options,
        )

    assert np.isfinite(make(unconditional)(0.5, batch, key, train=False)[0])
    always_dropped = make(conditional, num_classes=3, label_dropout=1.0)
    null_labels = {"x": x0, "label": jnp.full(SMALL_BATCH[0], 3)}
    as_null = make(conditional, num_classes=3)(0.5, null_labels, key)
    assert always_dropped(0.5, batch, key)[0] == as_null[0]  # label dropout when training
    assert always_dropped(0.5, batch, key, train=False)[0] != as_null[0]  # and only then


# ================================================================================ validation
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"weighting": "elbo"}, "'elbo'"),
        ({"time_sampling": "cosine"}, "'cosine'"),
        ({"reduction": "max"}, "'max'"),
        ({"parameterization": "noise"}, "'noise'"),
        ({"time_input": "step"}, "'step'"),
        ({"time_sampling": "discrete"}, "VPSDE"),
        (
            {"process": P.DDPM(), "weighting": "likelihood", "time_sampling": "discrete"},
            "likelihood",
        ),
        ({"min_snr_gamma": 0.0}, "min_snr_gamma"),
        ({"log_normal_std": -1.0}, "log_normal_std"),
        ({"label_dropout": 0.1}, "num_classes"),
        ({"num_classes": 3, "label_dropout": 1.5}, "1.5"),
        ({"num_classes": 0}, "num_classes"),
        ({"process": "vp"}, "'vp'"),
    ],
)
def test_bad_configurations_raise(options, message):
    config = {
        "process": P.VPSDE(),
        "parameterization": "eps",
        "apply_fn": lambda params, x, t: x,
        "weighting": "simple",
    }
    with pytest.raises(ValueError, match=message) as error:
        make_loss(**(config | options))
    if "weighting" in options and options["weighting"] == "elbo":
        assert "likelihood" in str(error.value)  # lists the accepted values


def test_missing_data_or_labels_raise():
    loss_fn = make_loss(
        process=P.VPSDE(),
        parameterization="eps",
        apply_fn=lambda params, x, t, y: x,
        weighting="simple",
        num_classes=2,
    )
    with pytest.raises(ValueError, match="'image' or 'x'"):
        loss_fn(None, {"data": jnp.zeros((2, 2)), "label": jnp.zeros(2, int)}, rng(0))
    with pytest.raises(ValueError, match="'label'"):
        loss_fn(None, {"x": jnp.zeros((2, 2))}, rng(0))


# ================================================================================ real networks
@pytest.mark.parametrize("network", ["mlp", "unet"])
def test_real_network_loss_and_gradients_are_finite_under_jit(network):
    """MLP on labelled 2-D points (VP, eps) and a tiny U-Net on 8x8x1 images (EDM): finite loss and
    gradients under jit, and dropout active with train=True (the loss differs from train=False)."""
    if network == "mlp":
        model = MLP(width=32, num_blocks=1, embedding_dim=16, dropout=0.5, num_classes=2)
        x = jax.random.normal(rng(20), (16, 2))
        batch = {"x": x, "label": jnp.arange(16) % 2}
        options = {"num_classes": 2, "label_dropout": 0.2, "time_input": "999t"}
        process, parameterization, weighting = P.VPSDE(), "eps", "simple"
    else:
        model = UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.5)
        x = jax.random.uniform(rng(21), (4, 8, 8, 1), minval=-1.0)
        batch = {"image": x}
        options = {"time_sampling": "log_normal", "time_input": "quarter_log_sigma"}
        process, parameterization, weighting = P.EDM(), "edm", "edm"
    loss_fn = make_loss(
        process=process,
        parameterization=parameterization,
        apply_fn=model.apply,
        weighting=weighting,
        **options,
    )
    key = rng(1)

    @jax.jit
    def initial_params():
        params = model.init(rng(0), x, jnp.zeros(x.shape[0]))
        # Move off the zero-initialised output layers, at which the output is 0 whatever dropout.
        return jax.tree_util.tree_map(
            lambda leaf: leaf + 0.1 * jnp.cos(1.3 * jnp.arange(leaf.size).reshape(leaf.shape)),
            params,
        )

    @jax.jit
    def train_and_eval(params):
        train = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        return train, loss_fn(params, batch, key, train=False)[0]

    ((loss, aux), grads), eval_loss = train_and_eval(initial_params())
    assert np.isfinite(loss) and np.isfinite(aux["eps_mse"])
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(grads))
    assert any(np.any(leaf != 0) for leaf in jax.tree_util.tree_leaves(grads))
    # Same key, so same t and eps: only dropout (and label dropout) tells the two apart.
    assert abs(float(eval_loss) - float(loss)) > 1e-4 * float(loss)
