"""DPM-Solver++(2M)/(3M) SDE and SA-Solver: their deterministic limits, the exact law of one SDE step,
the data law of an exact denoiser, convergence orders, counted network calls.

Truths used: DPM-Solver++(2M)/(3M) from the registry (eta = 0 is the ODE solver); the exact
one-step law of the data-prediction SDE step for point-mass data (x_t ~ N(alpha_t c, sigma_t^2 I):
mean alpha_t c e^{-(1+eta)h} + alpha_t c (1 - e^{-(1+eta)h}) and variance sigma_t^2 e^{-2 eta h} +
sigma_t^2 (1 - e^{-2 eta h}), sampling tolerances from the standard errors); the sliced-W2 two-sample
noise floor of the data law (as in test_samplers_distribution); the exact probability-flow map of
Gaussian data (docs/references.md #gaussian-data); network calls counted at run time.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multistep_checks import counted_nfe, global_order, untraceable

from diffusion import metrics as M
from diffusion import oracle as O
from diffusion import processes as P
from diffusion.parameterization import Denoiser
from diffusion.samplers import sample
from diffusion.samplers.base import get_sampler
from diffusion.samplers.grids import time_grid


# ----------------------------------------------------------------------------- deterministic limits
@pytest.mark.slow
@pytest.mark.parametrize(
    "process_name, name, ode_name",
    [
        ("vp", "dpm_solver_pp_2m_sde", "dpm_solver_pp_2m"),
        ("flow", "dpm_solver_pp_3m_sde", "dpm_solver_pp_3m"),
        ("ve", "dpm_solver_pp_2m_sde", "dpm_solver_pp_2m"),
        ("vp", "dpm_solver_pp_3m_sde", "dpm_solver_pp_3m"),
    ],
)
def test_eta_zero_is_the_deterministic_solver(process_name, name, ode_name, x64):
    process = P.make_process(process_name)
    denoiser = O.preset("ring8_2d").denoiser(process)
    x_start = process.prior_sample(jax.random.PRNGKey(3), (8, 2))
    times = time_grid(process, "uniform_t", 12)  # its long last step exercises the lower orders
    assert get_sampler(name).is_deterministic(eta=0.0)
    ours = get_sampler(name).fn(denoiser, jax.random.PRNGKey(0), x_start, times, eta=0.0)
    ode = get_sampler(ode_name).fn(denoiser, None, x_start, times)
    np.testing.assert_allclose(ours.trajectory, ode.trajectory, rtol=0, atol=1e-13)
    np.testing.assert_allclose(ours.denoised, ode.denoised, rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "name, options",
    [
        ("dpm_solver_pp_2m_sde", {"eta": 0.0}),
        pytest.param("sa_solver", {"tau": 0.0}, marks=pytest.mark.slow),
        pytest.param("sa_solver", {"tau": 1.0}, marks=pytest.mark.slow),
        pytest.param("dpm_solver_pp_3m_sde", {"eta": 1.0}, marks=pytest.mark.slow),
    ],
)
def test_a_grid_ending_at_sigma_zero(name, options, x64):
    """The last step goes to lambda = +inf (the lower-order rule makes it first order there): the
    samples are finite, and without noise equal DPM-Solver++(2M)'s on the same grid (no 0 * inf)."""
    process = P.VPSDE()
    denoiser = O.preset("ring8_2d").denoiser(process)
    x_start = process.prior_sample(jax.random.PRNGKey(3), (8, 2))
    times = jnp.concatenate([time_grid(process, "uniform_t", 9), jnp.zeros(1)])
    assert float(process.sigma(times[-1])) == 0.0
    ours = get_sampler(name).fn(denoiser, jax.random.PRNGKey(0), x_start, times, **options)
    assert bool(jnp.all(jnp.isfinite(ours.trajectory)))
    if name == "dpm_solver_pp_2m_sde":
        ode = get_sampler("dpm_solver_pp_2m").fn(denoiser, None, x_start, times)
        np.testing.assert_allclose(ours.samples, ode.samples, rtol=0, atol=1e-13)


def test_sa_solver_without_corrector_is_the_2m_sde_with_heun_terms(x64):
    """Two independent constructions of one scheme: SA-Solver's Lagrange polynomial through two
    points, integrated against the kernel of noise tau^2 (Xue et al. 2023, eq. 15), and the 2M SDE's
    Taylor term h phi_2 on the slope ('heun'), with eta = tau^2 and the same noise draws."""
    process = P.VPSDE()
    denoiser = O.preset("ring8_2d").denoiser(process)
    x_start = process.prior_sample(jax.random.PRNGKey(3), (8, 2))
    times = time_grid(process, "uniform_t", 10)
    key = jax.random.PRNGKey(5)
    tau = 0.7
    sa = get_sampler("sa_solver").fn(
        denoiser, key, x_start, times, predictor_order=2, corrector_order=0, tau=tau
    )
    sde = get_sampler("dpm_solver_pp_2m_sde").fn(
        denoiser, key, x_start, times, eta=tau**2, solver_type="heun"
    )
    np.testing.assert_allclose(sa.trajectory, sde.trajectory, rtol=0, atol=1e-12)
    assert not np.allclose(
        sde.samples, get_sampler("dpm_solver_pp_2m").fn(denoiser, None, x_start, times).samples
    )  # the noise is there


