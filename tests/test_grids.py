"""Time grids against published grids (EDM, NCSN, Lin et al. 2024) and their defining properties."""

import math

import numpy as np
import pytest

from diffusion import processes as P
from diffusion.samplers.grids import (
    CONTINUOUS_GRIDS,
    GRIDS,
    chain_indices,
    shared_grid_arguments,
    time_grid,
)

CONTINUOUS_PROCESSES = list(P.PROCESSES)  # every registered process

# Karras et al. 2022, eq. 5 with rho = 7, N = 18, sigma in [0.002, 80] (docs/references.md
# #noise-levels-and-time-grids).
EDM_GRID_18 = [
    80, 57.5860, 40.7856, 28.3746, 19.3525, 12.9101, 8.4009, 5.3152, 3.2568,
    1.9233, 1.0882, 0.5853, 0.2964, 0.1395, 0.0599, 0.0229, 0.0075, 0.002,
]  # fmt: skip

# NCSN's 10 noise levels 1 -> 0.01 (docs/references.md #noise-levels-and-time-grids).
NCSN_SIGMAS_10 = [1, 0.59948, 0.35938, 0.21544, 0.12915, 0.07743, 0.04642, 0.02783, 0.01668, 0.01]

# Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", Table 2:
# 0-based timesteps of 10 sampling steps out of 1000 training steps.
LIN_TABLE_2 = {
    "linspace": [999, 888, 777, 666, 555, 444, 333, 222, 111, 0],
    "leading": [900, 800, 700, 600, 500, 400, 300, 200, 100, 0],
    "trailing": [999, 899, 799, 699, 599, 499, 399, 299, 199, 99],
}


def test_karras_grid_on_edm_is_the_published_grid(x64):
    times = np.asarray(time_grid(P.EDM(), "karras", 17, rho=7.0))
    np.testing.assert_allclose(times, EDM_GRID_18, rtol=0, atol=5e-5)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "cosine", "ddpm"])
