"""Forward processes against independent truths: closed forms, finite differences, simulation, Bayes."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion import processes as P

ALL = list(P.PROCESSES)  # every registered process


def interior_times(process, num=9):
    """Times strictly inside [t_min, T], avoiding DDPM's knots (its log alpha has kinks there)."""
    t = np.linspace(process.t_min, process.T, num + 2)[1:-1]
    if isinstance(process, P.DDPM):
        n = process.num_steps
        t = (np.floor(t * n) + 0.5) / n
    return jnp.asarray(t)


# --------------------------------------------------------------------------- SDE vs marginals
@pytest.mark.parametrize("name", ALL)
def test_euler_maruyama_simulation_matches_marginal_mean_and_std(name, x64):
    """Simulate dx = f x dt + g dW from N(alpha x0, sigma^2) at t_min; compare moments at later t."""
    process = P.make_process(name)
    x0, num_paths = 1.5, 20000
    # alpha -> 0 at T for cosine and flow: f and g^2 blow up there, too stiff for this simulation.
    t_end = min(process.T, 0.9) if name in ("cosine", "flow") else process.T
    checkpoints = process.t_min + (t_end - process.t_min) * np.array([0.1, 0.3, 0.6, 1.0])
    steps_per_segment = 1000

    @jax.jit
    def simulate(key, x, t_start, t_stop):
        dt = (t_stop - t_start) / steps_per_segment

        def step(x, inputs):
            k, t = inputs
            drift, diffusion = process.sde(x, t)
            return x + drift * dt + diffusion * jnp.sqrt(dt) * jax.random.normal(k, x.shape), None

        times = t_start + dt * jnp.arange(steps_per_segment)
        keys = jax.random.split(key, steps_per_segment)
        return jax.lax.scan(step, x, (keys, times))[0]

    key = jax.random.PRNGKey(0)
    key, init_key = jax.random.split(key)
    t0 = process.t_min
    x = process.alpha(t0) * x0 + process.sigma(t0) * jax.random.normal(init_key, (num_paths,))
    t_prev = t0
    for t in checkpoints:
        key, sub = jax.random.split(key)
        x = simulate(sub, x, t_prev, t)
        t_prev = t
        mean, std = float(process.alpha(t)) * x0, float(process.sigma(t))
        # 5 standard errors of the sample mean / sample std (std error of s is ~ std / sqrt(2 n)).
        assert abs(float(x.mean()) - mean) < 5 * std / math.sqrt(num_paths), (t, x.mean(), mean)
        assert abs(float(x.std()) - std) < 5 * std / math.sqrt(2 * num_paths), (t, x.std(), std)


