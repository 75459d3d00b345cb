"""experiments.figures: each figure's numbers against their exact counterparts at small sizes, the
command line, and (slow) every figure rendered end to end.

The exact counterparts are computed here independently of the figure modules (scipy's normal CDF,
products of (1 - beta), quadrature, closed forms); statistical checks use fixed seeds and tolerances
from the noise floor (KS critical values, standard errors of a sample variance).
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import integrate, stats

from diffusion import oracle, samplers
from diffusion.processes import DDPM, EDM, VPSDE, make_process
from experiments.figures import (
    FIGURES,
    FigureContext,
    common,
    indi,
    pde,
    run_figure,
    schedules,
    score_matching,
    scores,
    sde,
)
from experiments.figures import forward as forward_figure
from experiments.figures.__main__ import main

EXPECTED = {
    "forward_process",
    "scores_langevin",
    "score_matching",
    "sde_demos",
    "indi",
    "pde",
    "schedules",
    "guidance_sweeps",
    "ddpm_experiment",
}


def _mixture_cdf(x, weights, means, stds, alpha, sigma):
    """The CDF of sum_k w_k N(alpha mu_k, alpha^2 s_k^2 + sigma^2), written out with scipy."""
    return sum(
        w * stats.norm.cdf(x, alpha * m, math.sqrt(alpha**2 * s**2 + sigma**2))
        for w, m, s in zip(weights, means, stds, strict=True)
    )


# ================================================================================ registry and CLI
def test_every_figure_is_registered_with_a_one_line_description():
    assert set(FIGURES) == EXPECTED
    assert list(FIGURES)[-1] == "ddpm_experiment"  # the trained-model figure runs last
    for figure in FIGURES.values():
        assert figure.description and "\n" not in figure.description
        assert figure.fn.__doc__  # settings the texts do not give are stated there


def test_cli_lists_figures_and_rejects_bad_input_in_one_line(tmp_path, capsys):
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in listed] == list(FIGURES)

    assert main(["--figure=no_such_figure", f"--workdir={tmp_path}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: unknown figure 'no_such_figure'")

    assert main(["--figure=pde"]) == 2  # no --workdir
    assert len(capsys.readouterr().err.strip().splitlines()) == 1

    missing = tmp_path / "missing"
    assert main(["--figure=pde", f"--workdir={tmp_path}", f"--checkpoint_dir={missing}"]) == 2
    assert "is not a directory" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        main(["--figure=pde", "--no_such_flag"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--no_such_flag" in error[0] and "Traceback" not in error[0]


# ================================================================================ forward process
def test_forward_chain_has_the_exact_mixture_marginals(x64):
    beta, num = 0.05, 4000
    process = DDPM(num_steps=30, schedule="linear", beta_start=beta, beta_end=beta)
    weights, means, stds = (0.3, 0.7), (-2.0, 2.0), (0.3, 0.5)
    mixture = common.mixture_1d(weights, means, stds)
    x0 = mixture.sample(jax.random.PRNGKey(0), num)[:, 0]
    states, traced = jax.jit(forward_figure.forward_chain, static_argnums=(0, 3))(
        process, jax.random.PRNGKey(1), x0, 3
    )
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(states)[:, :3])
    steps = (1, 10, 30)
    bound = common.bonferroni_ks_bound(num, len(steps))  # family-wise level 1e-3
    for step in steps:
        alpha = math.sqrt((1 - beta) ** step)  # sqrt(prod (1 - beta_i)), Ho et al. eq. 4
        sigma = math.sqrt(1 - (1 - beta) ** step)
        statistic = stats.kstest(
            np.asarray(states[step - 1]),
            lambda x, a=alpha, s=sigma: _mixture_cdf(x, weights, means, stds, a, s),
        ).statistic
        assert statistic < bound, (step, statistic, bound)


def test_forward_figure_cdf_is_the_exact_marginal(x64):
    process = VPSDE()
    weights, means, stds = (0.4, 0.6), (-1.0, 2.0), (0.2, 0.7)
    mixture = common.mixture_1d(weights, means, stds)
    x = np.linspace(-4, 4, 17)
    for t in (0.01, 0.3, 0.9):
        alpha, sigma = float(process.alpha(t)), float(process.sigma(t))
        np.testing.assert_allclose(
            common.mixture_cdf(mixture, process, t)(x),
            _mixture_cdf(x, weights, means, stds, alpha, sigma),
            rtol=1e-12,
            atol=1e-15,
        )


# ================================================================================ Langevin
def test_unadjusted_langevin_has_the_closed_form_stationary_variance(x64):
    mean, std, num = 1.0, 0.8, 20_000
    gaussian = oracle.gaussian(np.array([mean]), np.array([std**2]))
    t = scores.LANGEVIN_TIME
    variance = std**2 + t**2  # the target is the marginal at sigma = t of x + t eps
    tau = 0.3 * variance
    # Fixed point of the variance recursion v' = (1 - tau/v)^2 v + 2 tau (Chan 2024, eq. 68).
    expected = variance / (1 - tau / (2 * variance))
    recursion = variance
    for _ in range(500):
        recursion = (1 - tau / variance) ** 2 * recursion + 2 * tau
    assert scores.ula_stationary_variance(variance, tau) == pytest.approx(expected, rel=1e-14)
    assert recursion == pytest.approx(expected, rel=1e-12)
    x = mean + math.sqrt(variance) * jax.random.normal(jax.random.PRNGKey(0), (num, 1))
    x = np.asarray(
        common.langevin_at_level(
            gaussian.denoiser(scores.CLEAN), jax.random.PRNGKey(1), x, t, tau, 40
        )
    )
    standard_error = math.sqrt(2 / num) * expected  # of a Gaussian sample variance
    assert abs(x.var() - expected) < 4 * standard_error
    assert abs(x.var() - variance) > 4 * standard_error  # the bias is visible at this size


def test_langevin_path_ends_where_the_sampler_does(x64):
    gaussian = oracle.gaussian(np.array([0.0, 1.0]), np.array([1.0, 0.5]))
    denoiser = gaussian.denoiser(scores.CLEAN)
    start = jnp.zeros((3, 2))
    path = common.langevin_path(denoiser, jax.random.PRNGKey(0), start, 0.01, 0.05, 7)
    assert path.shape == (8, 3, 2)
    np.testing.assert_array_equal(path[0], start)
    # Each step is the one-level sampler with one step from the previous state.
    keys = jax.random.split(jax.random.PRNGKey(0), 7)
    one_step = common.langevin_at_level(denoiser, keys[3], path[3], 0.01, 0.05, 1)
    np.testing.assert_allclose(path[4], one_step, rtol=0, atol=1e-14)


# ================================================================================ score matching
def test_explicit_and_denoising_score_matching_differ_by_a_constant(x64):
    points, h = np.array([-1.3, -0.2, 0.4, 1.9]), 0.4

    # The KDE written out here (not the oracle): density, score, and the two losses.
    def density(x: float) -> float:
        return float(np.mean(stats.norm.pdf(x, points, h)))

    def kde_score(x: float) -> float:
        weights = stats.norm.pdf(x, points, h)
        return float(np.sum(weights * (points - x) / h**2) / np.sum(weights))

    def esm(a, b):
        integrand = lambda x: 0.5 * density(x) * (a * x + b - kde_score(x)) ** 2  # noqa: E731
        return integrate.quad(integrand, -8, 8, limit=200, epsabs=1e-13)[0]

    fisher = integrate.quad(lambda x: density(x) * kde_score(x) ** 2, -8, 8, limit=200)[0]
    constant = 0.5 * fisher - 0.5 / h**2  # 1/2 E S^2 - 1/2 E T^2 with E T^2 = 1/h^2
    thetas = [(0.0, 0.0), (-1.0, 0.5), (-3.0, -1.0), (0.7, 2.0)]
    differences = [esm(a, b) - score_matching.dsm_affine_loss(a, b, points, h) for a, b in thetas]
    np.testing.assert_allclose(differences, constant, rtol=0, atol=1e-9)
    # The closed-form J_DSM against Monte Carlo: x = x_m + h e, target -e/h.
    rng = np.random.default_rng(0)
    m, e = rng.integers(0, len(points), 400_000), rng.normal(size=400_000)
    a, b = -1.0, 0.5
    per_draw = 0.5 * (a * (points[m] + h * e) + b + e / h) ** 2
    standard_error = per_draw.std() / math.sqrt(len(per_draw))
    assert (
        abs(per_draw.mean() - score_matching.dsm_affine_loss(a, b, points, h)) < 4 * standard_error
    )


# ================================================================================ SDE demos
def test_euler_and_rk4_have_orders_one_and_four(x64):
    process = VPSDE()
    gaussian = oracle.gaussian(np.array([0.5]), np.array([0.25]))
    denoiser = gaussian.denoiser(process)
    x_start = jnp.linspace(-2.0, 2.0, 5)[:, None]
    t_end = 1e-3
    exact = np.asarray(gaussian.ode_flow(process, x_start, 1.0, t_end))
    steps = np.array([64, 128])

    def errors(solve):
        out = []
        for n in steps:
            times = samplers.time_grid(process, "uniform_t", int(n), t_end=t_end)
            out.append(np.max(np.abs(np.asarray(solve(times)) - exact)))
        return np.array(out)

    key = jax.random.PRNGKey(0)
    euler = errors(
        lambda times: samplers.sampler_program("euler")(denoiser, key, x_start, times).samples
    )
    rk4 = errors(jax.jit(lambda times: sde.rk4(denoiser, x_start, times)))
    for measured, order in ((euler, 1), (rk4, 4)):
        slopes = np.log2(measured[:-1] / measured[1:])
        assert np.all(np.abs(slopes - order) < 0.3), (order, slopes)


def test_ornstein_uhlenbeck_paths_relax_to_the_standard_normal(x64):
    num = 20_000
    paths = np.asarray(sde.euler_maruyama_paths(jax.random.PRNGKey(0), num, 400, 2.0, 1.0, 3.0))
    for step, t in ((100, 0.5), (400, 2.0)):
        variance = 1 - math.exp(-2 * t)
        assert abs(paths[step].mean() - 3 * math.exp(-t)) < 4 * math.sqrt(variance / num)
        assert (
            abs(paths[step].var() - variance) < 4 * math.sqrt(2 / num) * variance + 1e-2 * variance
        )
    brownian = np.asarray(sde.euler_maruyama_paths(jax.random.PRNGKey(1), num, 100, 1.0, 0.0))
    assert abs(brownian[-1].var() - 1.0) < 4 * math.sqrt(2 / num)


def test_snapshots_compose_a_one_step_sampler_exactly(x64):
    process = VPSDE()
    gaussian = oracle.gaussian(np.array([0.5]), np.array([0.25]))
    denoiser = gaussian.denoiser(process)
    times = samplers.time_grid(process, "uniform_t", 12)
    x_init = jnp.linspace(-1.0, 1.0, 4)[:, None]
    states = common.sample_with_snapshots(
        "euler", denoiser, jax.random.PRNGKey(0), x_init, times, [0, 4, 8, 12]
    )
    np.testing.assert_array_equal(states[0], x_init)
    for index, state in zip((4, 8, 12), states[1:], strict=True):
        whole = samplers.sampler_program("euler")(
            denoiser, jax.random.PRNGKey(0), x_init, times[: index + 1]
        ).samples
        np.testing.assert_allclose(state, whole, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="snapshot indices"):
        common.sample_with_snapshots("euler", denoiser, jax.random.PRNGKey(0), x_init, times, [13])


# ================================================================================ InDI
def test_indi_with_the_posterior_mean_is_euler_on_the_ve_flow(x64):
    mixture = common.mixture_1d(**indi.MIXTURE)
    y = jnp.linspace(-4.0, 4.0, 9)[:, None]
    num_steps = 20
    path = np.asarray(indi.indi_sampler(mixture, num_steps, y))
    assert path.shape == (num_steps + 1, 9, 1)
    # One InDI step by hand, x_{t-d} = (d/t) E[x | x_t] + (1 - d/t) x_t, with sigma_t = t NOISE.
    d, t = 1 / num_steps, 1.0
    posterior_mean = np.asarray(mixture.x0(EDM(sigma_max=indi.NOISE), y, indi.NOISE * t))
    np.testing.assert_allclose(
        path[1], d / t * posterior_mean + (1 - d / t) * np.asarray(y), atol=1e-14
    )
    times = indi.NOISE * (1 - jnp.arange(num_steps) / num_steps)
    euler = samplers.sampler_program("euler", denoise_final=True)(
        mixture.denoiser(indi.PROCESS), jax.random.PRNGKey(0), y, times
    )
    np.testing.assert_allclose(path[-1], euler.samples, rtol=0, atol=1e-12)


# ================================================================================ PDE
def test_galerkin_solution_conserves_the_gradient_norm_and_tends_to_the_first_mode(x64):
    coefficients = pde.initial_coefficients(12)
    lam = (np.pi * np.arange(13)) ** 2
    assert abs(coefficients[0]) < 1e-15  # zero mean
    times = np.array([0.0, 0.01, 0.1, 1.0])
    solution = pde.galerkin_exact(coefficients, times)
    norms = np.sum(lam * solution**2, axis=1)
    np.testing.assert_allclose(norms, norms[0], rtol=1e-12)
    # It solves a_j' = (mu - lambda_j) a_j: central differences in time.
    step = 1e-6
    for t in (0.01, 0.1):
        a = pde.galerkin_exact(coefficients, np.array([t]))[0]
        derivative = (
            pde.galerkin_exact(coefficients, np.array([t + step]))[0]
            - pde.galerkin_exact(coefficients, np.array([t - step]))[0]
        ) / (2 * step)
        mu = np.sum(lam**2 * a**2) / np.sum(lam * a**2)
        np.testing.assert_allclose(derivative, (mu - lam) * a, rtol=1e-6, atol=1e-8)
    # The limit: A_1 cos(pi x) with A_1^2 pi^2 = sum lambda_j a_j(0)^2.
    limit = np.zeros(13)
    limit[1] = math.copysign(math.sqrt(norms[0]) / math.pi, coefficients[1])
    np.testing.assert_allclose(solution[-1], limit, atol=1e-10)
    # RK4 on the same system agrees and conserves the norm.
    rk4 = np.asarray(pde.galerkin_rk4(jnp.asarray(coefficients), 20_000, 20_000))
    assert abs(np.sum(lam * rk4[-1] ** 2) / norms[0] - 1) < 1e-9
    np.testing.assert_allclose(
        rk4[-1], pde.galerkin_exact(coefficients, np.array([pde.FINAL_TIME]))[0], atol=1e-9
    )


def test_finite_differences_conserve_the_discrete_norm_and_converge_at_order_two(x64):
    coefficients = pde.initial_coefficients(12)
    exact = pde.galerkin_exact(coefficients, np.array([pde.FINAL_TIME]))[0]

    def solve(size: int, steps_per_unit: int):
        x = (np.arange(size) + 0.5) / size
        basis = np.cos(np.pi * np.outer(np.arange(13), x))
        steps = 50 * math.ceil(steps_per_unit * pde.FINAL_TIME * 4 * size**2 / 50)
        solution = np.asarray(
            pde.fd_rk4(jnp.asarray(coefficients @ basis), size, steps, steps // 50)
        )
        difference, laplacian = pde.fd_operators(size)
        # The cell-centred Neumann Laplacian's eigenvectors are the sampled cosines.
        np.testing.assert_allclose(
            laplacian @ basis[2], -4 * size**2 * np.sin(np.pi / size) ** 2 * basis[2], rtol=1e-10
        )
        norms = np.sum((solution @ difference.T) ** 2, axis=1) / size
        drift = np.max(np.abs(norms - norms[0])) / norms[0]
        return drift, np.max(np.abs(solution[-1] - exact @ basis))

    # The semi-discrete system conserves h |D u|^2 exactly: what drifts is RK4's O(dt^4) error.
    drift_coarse, _ = solve(16, 2)
    drift_fine, error_16 = solve(16, 4)
    assert drift_fine < 1e-6
    assert math.log2(drift_coarse / drift_fine) == pytest.approx(4.0, abs=0.3)
    _, error_32 = solve(32, 4)
    assert math.log2(error_16 / error_32) == pytest.approx(2.0, abs=0.15)


def test_ve_fokker_planck_by_finite_differences_is_the_noised_mixture(x64):
    t0, t1 = pde.FP_TIMES
    weights, means, stds = pde.MIXTURE["weights"], pde.MIXTURE["means"], pde.MIXTURE["stds"]

    def density(x, t):  # sum_k w_k N(mu_k, s_k^2 + sigma(t)^2), sigma(t) = 0.01 * 1000^t
        sigma = 0.01 * 1000.0**t
        return sum(
            w * stats.norm.pdf(x, m, math.sqrt(s**2 + sigma**2))
            for w, m, s in zip(weights, means, stds, strict=True)
        )

    errors = []
    for size in (101, 201):
        x = np.linspace(-pde.FP_DOMAIN, pde.FP_DOMAIN, size)
        h = x[1] - x[0]
        steps = math.ceil((t1 - t0) * 4 * 0.5 * float(pde.VE.diffusion_sq(t1)) / h**2)
        solution = np.asarray(pde.fokker_planck_ve(jnp.asarray(density(x, t0)), size, steps))
        errors.append(np.max(np.abs(solution - density(x, t1))))
    assert errors[1] < 1e-3
    assert math.log2(errors[0] / errors[1]) == pytest.approx(2.0, abs=0.15)


# ================================================================================ schedules
@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "cosine", "ddpm", "smld", "edm"])
def test_schedule_checks_pass_for_every_process(name, x64):
    process = make_process(name)
    t = process.t_min + np.linspace(0.0, 1.0, 101) * (process.T - process.t_min)
    checks = schedules.schedule_checks(process, name, t)
    assert len(checks) == 3 and all(c["passed"] for c in checks), checks


# ================================================================================ rendering


def _render(name: str, tmp_path, **kwargs) -> dict:
    record = run_figure(FIGURES[name], FigureContext(str(tmp_path), quick=True, **kwargs))
    with Image.open(tmp_path / f"{name}.png") as picture:
        assert picture.format == "PNG" and min(picture.size) > 200
    with open(tmp_path / f"{name}.json") as file:
        stored = json.load(file)
    assert stored["figure"] == name and stored["checks"] == json.loads(json.dumps(stored["checks"]))
    failed = [c for c in record["checks"] if not c["passed"]]
    assert not failed, failed
    return record


def test_cli_draws_a_figure_and_reports_its_checks(tmp_path, capsys):
    assert main(["--figure=pde", f"--workdir={tmp_path}", "--quick"]) == 0
    output = capsys.readouterr().out.splitlines()
    assert output[0].startswith("pde: 10/10 checks passed")
    assert all(line.startswith("  ok ") for line in output[1:])
    with open(tmp_path / "pde.json") as file:
        record = json.load(file)
    assert record["figure"] == "pde" and len(record["checks"]) == 10
    with Image.open(tmp_path / "pde.png") as picture:
        assert picture.format == "PNG"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED - {"ddpm_experiment"}))
def test_every_figure_renders_with_every_check_passed(name, tmp_path):
    _render(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("config_name", ["ddpm_digits", "ddpm_fashion_mnist_idx"])
def test_ddpm_experiment_and_schedules_on_a_tiny_trained_run(config_name, tmp_path):
    """Train a tiny DDPM for two steps (8x8 digits; 28x28 IDX files as MNIST / Fashion-MNIST
    runs have), then draw both trained-model figures from its working directory (3 and 8 minutes
    on a 2-core CPU: the U-Net's sampling programs compile for each grid length)."""
    import importlib

    from conftest import write_mnist_like_idx

    from experiments.build import build
    from experiments.train import train

    config = importlib.import_module(f"experiments.configs.{config_name}").get_config()
    if config.data.idx_dir is not None:
        (tmp_path / "idx").mkdir()
        config.data.idx_dir = write_mnist_like_idx(tmp_path / "idx")
    config.training.n_iters = 2
    config.training.batch_size = 8
    config.training.log_freq = 1
    config.training.checkpoint_freq = 2
    config.training.snapshot_sampling = False
    config.model.nf = 8
    config.model.ch_mult = (1,)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    run_dir = tmp_path / "run"
    train(build(config), str(run_dir))
    record = _render("ddpm_experiment", tmp_path / "figures", checkpoint_dir=str(run_dir))
    measured = {m["quantity"]: m["value"] for m in record["measurements"]}
    assert sum(measured["class histogram of 50 samples"]) == 50
    assert record["checks"][0]["exact"] == pytest.approx(
        math.sqrt(np.prod(1 - np.linspace(1e-4, 0.02, 500)))
    )
    record = _render("schedules", tmp_path / "figures", checkpoint_dir=str(run_dir))
    assert record["settings"]["views_from"] == "trained model"
    assert (tmp_path / "figures" / "schedules_views.png").exists()


# ================================================================================ guidance sweeps
def test_guidance_sweeps_helpers_against_bayes_rule_and_the_nfe_counts(x64):
    """The figure's p(y | x_0) is Bayes' rule over the toy's components, written out with scipy;
    Heun (2 NFE per step + the final step) spends the largest odd NFE within each budget."""
    from experiments.figures import guidance_sweeps

    toy = guidance_sweeps.TOY
    process = VPSDE()
    x = np.random.default_rng(0).normal(size=(7, 2)) * 1.5
    t = process.t_min
    alpha, sigma = float(process.alpha(t)), float(process.sigma(t))

    def noised_component(weight, mean, variances):
        """w_k N(x; alpha mu_k, alpha^2 C_k + sigma^2 I): component k of p_t."""
        covariance = alpha**2 * np.diag(variances) + sigma**2 * np.eye(2)
        return weight * stats.multivariate_normal(alpha * np.asarray(mean), covariance).pdf(x)

    joint = np.stack(
        [
            noised_component(*component)
            for component in zip(toy["weights"], toy["means"], toy["variances"], strict=True)
        ],
        axis=1,
    )
    in_target = np.array(toy["labels"]) == guidance_sweeps.TARGET
    expected = joint[:, in_target].sum(axis=1) / joint.sum(axis=1)
    got = guidance_sweeps.class_probability(guidance_sweeps.labelled_toy(), process, jnp.asarray(x))
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    heun = [guidance_sweeps._largest_nfe_within("heun", budget, {}) for budget in (5, 10, 20, 50)]
    assert heun == [5, 9, 19, 49]
    assert guidance_sweeps._largest_nfe_within("dpm_solver_pp_2m", 10, {}) == 10


@pytest.mark.slow
def test_guidance_sweeps_renders_with_every_check_passed(tmp_path):
    """Quick size (4,096 guided points, 256 ring points, NFE 5, 20, 50): every check passes."""
    record = _render("guidance_sweeps", tmp_path)
    assert len(record["checks"]) == 3 + len(record["settings"]["solvers"]) + 1
    assert record["data"]["nfe"]["Heun"] == [5, 19, 49]