def test_karras_grid_follows_the_rho_formula_in_sigma_hat(name, x64):
    """sigma_hat = exp(-lambda) at the grid follows eq. 5 between the end points' sigma_hat."""
    process = P.make_process(name)
    num_steps, rho = 12, 7.0
    times = time_grid(process, "karras", num_steps, rho=rho)
    sigma_hat = np.exp(-np.asarray(process.log_snr(times)))
    sigma_max, sigma_min = sigma_hat[0], sigma_hat[-1]
    ramp = np.arange(num_steps + 1) / num_steps
    expected = (
        sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    np.testing.assert_allclose(sigma_hat, expected, rtol=1e-7)


@pytest.mark.parametrize(("rho", "same_as"), [(1.0, "uniform_t"), (2.0, "quadratic_t")])
def test_flow_t_grid_on_the_rectified_flow_is_its_uniform_and_quadratic_grid(rho, same_as, x64):
    flow = P.RectifiedFlow()
    np.testing.assert_allclose(
        time_grid(flow, "flow_t", 9, rho=rho), time_grid(flow, same_as, 9), rtol=1e-12
    )


@pytest.mark.parametrize("name", ["vp", "ve", "ddpm", "edm"])
def test_flow_t_grid_puts_the_noise_levels_where_the_rectified_flow_does(name, x64):
    """On any process the grid's sigma_hat = s / (1 - s) with s uniform in s^(1/rho) between
    the end points' flow times s = sigma_hat / (1 + sigma_hat): the same levels for every process."""
    process = P.make_process(name)
    num_steps, rho = 8, 3.0
    times = np.asarray(time_grid(process, "flow_t", num_steps, rho=rho))
    sigma = np.asarray(process.sigma(times))
    sigma_hat = sigma / np.asarray(process.alpha(times))
    s_start, s_end = (value / (1 + value) for value in sigma_hat[[0, -1]])
    ramp = np.arange(num_steps + 1) / num_steps
    s = (s_start ** (1 / rho) + ramp * (s_end ** (1 / rho) - s_start ** (1 / rho))) ** rho
    np.testing.assert_allclose(sigma_hat, s / (1 - s), rtol=1e-9)
    np.testing.assert_allclose(times[[0, -1]], [process.T, process.sampling_t_end], rtol=1e-12)


def test_shared_grid_arguments_serve_every_grid_of_a_sweep(x64):
    """One rho and end time for a sweep over all grids: each grid takes what it can (a chain's index
    grid none, rho only karras and flow_t) and those that take rho use it."""
    process = P.DDPM(num_steps=100)
    t_end = float(process.chain_times[3])
    for kind in GRIDS:
        times = time_grid(process, kind, 6, **shared_grid_arguments(kind, t_end=t_end, rho=3.0))
        if kind in ("karras", "flow_t"):
            np.testing.assert_array_equal(times, time_grid(process, kind, 6, t_end=t_end, rho=3.0))
            assert not np.allclose(times, time_grid(process, kind, 6, t_end=t_end))


@pytest.mark.parametrize("name", CONTINUOUS_PROCESSES)
def test_uniform_log_snr_grid_is_uniform_in_log_snr(name, x64):
    process = P.make_process(name)
    times = time_grid(process, "uniform_log_snr", 20)
    log_snr = np.asarray(process.log_snr(times))
    steps = np.diff(log_snr)
    expected = (log_snr[-1] - log_snr[0]) / 20
    assert expected > 0  # log-SNR increases as t decreases
    np.testing.assert_allclose(steps, expected, rtol=1e-6)


@pytest.mark.parametrize("name", CONTINUOUS_PROCESSES)
def test_uniform_and_quadratic_t_grids(name, x64):
    process = P.make_process(name)
    t_start, t_end = process.T, process.sampling_t_end
    uniform = np.asarray(time_grid(process, "uniform_t", 8))
    np.testing.assert_allclose(uniform, np.linspace(t_start, t_end, 9), rtol=1e-12)
    quadratic = np.asarray(time_grid(process, "quadratic_t", 8))
    np.testing.assert_allclose(
        np.diff(np.sqrt(quadratic)), np.diff(np.sqrt(quadratic))[0], rtol=1e-9
    )


@pytest.mark.parametrize("kind", CONTINUOUS_GRIDS)
@pytest.mark.parametrize("name", CONTINUOUS_PROCESSES)
def test_continuous_grids_have_the_requested_end_points_and_decrease(kind, name, x64):
    process = P.make_process(name)
    default = np.asarray(time_grid(process, kind, 7))
    assert default.shape == (8,)
    assert default[0] == process.T and default[-1] == process.sampling_t_end
    assert np.all(np.diff(default) < 0)
    t_start = process.t_min + 0.8 * (process.T - process.t_min)
    t_end = process.t_min + 0.1 * (process.T - process.t_min)
    custom = np.asarray(time_grid(process, kind, 5, t_start=t_start, t_end=t_end))
    assert custom[0] == t_start and custom[-1] == t_end
    assert np.all(np.diff(custom) < 0)


def test_linspace_index_grid_is_the_whole_ddpm_chain():
    process = P.DDPM(num_steps=1000)
    times = np.asarray(time_grid(process, "linspace", 999), dtype=np.float64)
    np.testing.assert_allclose(times, np.arange(1000, 0, -1) / 1000, rtol=1e-6)


def test_linspace_index_grid_visits_the_ncsn_noise_levels(x64):
    process = P.SMLD(num_levels=10)
    times = time_grid(process, "linspace", 9)
    # The published levels are rounded to 5 decimals.
    np.testing.assert_allclose(np.asarray(process.sigma(times)), NCSN_SIGMAS_10, rtol=0, atol=5e-6)


@pytest.mark.parametrize("kind", sorted(LIN_TABLE_2))
def test_index_grids_match_lin_et_al_table_2(kind):
    np.testing.assert_array_equal(chain_indices(1000, kind, 9), LIN_TABLE_2[kind])
    times = np.asarray(time_grid(P.DDPM(num_steps=1000), kind, 9), dtype=np.float64)
    # Chain state x_i (0-based index i - 1) sits at t_i = i / N.
    np.testing.assert_allclose(times, (np.array(LIN_TABLE_2[kind]) + 1) / 1000, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "cosine", "num_steps": 4}, "unknown time grid 'cosine'"),
        ({"kind": "uniform_t", "num_steps": 0}, "num_steps must be an integer >= 1"),
        ({"kind": "uniform_t", "num_steps": True}, "num_steps must be an integer >= 1"),
        ({"kind": "uniform_t", "num_steps": -3}, "num_steps must be an integer >= 1"),
        ({"kind": "uniform_t", "num_steps": 2.5}, "num_steps must be an integer >= 1"),
        ({"kind": "uniform_t", "num_steps": 4, "t_start": 1.5}, "outside the process's interval"),
        ({"kind": "karras", "num_steps": 4, "t_end": 0.0}, "outside the process's interval"),
        ({"kind": "uniform_t", "num_steps": 4, "t_start": 0.2, "t_end": 0.5}, "t_start > t_end"),
        ({"kind": "karras", "num_steps": 4, "rho": 0.0}, "rho must be > 0"),
        ({"kind": "flow_t", "num_steps": 4, "rho": -1.0}, "rho must be > 0"),
        ({"kind": "quadratic_t", "num_steps": 4, "rho": 7.0}, "rho=7.0 shapes only the karras"),
        ({"kind": "linspace", "num_steps": 4}, "needs a discrete chain"),
        ({"kind": "trailing", "num_steps": 4}, "needs a discrete chain"),
    ],
)
def test_bad_grid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        time_grid(P.VPSDE(), **kwargs)


def test_bad_index_grid_arguments_raise():
    ddpm = P.DDPM(num_steps=100)
    with pytest.raises(ValueError, match="num_steps <= 99"):
        time_grid(ddpm, "linspace", 100)
    with pytest.raises(ValueError, match="takes no t_start"):
        time_grid(ddpm, "leading", 10, t_end=0.5)


def test_karras_grid_reaches_the_vp_end_points_exactly(x64):
    """The end points are pinned: no drift through the t(lambda) round trip."""
    process = P.VPSDE()
    times = np.asarray(time_grid(process, "karras", 5, t_start=0.9, t_end=2e-3))
    assert times[0] == 0.9 and times[-1] == 2e-3
    assert math.isclose(float(process.t_from_log_snr(process.log_snr(0.9))), 0.9, rel_tol=1e-12)