# --------------------------------------------------------------------------- f and g^2
@pytest.mark.parametrize("name", ALL)
def test_diffusion_sq_equals_finite_difference_identity(name, x64):
    """g^2 = d sigma^2/dt - 2 (d log alpha/dt) sigma^2, by central differences of alpha and sigma."""
    process = P.make_process(name)
    t = interior_times(process)
    h = 1e-6 * (process.T - process.t_min)
    d_sigma_sq = (process.sigma(t + h) ** 2 - process.sigma(t - h) ** 2) / (2 * h)
    d_log_alpha = (jnp.log(process.alpha(t + h)) - jnp.log(process.alpha(t - h))) / (2 * h)
    g_sq_fd = d_sigma_sq - 2 * d_log_alpha * process.sigma(t) ** 2
    np.testing.assert_allclose(process.diffusion_sq(t), g_sq_fd, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(process.drift_coef(t), d_log_alpha, rtol=1e-6, atol=1e-9)


def test_drift_and_diffusion_closed_forms(x64):
    """Song et al. 2021 eqs. 30-34, Karras et al. 2022 (sigma = t), and DDPM's piecewise view."""
    t = jnp.linspace(0.05, 0.95, 7)
    vp = P.VPSDE()
    beta = 0.1 + t * (20.0 - 0.1)
    np.testing.assert_allclose(vp.drift_coef(t), -beta / 2, rtol=1e-12)
    np.testing.assert_allclose(vp.diffusion_sq(t), beta, rtol=1e-12)
    integral = 0.1 * t + 0.5 * (20.0 - 0.1) * t**2
    np.testing.assert_allclose(P.SubVPSDE().diffusion_sq(t), beta * (1 - jnp.exp(-2 * integral)))
    ve = P.VESDE()
    np.testing.assert_allclose(ve.diffusion_sq(t), 2 * math.log(5000.0) * ve.sigma(t) ** 2)
    # g / sigma = sqrt(2 ln(sigma_max / sigma_min)) = 4.127273 for score_sde's 0.01 -> 50.
    np.testing.assert_allclose(ve.diffusion(t) / ve.sigma(t), 4.127273, rtol=2e-7)
    np.testing.assert_allclose(ve.drift_coef(t), 0.0)
    edm_t = jnp.array([0.01, 1.0, 40.0])
    np.testing.assert_allclose(P.EDM().diffusion_sq(edm_t), 2 * edm_t, rtol=1e-12)
    cosine = P.CosineVP()
    theta = (t + 0.008) / 1.008 * math.pi / 2
    np.testing.assert_allclose(cosine.diffusion_sq(t), math.pi / 1.008 * jnp.tan(theta), rtol=1e-10)
    ddpm = P.DDPM(num_steps=100)
    i = jnp.array([1, 17, 60, 100])
    mid = (i - 0.5) / 100
    np.testing.assert_allclose(
        ddpm.diffusion_sq(mid), -100 * np.log1p(-ddpm.betas[np.asarray(i) - 1]), rtol=1e-10
    )


# --------------------------------------------------------------------------- log-SNR
@pytest.mark.parametrize("name", ALL)
def test_log_snr_round_trip_and_monotone(name, x64):
    process = P.make_process(name)
    t = jnp.linspace(process.t_min, process.T, 2001)
    if process.t_min == 0.0 and not isinstance(process, P.VESDE):
        t = t[1:]
    log_snr = process.log_snr(t)
    assert bool(jnp.all(jnp.diff(log_snr) < 0)), "lambda must decrease strictly"
    np.testing.assert_allclose(process.t_from_log_snr(log_snr), t, atol=1e-6)
    lam = jnp.linspace(log_snr[-1], log_snr[0], 101)
    np.testing.assert_allclose(process.log_snr(process.t_from_log_snr(lam)), lam, atol=1e-6)


def test_generic_bisection_inverse_matches_closed_form(x64):
    """A user-defined process that only states alpha and sigma still inverts lambda(t)."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class PlainVP(P.Process):
        t_min: float = 1e-4
        T: float = 1.0

        @property
        def sampling_t_end(self):
            return 1e-3

        def log_alpha(self, t):
            return -0.25 * t**2 * 19.9 - 0.05 * t

        def log_sigma(self, t):
            return 0.5 * jnp.log1p(-jnp.exp(2 * self.log_alpha(t)))

    plain, reference = PlainVP(), P.VPSDE()
    t = jnp.linspace(1e-4, 1.0, 257)
    np.testing.assert_allclose(plain.t_from_log_snr(reference.log_snr(t)), t, atol=1e-10)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_rectified_flow_is_the_straight_path(shift, x64):
    """Liu et al. 2022, eq. 1: x_t = (1 - s) x0 + s eps with s = t, or s = k t / (1 + (k - 1) t)
    (Esser et al. 2024, Sec. 5.3). The SDE with these marginals has f = -s'/(1 - s) and
    g^2 = 2 s s' / (1 - s) (from f = d log alpha/dt, g^2 = d sigma^2/dt - 2 f sigma^2 by hand), and
    the shifted path is the plain one at time s(t)."""
    flow = P.RectifiedFlow(shift=shift)
    t = jnp.linspace(0.01, 0.99, 9)
    s = shift * t / (1 + (shift - 1) * t)
    ds_dt = shift / (1 + (shift - 1) * t) ** 2
    np.testing.assert_allclose(flow.alpha(t), 1 - s, rtol=1e-12)
    np.testing.assert_allclose(flow.sigma(t), s, rtol=1e-12)
    np.testing.assert_allclose(flow.drift_coef(t), -ds_dt / (1 - s), rtol=1e-10)
    np.testing.assert_allclose(flow.diffusion_sq(t), 2 * s * ds_dt / (1 - s), rtol=1e-10)
    plain = P.RectifiedFlow()
    np.testing.assert_allclose(flow.log_snr(t), plain.log_snr(s), rtol=1e-12)
    np.testing.assert_allclose(flow.t_from_log_snr(plain.log_snr(s)), t, rtol=1e-10)


# --------------------------------------------------------------------------- two-time kernels
@pytest.mark.parametrize("name", ALL)
def test_transitions_compose(name, x64):
    """Chapman-Kolmogorov: q(x_u | x_s) = int q(x_u | x_t) q(x_t | x_s) dx_t for s < t < u."""
    process = P.make_process(name)
    s, t, u = np.quantile(np.asarray(interior_times(process)), [0.1, 0.5, 0.9])
    scale_st, std_st = process.transition(s, t)
    scale_tu, std_tu = process.transition(t, u)
    scale_su, std_su = process.transition(s, u)
    np.testing.assert_allclose(scale_su, scale_tu * scale_st, rtol=1e-12)
    np.testing.assert_allclose(std_su**2, scale_tu**2 * std_st**2 + std_tu**2, rtol=1e-10)
    # and transitions applied to q(x_s | x_0) give q(x_t | x_0)
    np.testing.assert_allclose(process.alpha(t), scale_st * process.alpha(s), rtol=1e-12)
    np.testing.assert_allclose(
        process.sigma(t) ** 2, scale_st**2 * process.sigma(s) ** 2 + std_st**2, rtol=1e-10
    )


def _bayes_posterior_by_quadrature(x0, xt, prior_mean, prior_std, scale, noise_std):
    """Mean and std of p(x_s | x_t, x_0) propto N(x_t; scale x_s, noise^2) N(x_s; prior) on a grid."""
    center = prior_mean
    width = 12 * prior_std
    grid = np.linspace(center - width, center + width, 200001)
    log_w = stats.norm.logpdf(xt, scale * grid, noise_std) + stats.norm.logpdf(
        grid, prior_mean, prior_std
    )
    w = np.exp(log_w - log_w.max())
    mean = np.trapezoid(w * grid, grid) / np.trapezoid(w, grid)
    var = np.trapezoid(w * (grid - mean) ** 2, grid) / np.trapezoid(w, grid)
    return mean, math.sqrt(var)


@pytest.mark.parametrize("name", ALL)
def test_posterior_equals_bayes_rule_numerically(name, x64):
    process = P.make_process(name)
    s, t = np.quantile(np.asarray(interior_times(process)), [0.3, 0.6])
    x0, xt = 0.7, -0.4
    alpha_s, sigma_s = float(process.alpha(s)), float(process.sigma(s))
    alpha_t, sigma_t = float(process.alpha(t)), float(process.sigma(t))
    scale = alpha_t / alpha_s
    noise_std = math.sqrt(sigma_t**2 - scale**2 * sigma_s**2)
    mean, std = _bayes_posterior_by_quadrature(x0, xt, alpha_s * x0, sigma_s, scale, noise_std)
    coef_x0, coef_xt, post_std = process.posterior(s, t)
    np.testing.assert_allclose(coef_x0 * x0 + coef_xt * xt, mean, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(post_std, std, rtol=1e-7)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "quadratic"])
def test_ddpm_one_step_kernels_are_the_textbook_ones(schedule, x64):
    """Ho et al. 2020 eqs. 2, 4, 6, 7, computed from the betas alone (docs/references.md
    #ddpm-marginal-from-the-chain, #posterior-of-ddpm-by-gaussian-conditioning,
    #posterior-variance-and-the-first-step)."""
    ddpm = P.DDPM(schedule=schedule, num_steps=1000)
    betas = ddpm.betas
    alphas_bar = np.cumprod(1 - betas)
    alphas_bar_prev = np.concatenate([[1.0], alphas_bar[:-1]])
    t_prev = np.arange(0, 1000) / 1000
    t = np.arange(1, 1001) / 1000

    scale, std = ddpm.transition(t_prev, t)
    np.testing.assert_allclose(scale, np.sqrt(1 - betas), rtol=1e-12)
    np.testing.assert_allclose(std, np.sqrt(betas), rtol=1e-9)
    np.testing.assert_allclose(ddpm.alpha(t) ** 2, alphas_bar, rtol=1e-10)

    # Composing one-step kernels: mean coefficient prod sqrt(1 - beta), variance recursion.
    variance = np.zeros(1000)
    v = 0.0
    for i in range(1000):
        v = (1 - betas[i]) * v + betas[i]
        variance[i] = v
    np.testing.assert_allclose(np.cumprod(scale), np.sqrt(alphas_bar), rtol=1e-10)
    np.testing.assert_allclose(ddpm.sigma(t) ** 2, variance, rtol=1e-9)
    np.testing.assert_allclose(variance, 1 - alphas_bar, rtol=1e-10)

    coef_x0, coef_xt, post_std = ddpm.posterior(t_prev, t)
    np.testing.assert_allclose(
        coef_x0, np.sqrt(alphas_bar_prev) * betas / (1 - alphas_bar), rtol=1e-8
    )
    np.testing.assert_allclose(
        coef_xt, np.sqrt(1 - betas) * (1 - alphas_bar_prev) / (1 - alphas_bar), rtol=1e-9
    )
    beta_tilde = (1 - alphas_bar_prev) / (1 - alphas_bar) * betas
    np.testing.assert_allclose(post_std**2, beta_tilde, rtol=1e-8, atol=1e-15)
    # beta-tilde_1 = 0 (docs/references.md #posterior-variance-and-the-first-step)
    assert float(post_std[0]) == 0.0
    # precision form 1/beta_tilde = alpha/beta + 1/(1 - alpha_bar_prev) (Higham et al. eq. 15)
    np.testing.assert_allclose(
        1 / post_std[1:] ** 2,
        (1 - betas[1:]) / betas[1:] + 1 / (1 - alphas_bar_prev[1:]),
        rtol=1e-8,
    )
    np.testing.assert_allclose(ddpm.ancestral_std(t_prev, t, "beta"), np.sqrt(betas), rtol=1e-9)
    np.testing.assert_allclose(ddpm.ancestral_std(t_prev, t, "beta_tilde"), post_std)
    assert bool(jnp.all(post_std**2 <= betas + 1e-15))


def test_reference_schedule_values(x64):
    """docs/references.md #ddpm-linear-schedule-values, #cosine-schedule-values (computed in
    float64 there; re-derived here from the definitions)."""
    np.testing.assert_allclose(P.DDPM(num_steps=1000).alphas_bar[-1], 4.035830e-05, rtol=1e-6)
    np.testing.assert_allclose(P.DDPM(num_steps=500).alphas_bar[-1], 6.352711e-03, rtol=1e-6)
    cosine = P.DDPM(schedule="cosine", num_steps=1000)
    np.testing.assert_allclose(cosine.alphas_bar[0], 0.99995872, rtol=1e-8)
    np.testing.assert_allclose(cosine.betas[0], 4.128422e-05, rtol=1e-6)
    np.testing.assert_allclose(cosine.alphas_bar[499], 0.493844, rtol=1e-5)
    assert cosine.betas[-1] == 0.999
    np.testing.assert_allclose(cosine.alphas_bar[-1], 2.428767e-09, rtol=1e-6)
    np.testing.assert_allclose(
        P.DDPM(schedule="cosine", num_steps=4000).betas[0], 9.865819e-06, rtol=1e-6
    )
    log_snr = P.DDPM(num_steps=1000).log_snr(jnp.array([1e-3, 1.0]))
    np.testing.assert_allclose(2 * log_snr, [9.210, -10.118], atol=1e-3)
    # The linear 1e-4 -> 0.02 schedule sums to int_0^1 beta(t) dt = 10.05 (docs/references.md
    # #ddpm-as-a-discretised-vp-sde).
    np.testing.assert_allclose(P.DDPM(num_steps=1000).betas.sum(), 10.05, rtol=1e-12)


def test_ddpm_converges_to_vp_sde_like_one_over_n(x64):
    """beta_i = beta(t_i)/N: alpha_bar of the chain -> VP alpha^2 with error O(1/N)
    (docs/references.md #ddpm-as-a-discretised-vp-sde)."""
    vp = P.VPSDE()
    t = jnp.array([0.25, 0.5, 1.0])
    sizes = np.array([250, 500, 1000, 2000, 4000])
    errors = []
    for n in sizes:
        ddpm = P.DDPM(num_steps=int(n), beta_start=0.1 / n, beta_end=20.0 / n)
        errors.append(float(jnp.max(jnp.abs(2 * ddpm.log_alpha(t) - 2 * vp.log_alpha(t)))))
    slope = np.polyfit(np.log(sizes), np.log(errors), 1)[0]
    assert abs(slope + 1) < 0.1, (slope, errors)
    # N = 1000 is Ho et al.'s schedule: log alpha_bar_N = -10.1178 against -10.05
    # (docs/references.md #ddpm-as-a-discretised-vp-sde).
    ho = P.DDPM(num_steps=1000)
    np.testing.assert_allclose(2 * ho.log_alpha(1.0), -10.1178, atol=1e-4)
    np.testing.assert_allclose(2 * vp.log_alpha(1.0), -10.05, atol=1e-12)


def test_smld_levels_sit_on_the_ve_sde(x64):
    smld = P.SMLD()
    reference = [1, 0.59948, 0.35938, 0.21544, 0.12915, 0.07743, 0.04642, 0.02783, 0.01668, 0.01]
    # docs/references.md #noise-levels-and-time-grids
    np.testing.assert_allclose(smld.sigmas, reference, atol=6e-6)
    ve = P.VESDE(sigma_min=0.01, sigma_max=1.0)
    np.testing.assert_allclose(ve.sigma(smld.chain_times), smld.sigmas[::-1], rtol=1e-12)
    np.testing.assert_allclose(smld.sigma(smld.chain_times), smld.sigmas[::-1], rtol=1e-12)
    np.testing.assert_allclose(
        smld.network_index(smld.chain_times), np.arange(9, -1, -1), atol=1e-12
    )
    # Song et al. 2021 eq. 8: x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z (increasing noise).
    up = smld.sigmas[::-1]
    scale, std = smld.transition(smld.chain_times[:-1], smld.chain_times[1:])
    np.testing.assert_allclose(scale, 1.0)
    np.testing.assert_allclose(std, np.sqrt(up[1:] ** 2 - up[:-1] ** 2), rtol=1e-10)
    ncsnv2 = P.SMLD(num_levels=232, sigma_min=0.01, sigma_max=50.0)
    np.testing.assert_allclose(ncsnv2.sigmas[[0, -1]], [50.0, 0.01], rtol=1e-12)


def test_ddpm_network_index_and_chain_times():
    ddpm = P.DDPM(num_steps=500)
    np.testing.assert_allclose(ddpm.network_index(ddpm.chain_times), np.arange(500), atol=1e-3)
    assert ddpm.t_min == 1 / 500 and ddpm.T == 1.0


# --------------------------------------------------------------------------- marginals and prior
@pytest.mark.parametrize("name", ALL)
def test_marginal_sampler_and_prior(name, x64):
    process = P.make_process(name)
    x0 = jnp.arange(12.0).reshape(3, 2, 2, 1) / 10
    t = jnp.array([process.t_min, 0.5 * (process.t_min + process.T), process.T])
    xt, eps = process.sample_marginal(jax.random.PRNGKey(1), x0, t)
    assert xt.shape == x0.shape and eps.shape == x0.shape
    expected = (
        process.alpha(t)[:, None, None, None] * x0 + process.sigma(t)[:, None, None, None] * eps
    )
    np.testing.assert_allclose(xt, expected, rtol=1e-12)

    x = process.prior_sample(jax.random.PRNGKey(2), (4, 3))
    logp = process.prior_logp(x)
    np.testing.assert_allclose(
        logp, stats.norm.logpdf(np.asarray(x), 0, process.prior_std).sum(axis=1), rtol=1e-12
    )
    big = process.prior_sample(jax.random.PRNGKey(3), (200000,))
    assert abs(float(big.std()) / process.prior_std - 1) < 5 / math.sqrt(2 * 200000)


def test_prior_std_conventions(x64):
    assert P.VPSDE().prior_std == pytest.approx(1.0, abs=1e-12)
    assert P.DDPM(num_steps=500).prior_std == pytest.approx(1.0, abs=1e-12)
    assert P.SubVPSDE().prior_std == 1.0
    assert P.VESDE().prior_std == pytest.approx(50.0, rel=1e-12)
    assert P.EDM().prior_std == 80.0


@pytest.mark.parametrize("name", ALL)
def test_prior_works_under_jit(name):
    process = P.make_process(name)
    x = jnp.ones((2, 3))
    np.testing.assert_allclose(jax.jit(process.prior_logp)(x), process.prior_logp(x), rtol=1e-6)


def test_processes_are_hashable_static_arguments():
    process = P.DDPM(num_steps=10)
    assert hash(process) == hash(P.DDPM(num_steps=10)) and process == P.DDPM(num_steps=10)
    fn = jax.jit(lambda p, t: p.log_snr(t), static_argnums=0)
    np.testing.assert_allclose(fn(process, jnp.array([0.5])), process.log_snr(jnp.array([0.5])))


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: P.VPSDE(beta_min=-1.0), "beta_min=-1.0"),
        (lambda: P.VPSDE(beta_min=5.0, beta_max=1.0), "beta_max=1.0"),
        (lambda: P.SubVPSDE(beta_min=0.0), "beta_min=0.0"),
        (lambda: P.VPSDE(t_min=0.5, T=0.2), "t_min=0.5"),
        (lambda: P.VESDE(sigma_min=2.0, sigma_max=1.0), "sigma_min=2.0"),
        (lambda: P.CosineVP(T=1.0), "T=1.0"),
        (lambda: P.DDPM(num_steps=0), "num_steps=0"),
        (lambda: P.DDPM(schedule="sigmoid"), "'sigmoid'"),
        (lambda: P.DDPM(beta_start=0.5, beta_end=0.1), "beta_start=0.5"),
        (lambda: P.SMLD(num_levels=1), "num_levels=1"),
        (lambda: P.EDM(sigma_min=0.0), "sigma_min=0.0"),
        (lambda: P.make_process("foo"), "'foo'"),
        (lambda: P.make_process("vp", sigma_max=3.0), "sigma_max"),
        (lambda: P.VPSDE().check_times(1.5), "1.5"),
        (lambda: P.VPSDE().ancestral_std(0.1, 0.2, "large"), "'large'"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(build, fragment):
    with pytest.raises(ValueError, match=None) as info:
        build()
    assert fragment in str(info.value)
