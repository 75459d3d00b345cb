"""tAB-DEIS (Zhang & Chen 2023) against DDIM, its coefficients' defining integral in t, exact solutions
and counted network calls.

Truths used: DDIM(eta = 0) from the registry (docs/references.md #ddim-and-dpm-solver-1); the
coefficients' definition as an integral over t (Zhang & Chen 2023, eq. 14: the exponential-integrator
kernel alpha_t e^{-lambda(tau)} lambda'(tau) times the Lagrange basis in tau), integrated by scipy's
adaptive quadrature; the exact probability-flow map of Gaussian data (docs/references.md
#gaussian-data); network calls counted at run time.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multistep_checks import counted_nfe, global_order, untraceable
from scipy import integrate

from diffusion import oracle as O
from diffusion import processes as P
from diffusion.samplers import sample
from diffusion.samplers.base import get_sampler
from diffusion.samplers.deis import tab_weights
from diffusion.samplers.grids import time_grid


@pytest.mark.slow
@pytest.mark.parametrize(
    "process_name, grid",
    [
        ("flow", "uniform_t"),
        ("vp", "karras"),
        ("ddpm", "linspace"),
        ("ve", "uniform_log_snr"),
    ],
)
def test_order_1_is_ddim(process_name, grid, x64):
    """A polynomial of degree 0 is the constant eps_i, integrated exactly: DDIM with eta = 0."""
    process = P.make_process(process_name)
    denoiser = O.preset("ring8_2d").denoiser(process)
    x_start = process.prior_sample(jax.random.PRNGKey(3), (8, 2))
    times = time_grid(process, grid, 9)
    ours = get_sampler("deis").fn(denoiser, None, x_start, times, order=1)
    ddim = get_sampler("ddim").fn(denoiser, jax.random.PRNGKey(0), x_start, times, eta=0.0)
    np.testing.assert_allclose(ours.trajectory, ddim.trajectory, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours.denoised, ddim.denoised, rtol=1e-12, atol=1e-12)


def _weight_by_integral_in_t(process, times, i, j, order):
    """sigma_t W_ij from Zhang & Chen 2023, eq. 14 in t: alpha_t int_{t_i}^{t_{i+1}} e^{-lambda(tau)}
    lambda'(tau) l_j(tau) dtau, with l_j the Lagrange basis on t_i, ..., t_{i-order+1}."""
    nodes = [float(times[i - k]) for k in range(order)]

    def basis(tau):
        value = 1.0
        for other, node in enumerate(nodes):
            if other != j:
                value *= (tau - node) / (nodes[j] - node)
        return value

    log_snr_derivative = jax.grad(lambda tau: process.log_snr(tau))

    def integrand(tau):
        lam_prime = float(log_snr_derivative(jnp.float64(tau)))
        return float(jnp.exp(-process.log_snr(tau))) * lam_prime * basis(tau)

    value, _ = integrate.quad(
        integrand, float(times[i]), float(times[i + 1]), epsabs=0, epsrel=1e-13
    )
    return float(process.alpha(times[i + 1])) * value


@pytest.mark.slow
@pytest.mark.parametrize("process_name", ["flow", "vp", "ve"])
def test_weights_equal_their_defining_integral_in_t(process_name, x64):
    """The Gauss-Legendre weights in lambda (with the exact inverse t(lambda)) against eq. 14's
    integral in t, on a non-uniform grid, for every order and every coefficient."""
    process = P.make_process(process_name)
    times = time_grid(process, "quadratic_t", 6)
    sigma = np.asarray(process.sigma(times))
    for order in (2, 3):
        weights = np.asarray(tab_weights(process, times, order))
        for i in range(order - 1, len(times) - 1):
            for j in range(1, order):
                expected = _weight_by_integral_in_t(process, times, i, j, order)
                # x_t = DDIM - sigma_t sum_j W_ij (eps_j - eps_i): sigma_t W_ij is C_ij.
                np.testing.assert_allclose(sigma[i + 1] * weights[i, j], expected, rtol=1e-10)


ORDER_CASES = [("vp", 3), ("flow", 2)]
SLOW_ORDER_CASES = [
    (process, order)
    for process in ("vp", "ve", "flow")
    for order in (1, 2, 3)
    if (process, order) not in ORDER_CASES
]


def _check_order(process_name, order):
    slope, errors = global_order(
        "deis", {"order": order, "lower_order_final": False}, process_name, steps=(32, 64, 128)
    )
    assert min(errors) > 1e-12, errors
    assert abs(slope - order) < 0.3, (slope, errors)


@pytest.mark.parametrize("process_name, order", ORDER_CASES)
def test_global_order_on_gaussian_data(process_name, order, x64):
    _check_order(process_name, order)


@pytest.mark.slow
@pytest.mark.parametrize("process_name, order", SLOW_ORDER_CASES)
def test_global_order_on_gaussian_data_all_cases(process_name, order, x64):
    _check_order(process_name, order)


def test_nfe_is_counted_at_run_time():
    counted, reported, registered = counted_nfe("deis", {}, "vp", 6)
    assert counted == reported == registered == 6


@pytest.mark.parametrize(
    "options, message",
    [
        ({"order": 4}, "order=4"),
        ({"order": True}, "order=True"),
        ({"lower_order_final": 0}, "lower"),
    ],
)
def test_bad_options_raise_before_tracing(options, message):
    process = P.VPSDE()
    with pytest.raises(ValueError, match=message):
        sample("deis", untraceable(process), jax.random.PRNGKey(0), (1, 2), num_steps=3, **options)
