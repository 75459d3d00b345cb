"""Samplers against exact truths: closed-form flows, published algorithms replayed with the same noise,
convergence orders against the oracle's exact probability-flow map, and the steps' own formulas."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import oracle as O
from diffusion import processes as P
from diffusion.flow import ode_end_at_zero_noise
from diffusion.parameterization import Denoiser
from diffusion.samplers import (
    CONTINUOUS_GRIDS,
    SampleResult,
    final_denoise,
    get_sampler,
    sample,
    sampler_program,
    time_grid,
)
from diffusion.samplers.sde import (
    annealed_langevin_corrector_step,
    euler_maruyama_step,
    langevin_corrector_step,
    reverse_diffusion_step,
)

ALL_PROCESSES = list(P.PROCESSES)  # every registered process


def rmse(a, b):
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def fitted_order(num_steps, errors):
    """Slope of log error against log step size (= -slope against log num_steps)."""
    return -np.polyfit(np.log(num_steps), np.log(errors), 1)[0]


def normal_like(key, x):
    return np.asarray(jax.random.normal(key, x.shape, x.dtype))


# ================================================================================ convergence
@pytest.mark.parametrize(
    ("process_name", "grid"),
    [("vp", "uniform_log_snr"), ("subvp", "uniform_t"), ("ve", "uniform_t")],
)
def test_probability_flow_solvers_converge_at_their_order(process_name, grid, x64):
    """Global error against the exact flow of Gaussian data (docs/references.md #gaussian-data)
    from the same x_T."""
    process = P.make_process(process_name)
    oracle = O.preset("gaussian_2d")
    denoiser = oracle.denoiser(process)
    x_init = process.prior_sample(jax.random.PRNGKey(0), (64, 2))
    exact = oracle.ode_flow(process, x_init, process.T, process.sampling_t_end)
    steps = [32, 64, 128]
    for name, order in [("euler", 1), ("ddim", 1), ("heun", 2)]:
        errors = [
            rmse(
                sample(
                    name, denoiser, jax.random.PRNGKey(1), x_init, grid=grid, num_steps=n
                ).samples,
                exact,
            )
            for n in steps
        ]
        assert abs(fitted_order(steps, errors) - order) < 0.3, (name, errors)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddim", "dpm_solver_pp_2m", "unipc"])
def test_recorded_trajectory_follows_the_exact_flow(name, x64):
    """Every state of a recorded trajectory is the exact probability-flow solution of Gaussian data
    at its grid time (docs/references.md #gaussian-data) up to the solver's error, which halves (or
    better) when the grid is refined twice over; without a corrector, its denoised outputs are the
    exact x0 predictions at those states (to the float32 rounding of the grid times)."""
    process = P.make_process("vp")
    oracle = O.preset("gaussian_2d")
    denoiser = oracle.denoiser(process)
    x_init = process.prior_sample(jax.random.PRNGKey(0), (16, 2))
    worst = []
    for num_steps in (20, 40):
        result = sample(
            name, denoiser, jax.random.PRNGKey(1), x_init, grid="uniform_log_snr",
            num_steps=num_steps, record=True,
        )  # fmt: skip
        times = time_grid(process, "uniform_log_snr", num_steps)
        assert result.trajectory.shape == (num_steps + 1, 16, 2)
        exact = [oracle.ode_flow(process, x_init, process.T, float(t)) for t in times[1:]]
        worst.append(
            max(rmse(state, e) for state, e in zip(result.trajectory[1:], exact, strict=True))
        )
        if (
            name == "unipc"
        ):  # its corrector moves the state after the evaluation (tests/test_unipc.py)
            continue
        # The prediction made at each state (data prediction of the exact denoiser there).
        for state, t, x0 in zip(result.trajectory[:-1], times[:-1], result.denoised, strict=True):
            np.testing.assert_allclose(x0, denoiser.x0(state, t), rtol=1e-6, atol=1e-6)
    assert worst[1] < 0.05 and worst[1] < worst[0] / 1.8, worst  # order >= 1: the error halves


@pytest.mark.parametrize("process_name", ALL_PROCESSES)
def test_ddim_is_exact_for_a_constant_noise_prediction(process_name, x64):
    """With eps_pred = c, the probability-flow ODE solution is x_t = (alpha_t/alpha_s) x_s
    - sigma_t (e^h - 1) c, h = lambda_t - lambda_s (docs/references.md
    #exact-step-for-a-constant-prediction); DDIM reproduces it on any grid."""
    process = P.make_process(process_name)
    constant = jnp.array([0.7, -1.3])
    denoiser = Denoiser(
        params=constant,
        apply_fn=lambda c, x, t: jnp.broadcast_to(c, x.shape),
        process=process,
        parameterization="eps",
    )
    x_init = process.prior_sample(jax.random.PRNGKey(2), (5, 2))
    result = sample("ddim", denoiser, jax.random.PRNGKey(3), x_init, grid="karras", num_steps=7)
    t_start, t_end = process.T, process.sampling_t_end
    h = process.log_snr(t_end) - process.log_snr(t_start)
    expected = (process.alpha(t_end) / process.alpha(t_start)) * x_init - process.sigma(
        t_end
    ) * jnp.expm1(h) * constant
    np.testing.assert_allclose(result.samples, expected, rtol=1e-10, atol=1e-10 * process.prior_std)


@pytest.mark.slow
@pytest.mark.parametrize("process_name", ["vp", "subvp", "ve", "cosine", "edm", "flow"])
def test_adaptive_solver_meets_its_tolerance(process_name, x64):
    """At rtol = atol = 1e-8 the global error is within 20x the tolerance, in t and in log-SNR, and
    the solve converges: 1e-8 is > 50x more accurate than 1e-5 (local error control bounds the
    global error only up to a problem-dependent factor, so one tolerance alone proves little)."""
    process = P.make_process(process_name)
    oracle = O.preset("gaussian_2d")
    x_init = process.prior_sample(jax.random.PRNGKey(4), (32, 2))
    exact = oracle.ode_flow(process, x_init, process.T, process.sampling_t_end)
    for time_variable in ("t", "log_snr"):
        errors = {}
        for tolerance in (1e-5, 1e-8):
            result = sample(
                "adaptive",
                oracle.denoiser(process),
                jax.random.PRNGKey(5),
                x_init,
                num_steps=1,
                rtol=tolerance,
                atol=tolerance,
                time_variable=time_variable,
            )
            errors[tolerance] = float(jnp.max(jnp.abs(result.samples - exact)))
        assert errors[1e-8] < 20 * 1e-8, (time_variable, errors)
        assert errors[1e-8] < errors[1e-5] / 50, (time_variable, errors)


# ================================================================================ equivalences
@pytest.mark.parametrize(
    ("process_name", "grid"),
    [("vp", "uniform_t"), ("ve", "uniform_log_snr"), ("ddpm", "leading"), ("edm", "karras")],
)
def test_ddim_with_eta_one_is_ancestral_sampling_with_the_same_noise(process_name, grid, x64):
    """docs/references.md #ddim-and-dpm-solver-1: sigma_eta^2 = beta-tilde and mean = mu-tilde(x_t,
    x0_pred)."""
    process = P.make_process(process_name)
    denoiser = O.preset("gaussian_2d").denoiser(process)
    x_init = process.prior_sample(jax.random.PRNGKey(6), (16, 2))
    key = jax.random.PRNGKey(7)
    ddim = sample("ddim", denoiser, key, x_init, grid=grid, num_steps=12, eta=1.0)
    ancestral = sample("ancestral", denoiser, key, x_init, grid=grid, num_steps=12)
    np.testing.assert_allclose(ddim.samples, ancestral.samples, rtol=1e-10, atol=1e-10)
    other_key = sample(
        "ancestral", denoiser, jax.random.PRNGKey(8), x_init, grid=grid, num_steps=12
    )
    assert rmse(other_key.samples, ancestral.samples) > 1e-3  # the noise does matter


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_ancestral_on_the_ddpm_chain_is_ho_et_al_algorithm_2(variance, x64):
    """Replays Ho et al. 2020, Alg. 2 in its eps form with the same noise draws (docs/references.md
    #posterior-mean-in-eps-form, #reverse-diffusion-predictor):
    x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z, z = 0 at t = 1."""
    process = P.DDPM(num_steps=1000)
    oracle = O.preset("gaussian_2d")
    denoiser = oracle.denoiser(process)
    key = jax.random.PRNGKey(9)
    x_init = jax.random.normal(jax.random.PRNGKey(10), (8, 2), jnp.float64)
    result = sample(
        "ancestral",
        denoiser,
        key,
        x_init,
        grid="linspace",
        num_steps=999,
        denoise_final=True,
        variance=variance,
    )
    assert int(result.nfe) == 1000

    betas = process.betas
    alphas = 1.0 - betas
    alphas_bar = np.cumprod(alphas)
    eps_fn = jax.jit(lambda x, t: oracle.eps(process, x, t))
    step_keys = jax.random.split(key, 999)
    x = np.asarray(x_init)
    for step, i in enumerate(range(1000, 0, -1)):  # 1-based t = 1000 .. 1; betas[i - 1] = beta_t
        beta, alpha, alpha_bar = betas[i - 1], alphas[i - 1], alphas_bar[i - 1]
        eps = np.asarray(eps_fn(x, i / 1000))
        mean = (x - beta / np.sqrt(1.0 - alpha_bar) * eps) / np.sqrt(alpha)
        if i == 1:
            x = mean
            break
        beta_tilde = (1.0 - alphas_bar[i - 2]) / (1.0 - alpha_bar) * beta
        std = np.sqrt(beta_tilde if variance == "beta_tilde" else beta)
        x = mean + std * normal_like(step_keys[step], x)
    np.testing.assert_allclose(result.samples, x, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_reverse_diffusion_and_ancestral_steps_agree_to_second_order(x64):
    """docs/references.md #reverse-diffusion-predictor: (2 - sqrt(1 - beta)) x + beta score vs (x +
    beta score) / sqrt(1 - beta) differ
    by O(beta^2); on VE (scale = 1) the two steps coincide."""
    key = jax.random.PRNGKey(11)
    oracle = O.preset("gaussian_2d")

    def one_step(name, process, x, t, s, **options):
        program = sampler_program(name, **options)
        return np.asarray(program(oracle.denoiser(process), key, x, jnp.array([t, s])).samples)

    ddpm = P.DDPM(num_steps=1000)
    x = oracle.sample_marginal(jax.random.PRNGKey(12), ddpm, 64, 0.5)
    strides = np.array([1, 2, 4, 8, 16])
    differences = [
        rmse(
            one_step("reverse_diffusion", ddpm, x, 0.5, 0.5 - k / 1000),
            one_step("ancestral", ddpm, x, 0.5, 0.5 - k / 1000, variance="beta"),
        )
        for k in strides
    ]
    assert abs(np.polyfit(np.log(strides), np.log(differences), 1)[0] - 2.0) < 0.3, differences

    ve = P.VESDE()
    x = oracle.sample_marginal(jax.random.PRNGKey(13), ve, 64, 0.5)
    np.testing.assert_allclose(
        one_step("reverse_diffusion", ve, x, 0.5, 0.45),
        one_step("ancestral", ve, x, 0.5, 0.45, variance="beta"),
        rtol=1e-11,
        atol=1e-11,
    )


@pytest.mark.slow
@pytest.mark.parametrize("process_name", ["vp", "edm"])
def test_edm_stochastic_without_churn_is_heun_and_churns_by_default(process_name):
    process = P.make_process(process_name)
    denoiser = O.preset("ring8_2d").denoiser(process)
    x_init = process.prior_sample(jax.random.PRNGKey(14), (16, 2))
    heun = sample("heun", denoiser, jax.random.PRNGKey(15), x_init, grid="karras", num_steps=9)
    no_churn = sample(
        "edm_stochastic",
        denoiser,
        jax.random.PRNGKey(16),
        x_init,
        grid="karras",
        num_steps=9,
        S_churn=0.0,
    )
    np.testing.assert_array_equal(no_churn.samples, heun.samples)
    assert int(no_churn.nfe) == int(heun.nfe) == 18
    # The defaults (Karras et al.'s ImageNet-64 settings) churn: other keys, other samples.
    churned = [
        sample(
            "edm_stochastic", denoiser, jax.random.PRNGKey(k), x_init, grid="karras", num_steps=9
        )
        for k in (16, 17)
    ]
    assert not np.allclose(churned[0].samples, churned[1].samples)
    assert not get_sampler("edm_stochastic").is_deterministic()


def test_edm_stochastic_is_karras_algorithm_2_on_the_edm_process(x64):
    """Replays Karras et al. 2022, Alg. 2 (sigma = t) with the same noise draws."""
    process = P.EDM()
    oracle = O.preset("gaussian_2d")
    options = {"S_churn": 30.0, "S_tmin": 0.05, "S_tmax": 20.0, "S_noise": 1.007}
    num_steps = 8
    key = jax.random.PRNGKey(17)
    x_init = process.prior_sample(jax.random.PRNGKey(18), (8, 2))
    result = sample(
        "edm_stochastic",
        oracle.denoiser(process),
        key,
        x_init,
        grid="karras",
        num_steps=num_steps,
        **options,
    )
    times = np.asarray(time_grid(process, "karras", num_steps))

    def denoised(x, t):
        return np.asarray(oracle.x0(process, jnp.asarray(x), t))

    step_keys = jax.random.split(key, num_steps)
    x = np.asarray(x_init)
    for i in range(num_steps):
        t, t_next = times[i], times[i + 1]
        in_range = options["S_tmin"] <= t <= options["S_tmax"]
        gamma = min(options["S_churn"] / num_steps, np.sqrt(2) - 1) if in_range else 0.0
        t_hat = t + gamma * t
        x_hat = x + np.sqrt(t_hat**2 - t**2) * options["S_noise"] * normal_like(step_keys[i], x)
        slope = (x_hat - denoised(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * slope
        slope_next = (x_next - denoised(x_next, t_next)) / t_next
        x = x_hat + (t_next - t_hat) * 0.5 * (slope + slope_next)
    np.testing.assert_allclose(result.samples, x, rtol=1e-9, atol=1e-9)


def test_final_denoising_step_is_tweedie_and_costs_one_evaluation(x64):
    process = P.VPSDE()
    oracle = O.preset("gaussian_2d")
    denoiser = oracle.denoiser(process)
    x_init = process.prior_sample(jax.random.PRNGKey(19), (8, 2))
    key = jax.random.PRNGKey(20)
    plain = sample("euler", denoiser, key, x_init, num_steps=5)
    final = sample("euler", denoiser, key, x_init, num_steps=5, denoise_final=True)
    assert int(final.nfe) == int(plain.nfe) + 1 == 6
    t_end = process.sampling_t_end
    np.testing.assert_allclose(
        final.samples, oracle.x0(process, plain.samples, t_end), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("order", [1, 2, 3])
def test_final_step_to_zero_noise_has_its_order(order, x64):
    """The final step of order k extrapolates the x0 predictions at sigma_hat^2 = v_N, 4 v_N, 16 v_N
    (exact states of the probability-flow ODE of Gaussian data) to v = 0: its error against the
    ODE's end at sigma = 0, written out from the closed form x0(sigma_hat = 0) = mu + s (x_hat -
    mu) / sqrt(s^2 + sigma_hat^2), falls like sigma_hat_N^(2k) (fitted within 0.3)."""
    process = P.VPSDE()
    mean, variance = 0.7, 0.3**2
    oracle = O.gaussian(np.full(2, mean), np.full(2, variance))
    denoiser = oracle.denoiser(process)
    x_init = process.prior_sample(jax.random.PRNGKey(30), (16, 2))
    sigma_hats, errors = [], []
    for sigma_hat_end in (0.01, 0.02, 0.04):
        sigma_hat = sigma_hat_end * 2.0 ** jnp.arange(order)[::-1]  # increasing noise first
        times = process.t_from_log_snr(-jnp.log(jnp.concatenate([jnp.array([150.0]), sigma_hat])))
        states = jnp.stack([oracle.ode_flow(process, x_init, process.T, t) for t in times])
        predictions = jnp.stack(
            [oracle.x0(process, x, t) for x, t in zip(states, times, strict=True)]
        )
        result = SampleResult(samples=states[-1], nfe=jnp.int32(0), denoised=predictions[:-1])
        final = final_denoise(denoiser, result, times, order)
        x_hat = states[-1] / process.alpha(times[-1])
        end = mean + jnp.sqrt(variance) * (x_hat - mean) / jnp.sqrt(variance + sigma_hat_end**2)
        sigma_hats.append(sigma_hat_end)
        errors.append(float(jnp.max(jnp.abs(final.samples - end))))
    slope = np.polyfit(np.log(sigma_hats), np.log(errors), 1)[0]
    assert abs(slope - 2 * order) < 0.3, (slope, errors)


# ================================================================================ single steps
def gaussian_score_denoiser(process, variance):
    """A 'score' network that returns the score of N(0, variance I) at every t."""
    return Denoiser(
        params=jnp.asarray(variance),
        apply_fn=lambda v, x, t: -x / v,
        process=process,
        parameterization="score",
    )


def test_predictor_steps_match_their_published_forms(x64):
    """VP Euler-Maruyama with f = -beta(t)/2, g^2 = beta(t) (Song et al. 2021, eq. 32); reverse
    diffusion on DDPM's consecutive chain times: (2 - sqrt(1 - beta_i)) x + beta_i score + sqrt(beta_i) z
    (docs/references.md #reverse-diffusion-predictor); on VE: x + (sigma_t^2 - sigma_s^2) score +
    sqrt(sigma_t^2 - sigma_s^2) z."""
    key = jax.random.PRNGKey(21)
    x = jax.random.normal(jax.random.PRNGKey(22), (6, 3), jnp.float64)
    z = normal_like(key, x)
    score = -np.asarray(x) / 0.7

    vp = P.VPSDE()
    t, s = 0.6, 0.55
    beta_t = vp.beta_min + t * (vp.beta_max - vp.beta_min)
    expected = x - (-0.5 * beta_t * x - beta_t * score) * (t - s) + np.sqrt(beta_t * (t - s)) * z
    got, _ = euler_maruyama_step(gaussian_score_denoiser(vp, 0.7), x, t, s, key)
    np.testing.assert_allclose(got, expected, rtol=1e-10)

    ddpm = P.DDPM(num_steps=1000)
    i = 400  # 1-based chain step: t_i = i / N, beta_i = betas[i - 1]
    beta = ddpm.betas[i - 1]
    expected = (2.0 - np.sqrt(1.0 - beta)) * x + beta * score + np.sqrt(beta) * z
    got, _ = reverse_diffusion_step(
        gaussian_score_denoiser(ddpm, 0.7), x, i / 1000, (i - 1) / 1000, key
    )
    np.testing.assert_allclose(got, expected, rtol=1e-10)

    ve = P.VESDE()
    t, s = 0.6, 0.3
    variance_increment = float(ve.sigma(t) ** 2 - ve.sigma(s) ** 2)
    expected = x + variance_increment * score + np.sqrt(variance_increment) * z
    got, _ = reverse_diffusion_step(gaussian_score_denoiser(ve, 0.7), x, t, s, key)
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_corrector_steps_match_score_sde(x64):
    """LangevinCorrector: eps = 2 alpha (snr ||z|| / ||score||)^2 with score_sde's batch-mean norms and
    alpha = 1 - beta_i on DDPM's chain; AnnealedLangevinDynamics: eps = 2 alpha (snr sigma_t)^2
    (Song et al. 2021, Alg. 4-5)."""
    key = jax.random.PRNGKey(23)
    x = (
        jax.random.normal(jax.random.PRNGKey(24), (6, 3), jnp.float64)
        * jnp.arange(1.0, 7.0)[:, None]
    )
    z = normal_like(key, x)
    ddpm = P.DDPM(num_steps=1000)
    i, snr = 300, 0.16
    alpha = 1.0 - ddpm.betas[i - 1]
    denoiser = gaussian_score_denoiser(ddpm, 0.7)
    score = -np.asarray(x) / 0.7

    norm_ratio = np.linalg.norm(z, axis=1).mean() / np.linalg.norm(score, axis=1).mean()
    step = 2 * alpha * (snr * norm_ratio) ** 2
    expected = x + step * score + np.sqrt(2 * step) * z
    got, _ = langevin_corrector_step(denoiser, x, i / 1000, (i - 1) / 1000, key, snr)
    np.testing.assert_allclose(got, expected, rtol=1e-10)

    sigma_t = np.sqrt(1.0 - np.prod(1.0 - ddpm.betas[:i]))
    step = 2 * alpha * (snr * sigma_t) ** 2
    expected = x + step * score + np.sqrt(2 * step) * z
    got, _ = annealed_langevin_corrector_step(denoiser, x, i / 1000, (i - 1) / 1000, key, snr)
    np.testing.assert_allclose(got, expected, rtol=1e-10)


# ================================================================================ Langevin
def test_annealed_langevin_step_sizes_are_ncsn_s(x64):
    """With a zero score, x_final - x_init = sum_i sqrt(a_i) z_i: its variance is sum_i a_i with
    a_i = 2e-5 sigma_i^2 / sigma_L^2 over NCSN's 10 levels (docs/references.md
    #noise-levels-and-time-grids: 0.2, 0.071876, ..., 2e-5)."""
    process = P.SMLD(num_levels=10)
    ncsn_sigmas = np.array(
        [1, 0.59948, 0.35938, 0.21544, 0.12915, 0.07743, 0.04642, 0.02783, 0.01668, 0.01]
    )
    expected_variance = np.sum(2e-5 * ncsn_sigmas**2 / 0.01**2)
    zero_score = Denoiser(
        params=jnp.zeros(()),
        apply_fn=lambda p, x, t: p * x,
        process=process,
        parameterization="score",
    )
    x_init = jnp.zeros((40000, 1))
    result = sample(
        "annealed_langevin",
        zero_score,
        jax.random.PRNGKey(25),
        x_init,
        grid="linspace",
        num_steps=9,
        step_lr=2e-5,
        n_steps_each=1,
    )
    assert int(result.nfe) == 10
    assert float(jnp.var(result.samples)) == pytest.approx(expected_variance, rel=0.03)


def test_annealed_langevin_reaches_the_ula_stationary_law(x64):
    """ULA x' = x + a/2 score + sqrt(a) z on N(0, v) is stationary at N(0, v / (1 - a / (4 v)))
    (docs/references.md #langevin-stationary-variance, NCSN convention): with a = v / 2 the
    variance is 8 v / 7, not v."""
    process = P.VESDE()
    variance = 0.3
    x_init = jax.random.normal(jax.random.PRNGKey(26), (20000, 1), jnp.float64)
    result = sample(
        "annealed_langevin",
        gaussian_score_denoiser(process, variance),
        jax.random.PRNGKey(27),
        x_init,
        num_steps=1,
        t_start=0.5,
        t_end=0.49,
        step_lr=0.5 * variance,
        n_steps_each=100,
    )
    assert int(result.nfe) == 200
    assert float(jnp.mean(result.samples)) == pytest.approx(0.0, abs=0.03)
    assert float(jnp.var(result.samples)) == pytest.approx(variance * 8 / 7, rel=0.035)


MONOTONE_NFES = (5, 10, 20, 50, 100)
# The one measured exception: on rectified flow's Karras grid (sigma_hat from 999 down to 1e-5, so
# steps of 1-3 in lambda where the ring's modes separate) DPM-Solver++(3M) has RMSE 0.887, 1.15,
# 0.348 at NFE 5, 10, 20 (DDIM: 0.435, 0.138, 0.044): its third-order extrapolation is not yet
# converging there. Its errors are asserted to fall from NFE 10 on. UniPC on flow's quadratic grid
# (which on flow is also its flow_t grid) is flat from NFE 10 to 20 (6.82e-3, 6.85e-3) and falls
# from there.
MONOTONE_FROM_NFE = {
    ("dpm_solver_pp_3m", "flow", "karras"): 10,
    ("unipc", "flow", "quadratic_t"): 20,
    ("unipc", "flow", "flow_t"): 20,
}


@pytest.mark.slow
@pytest.mark.parametrize("process_name", ["vp", "flow"])
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("dpm_solver_pp_2m", {}),
        ("dpm_solver_pp_3m", {}),
        ("dpm_solver_multistep", {"order": 2}),
        ("dpm_solver_multistep", {"order": 3}),
        ("unipc", {}),
        ("deis", {}),
    ],
)
def test_multistep_errors_fall_as_nfe_grows_on_every_grid(process_name, name, options, x64):
    """On the exact denoiser of ring8_2d, against the probability-flow ODE's end at sigma = 0 (a
    Dopri5 solve at rtol 1e-10 to sigma_hat = 1e-6, then the exact denoiser): every grid's error at
    NFE 5, 10, 20, 50, 100 (final step to sigma = 0 of order 2 included) decreases. With DPM-Solver's
    count rule for the final orders, DPM-Solver++(3M) on a uniform-t grid went 0.13 -> 1.7 -> 0.13
    from NFE 10 to 50 (benchmarks/solver_accuracy)."""
    process = P.make_process(process_name)
    denoiser = O.preset("ring8_2d").denoiser(process)
    key = jax.random.PRNGKey(0)
    x_init = process.prior_sample(key, (64, 2))
    end = jax.jit(lambda x: ode_end_at_zero_noise(denoiser, x, process.T))(x_init)
    for grid in CONTINUOUS_GRIDS:
        first = MONOTONE_FROM_NFE.get((name, process_name, grid), MONOTONE_NFES[0])
        errors = [
            rmse(
                sample(
                    name,
                    denoiser,
                    key,
                    x_init,
                    grid=grid,
                    nfe=nfe,
                    denoise_final=True,
                    denoise_order=2,
                    **options,
                ).samples,
                end,
            )
            for nfe in MONOTONE_NFES
            if nfe >= first
        ]
        assert all(b < a for a, b in itertools.pairwise(errors)), (grid, errors)