# ----------------------------------------------------------------------------- exact laws
POINT = np.array([0.8, -1.5])


def _point_mass_denoiser(process):
    """The exact denoiser of data at the single point POINT: x0(x, t) = POINT."""
    return Denoiser(
        params=jnp.asarray(POINT),
        apply_fn=lambda params, x, t: jnp.broadcast_to(params, x.shape),
        process=process,
        parameterization="x0",
    )


LAW_CASES = [
    ("vp", "dpm_solver_pp_2m_sde", {}),
    ("flow", "sa_solver", {}),
    pytest.param("ve", "dpm_solver_pp_3m_sde", {"eta": 0.5}, marks=pytest.mark.slow),
    pytest.param("vp", "sa_solver", {"tau": 0.5, "corrector_order": 2}, marks=pytest.mark.slow),
    pytest.param("flow", "dpm_solver_pp_2m_sde", {"solver_type": "heun"}, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("process_name, name, options", LAW_CASES)
def test_point_mass_data_keeps_the_exact_marginal_law(process_name, name, options):
    """For data at one point c every step is exact in law: from x_T ~ N(alpha_T c, sigma_T^2 I) the
    samples at t_N are N(alpha_N c, sigma_N^2 I). Per coordinate the mean is checked to 5 standard
    errors sigma_N / sqrt(n) and the variance to 5 of its standard errors sigma_N^2 sqrt(2 / (n - 1))."""
    process = P.make_process(process_name)
    denoiser = _point_mass_denoiser(process)
    num = 40_000
    times = time_grid(process, "uniform_t", 8)
    x_start = process.alpha(times[0]) * POINT + process.sigma(times[0]) * jax.random.normal(
        jax.random.PRNGKey(0), (num, 2)
    )
    result = jax.jit(lambda key, x: get_sampler(name).fn(denoiser, key, x, times, **options))(
        jax.random.PRNGKey(1), x_start
    )
    samples = np.asarray(result.samples, np.float64)
    alpha, sigma = float(process.alpha(times[-1])), float(process.sigma(times[-1]))
    mean_error = np.abs(samples.mean(0) - alpha * POINT)
    assert np.all(mean_error < 5 * sigma / np.sqrt(num)), (mean_error, sigma)
    variance_error = np.abs(samples.var(0, ddof=1) - sigma**2)
    assert np.all(variance_error < 5 * sigma**2 * np.sqrt(2 / (num - 1))), (variance_error, sigma)


NUM_POINTS = 4096
NUM_SEEDS = 2
FLOOR_REPEATS = 8


@functools.cache
def _ring_and_floor():
    """ring8_2d and the mean sliced W2 between independent pairs of its samples (same size)."""
    oracle = O.preset("ring8_2d")

    def draw(seed, num):
        return np.asarray(oracle.sample(jax.random.PRNGKey(seed), num))

    floor = M.sliced_wasserstein_noise_floor(draw, NUM_POINTS, num_repeats=FLOOR_REPEATS, seed=0)
    return oracle, floor


DISTRIBUTION_CASES = [
    ("vp", "dpm_solver_pp_2m_sde", {}),
    pytest.param("flow", "dpm_solver_pp_2m_sde", {"solver_type": "heun"}, marks=pytest.mark.slow),
    pytest.param("ve", "dpm_solver_pp_3m_sde", {}, marks=pytest.mark.slow),
    pytest.param("flow", "dpm_solver_pp_3m_sde", {}, marks=pytest.mark.slow),
    pytest.param("vp", "sa_solver", {}, marks=pytest.mark.slow),
    pytest.param("flow", "sa_solver", {"predictor_order": 2, "corrector_order": 2}, marks=pytest.mark.slow),
    pytest.param("ve", "sa_solver", {"tau": 0.5}, marks=pytest.mark.slow),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("process_name, name, options", DISTRIBUTION_CASES)
def test_samples_reach_the_two_sample_noise_floor(process_name, name, options):
    """With eta = 1 (tau = 1) the samples of an exact denoiser on ring8_2d (8 modes of std 0.05) lie
    within 1.5x the sliced-W2 distance between two independent data sets of the same size."""
    oracle, floor = _ring_and_floor()
    process = P.make_process(process_name)
    distances = []
    for seed in range(NUM_SEEDS):
        result = sample(
            name,
            oracle.denoiser(process),
            jax.random.PRNGKey(100 + seed),
            (NUM_POINTS, 2),
            grid="uniform_t",
            num_steps=50,
            denoise_final=True,
            **options,
        )
        fresh = np.asarray(oracle.sample(jax.random.PRNGKey(1000 + seed), NUM_POINTS))
        distances.append(M.sliced_wasserstein_distance(result.samples, fresh, seed=seed))
    ratio = np.mean(distances) / floor
    assert ratio < 1.5, (
        f"sliced W2 = {np.mean(distances):.4f} is {ratio:.2f} x the floor {floor:.4f}"
    )


# ----------------------------------------------------------------------------- convergence orders
# SA-Solver at tau = 0, (predictor_order, corrector_order) -> global order min(p + 1, c) (p alone);
# the 2M SDE with Heun terms at eta = 0 (the exact integral of the line): order 2. Predictor order 4
# alone is left out: the local errors O(h^2), O(h^3) of its warm-up steps of orders 1 and 2 dominate
# its O(h^4) error at these step counts (measured slope 2.9 on VP from 64 to 256 steps); the
# corrector raises every warm-up step by one order.
ORDER_CASES = [("vp", "sa_solver", {"predictor_order": 3, "corrector_order": 4}, 4)]
SLOW_ORDER_CASES = [
    (process, "sa_solver", {"predictor_order": p, "corrector_order": c}, order)
    for process in ("vp", "ve", "flow")
    for p, c, order in ((1, 2, 2), (2, 3, 3), (3, 4, 4), (2, 0, 2), (3, 0, 3), (1, 1, 1))
    if (process, p, c) != ("vp", 3, 4)
] + [
    (process, "dpm_solver_pp_2m_sde", {"solver_type": "heun"}, 2)
    for process in ("vp", "ve", "flow")
]


def _check_order(process_name, name, options, order):
    noiseless = {"tau": 0.0} if name == "sa_solver" else {"eta": 0.0}
    options = {**options, **noiseless, "lower_order_final": False}
    slope, errors = global_order(name, options, process_name)
    assert min(errors) > 1e-12, errors
    assert abs(slope - order) < 0.3, (slope, errors)


@pytest.mark.parametrize("process_name, name, options, order", ORDER_CASES)
def test_global_order_on_gaussian_data(process_name, name, options, order, x64):
    _check_order(process_name, name, options, order)


@pytest.mark.slow
@pytest.mark.parametrize("process_name, name, options, order", SLOW_ORDER_CASES)
def test_global_order_on_gaussian_data_all_cases(process_name, name, options, order, x64):
    _check_order(process_name, name, options, order)


# ----------------------------------------------------------------------------- NFE and options
@pytest.mark.parametrize(
    "name, options",
    [
        ("sa_solver", {}),
        pytest.param("dpm_solver_pp_2m_sde", {}, marks=pytest.mark.slow),
        pytest.param("dpm_solver_pp_3m_sde", {"eta": 0.3}, marks=pytest.mark.slow),
    ],
)
def test_nfe_is_counted_at_run_time(name, options):
    counted, reported, registered = counted_nfe(name, options, "vp", 7)
    assert counted == reported == registered == 7


def test_noise_switches_determinism():
    assert not get_sampler("dpm_solver_pp_2m_sde").is_deterministic()
    assert get_sampler("dpm_solver_pp_3m_sde").is_deterministic(eta=0.0)
    assert not get_sampler("sa_solver").is_deterministic(tau=0.1)
    assert get_sampler("sa_solver").is_deterministic(tau=0.0)


BAD_OPTIONS = [
    ("dpm_solver_pp_2m_sde", {"eta": -0.5}, "eta=-0.5"),
    ("dpm_solver_pp_2m_sde", {"solver_type": "rk4"}, "solver_type='rk4'"),
    ("dpm_solver_pp_3m_sde", {"solver_type": "heun"}, "has no option"),
    ("dpm_solver_pp_3m_sde", {"eta": float("nan")}, "eta=nan"),
    ("sa_solver", {"tau": -1.0}, "tau=-1.0"),
    ("sa_solver", {"predictor_order": 5}, "predictor_order=5"),
    ("sa_solver", {"corrector_order": 5}, "corrector_order=5"),
    ("sa_solver", {"lower_order_final": None}, "lower_order_final"),
]


@pytest.mark.parametrize("name, options, message", BAD_OPTIONS, ids=[b[2] for b in BAD_OPTIONS])
def test_bad_options_raise_before_tracing(name, options, message):
    process = P.VPSDE()
    with pytest.raises(ValueError, match=message):
        sample(name, untraceable(process), jax.random.PRNGKey(0), (1, 2), num_steps=3, **options)
