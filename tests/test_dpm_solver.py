"""DPM-Solver / DPM-Solver++ against exact solutions, DDIM, counted network calls and numpy.

Truths used: the exact probability-flow map of Gaussian data (oracle.ode_flow, docs/references.md
#gaussian-data), the
exact solution for a constant eps (docs/references.md #exact-step-for-a-constant-prediction) or
constant x0 prediction, DDIM(eta = 0) from the
registry (docs/references.md #ddim-and-dpm-solver-1), network calls counted at run time, and a
numpy re-implementation of
dynamic thresholding (Saharia et al. 2022).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import oracle as O
from diffusion import processes as P
from diffusion.parameterization import Denoiser
from diffusion.samplers import dpm_solver as D
from diffusion.samplers import exponential as E
from diffusion.samplers import sample
from diffusion.samplers.base import get_sampler
from diffusion.samplers.grids import time_grid
from diffusion.shapes import expand_to


def _label(name, options):
    return name + "".join(f"-{k}={v}" for k, v in options.items())


def _max_error(actual, expected):
    return float(jnp.max(jnp.abs(actual - expected)))


# ----------------------------------------------------------------------------- convergence orders
# Theoretical global orders; lower_order_final off so that the last steps keep the full order.
ORDER_CASES = {
    "dpm1": ("dpm_solver", {"order": 1}, 1),
    "dpm2": ("dpm_solver", {"order": 2}, 2),
    "dpm3": ("dpm_solver", {"order": 3}, 3),
    "2m": ("dpm_solver_multistep", {"order": 2, "lower_order_final": False}, 2),
    "3m": ("dpm_solver_multistep", {"order": 3, "lower_order_final": False}, 3),
    "pp2s": ("dpm_solver_pp_2s", {}, 2),
    "pp2m": ("dpm_solver_pp_2m", {"lower_order_final": False}, 2),
    "pp3m": ("dpm_solver_pp_3m", {"lower_order_final": False}, 3),
}
# Every solver under VP; under sub-VP and VE the four structurally distinct ones (singlestep and
# multistep, noise and data prediction), to keep the number of compiled programs down.
ORDER_RUNS = [("vp", case) for case in ORDER_CASES] + [
    (process, case) for process in ("subvp", "ve") for case in ("dpm3", "3m", "pp2s", "pp3m")
]
# The integration runs from T to t_end: VP/sub-VP lambda from -5 to 1.1, VE sigma from 50 to 0.3.
# Errors stay far above float64 round-off (> 1e-9) and are asymptotic at 32-128 steps; integrating on
# to t ~ 1e-3 makes the third-order multistep curves steeper than 3 at these step counts (their
# leading error terms partly cancel along the path).
T_END = {"vp": 0.2, "subvp": 0.2, "ve": 0.4}
CONVERGENCE_STEPS = (32, 64, 128)


@pytest.mark.parametrize("process_name, case", ORDER_RUNS, ids=[f"{p}-{c}" for p, c in ORDER_RUNS])
def test_global_order_on_gaussian_data(process_name, case, x64):
    """Slope of log error vs log steps against the exact PF-ODE map of Gaussian data
    (docs/references.md #gaussian-data, #exact-step-for-a-constant-prediction)."""
    name, options, order = ORDER_CASES[case]
    process = P.make_process(process_name)
    oracle = O.preset("gaussian_2d")
    denoiser = oracle.denoiser(process)
    x_start = process.prior_sample(jax.random.PRNGKey(0), (6, 2))
    t_end = T_END[process_name]
    exact = oracle.ode_flow(process, x_start, process.T, t_end)
    grids = [time_grid(process, "uniform_log_snr", n, t_end=t_end) for n in CONVERGENCE_STEPS]
    spec = get_sampler(name)

    @jax.jit
    def solve_all(x, grids):
        return [spec.fn(denoiser, None, x, grid, **options).samples for grid in grids]

    errors = [_max_error(samples, exact) for samples in solve_all(x_start, grids)]
    assert min(errors) > 1e-11, errors  # well above round-off: the slope measures truncation
    slope = -np.polyfit(np.log(CONVERGENCE_STEPS), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.3, (slope, errors)


# ----------------------------------------------------------------------------- exactness
def _constant_denoiser(process, parameterization, value):
    """A network whose output is the constant ``value`` (an eps or x0 prediction)."""
    return Denoiser(
        params=jnp.asarray(value),
        apply_fn=lambda params, x, t: jnp.broadcast_to(params, x.shape),
        process=process,
        parameterization=parameterization,
    )


def _exact_for_constant_eps(process, x, t_start, t_end, eps):
    """x_t = (alpha_t/alpha_s) x_s - sigma_t (e^h - 1) eps (docs/references.md
    #exact-step-for-a-constant-prediction)."""
    h = process.log_snr(t_end) - process.log_snr(t_start)
    ratio = process.alpha(t_end) / process.alpha(t_start)
    return ratio * x - process.sigma(t_end) * jnp.expm1(h) * eps


def _exact_for_constant_x0(process, x, t_start, t_end, x0):
    """x_t = (sigma_t/sigma_s) x_s + sigma_t int e^lambda dlambda x0 = ... + alpha_t (1 - e^-h) x0."""
    h = process.log_snr(t_end) - process.log_snr(t_start)
    ratio = process.sigma(t_end) / process.sigma(t_start)
    return ratio * x - process.alpha(t_end) * jnp.expm1(-h) * x0


# Each solver on one process (so that all of them appear): a constant eps makes every
# noise-prediction solver exact, a constant x0 every data-prediction (DPM-Solver++) solver.
EXACT_CASES = [
    ("vp", "eps", "dpm_solver", {"order": 1}),
    ("ddpm", "eps", "dpm_solver", {"order": 2}),
    ("ve", "eps", "dpm_solver", {"order": 3}),
    ("cosine", "eps", "dpm_solver_fast", {}),
    ("subvp", "eps", "dpm_solver_multistep", {"order": 2}),
    ("edm", "eps", "dpm_solver_multistep", {"order": 3}),
    ("vp", "x0", "dpm_solver_pp_2s", {}),
    ("ddpm", "x0", "dpm_solver_pp_2m", {}),
    ("ve", "x0", "dpm_solver_pp_3m", {}),
]


@pytest.mark.parametrize(
    "process_name, parameterization, name, options",
    EXACT_CASES,
    ids=[f"{c[0]}-{_label(c[2], c[3])}" for c in EXACT_CASES],
)
def test_exact_for_constant_predictions(process_name, parameterization, name, options, x64):
    process = P.make_process(process_name)
    x_start = process.prior_sample(jax.random.PRNGKey(1), (3, 4))
    times = time_grid(process, "uniform_t", 7)
    value = jnp.array([0.7, -1.3, 0.2, 2.0])
    exact_fn = _exact_for_constant_eps if parameterization == "eps" else _exact_for_constant_x0
    exact = exact_fn(process, x_start, times[0], times[-1], value)
    denoiser = _constant_denoiser(process, parameterization, value)
    samples = get_sampler(name).fn(denoiser, None, x_start, times, **options).samples
    assert _max_error(samples, exact) <= 1e-12 * float(jnp.max(jnp.abs(exact)))


@pytest.mark.parametrize("name", ["dpm_solver_pp_2s", "dpm_solver_pp_3m"])
def test_thresholded_solver_integrates_the_thresholded_prediction(name, x64):
    """With a constant x0 prediction c, thresholding makes the integrand the clipped, rescaled c."""
    process = P.VPSDE()
    value = jnp.array([0.5, -3.0, 1.5, 0.1])  # |c| beyond 1: the 0.9-quantile of |c| is s > 1
    denoiser = _constant_denoiser(process, "x0", value)
    x_start = process.prior_sample(jax.random.PRNGKey(2), (2, 4))
    times = time_grid(process, "uniform_log_snr", 5)
    quantile = np.quantile(np.abs(np.asarray(value)), 0.9)
    thresholded = np.clip(np.asarray(value), -quantile, quantile) / quantile
    exact = _exact_for_constant_x0(process, x_start, times[0], times[-1], thresholded)
    options = {"thresholding": True, "thresholding_ratio": 0.9}
    samples = get_sampler(name).fn(denoiser, None, x_start, times, **options).samples
    assert _max_error(samples, exact) <= 1e-12


# ----------------------------------------------------------------------------- DDIM
@pytest.mark.slow
def test_ddim_with_eta_zero_is_dpm_solver_1(x64):
    """DDIM(eta = 0) (the registry's 'ddim') equals DPM-Solver-1 step for step (docs/references.md
    #ddim-and-dpm-solver-1)."""
    process = P.DDPM()
    denoiser = O.preset("ring8_2d").denoiser(process)
    x_start = process.prior_sample(jax.random.PRNGKey(3), (16, 2))
    times = time_grid(process, "quadratic_t", 9)
    key = jax.random.PRNGKey(4)
    ddim = get_sampler("ddim").fn(denoiser, key, x_start, times, eta=0.0)
    ours = D.dpm_solver(denoiser, key, x_start, times, order=1)
    np.testing.assert_allclose(ours.samples, ddim.samples, rtol=1e-11, atol=1e-11)
    assert int(ours.nfe) == int(ddim.nfe) == 9


# ----------------------------------------------------------------------------- NFE
def _counting_denoiser(process, parameterization="eps", time_input="t"):
    """A tiny linear network that counts its evaluations at run time and its traces in Python."""
    counts = {"calls": 0, "traces": 0}

    def count_call():
        counts["calls"] += 1

    def apply_fn(params, x, t_in):
        counts["traces"] += 1
        jax.debug.callback(count_call, ordered=True)
        return params["scale"] * x + params["shift"] * expand_to(jnp.tanh(t_in), x)

    denoiser = Denoiser(
        params={"scale": jnp.asarray(0.3), "shift": jnp.asarray(0.1)},
        apply_fn=apply_fn,
        process=process,
        parameterization=parameterization,
        time_input=time_input,
    )
    return denoiser, counts


# DPM-Solver-fast's schedules written out from Lu et al. 2022, App. D.1 (K = nfe // 3 + 1 steps).
FAST_SCHEDULES = {
    5: (3, 2),
    6: (3, 2, 1),
    7: (3, 3, 1),
    10: (3, 3, 3, 1),
    20: (3, 3, 3, 3, 3, 3, 2),
}


@pytest.mark.parametrize("nfe", sorted(FAST_SCHEDULES))
def test_dpm_solver_fast_spends_exactly_the_planned_nfe(nfe):
    spec = get_sampler("dpm_solver_fast")
    num_steps, options = spec.steps_for_nfe(nfe)
    assert options["orders"] == FAST_SCHEDULES[nfe]
    assert num_steps == len(FAST_SCHEDULES[nfe]) == nfe // 3 + 1
    assert spec.nfe(num_steps, **options) == nfe
    process = P.VPSDE()
    denoiser, counts = _counting_denoiser(process)
    times = time_grid(process, "uniform_log_snr", num_steps)
    result = spec.fn(denoiser, None, jnp.ones((2, 3)), times, **options)
    result.samples.block_until_ready()
    jax.effects_barrier()
    assert counts["calls"] == int(result.nfe) == nfe


def test_nfe_formulas_and_plans():
    assert get_sampler("dpm_solver").nfe(7, order=2) == 14
    assert get_sampler("dpm_solver").steps_for_nfe(12, order=3) == (4, {"order": 3})
    assert get_sampler("dpm_solver_multistep").nfe(9) == 9
    assert get_sampler("dpm_solver_pp_2s").nfe(5) == 10
    pp_2s = get_sampler("dpm_solver_pp_2s")
    assert pp_2s.steps_for_nfe(10) == (5, pp_2s.defaults)  # complete options, defaults filled in
    pp_3m = get_sampler("dpm_solver_pp_3m")
    assert pp_3m.steps_for_nfe(10, thresholding=True) == (
        10,
        {**pp_3m.defaults, "thresholding": True},
    )
    assert get_sampler("dpm_solver_fast").nfe(4) == 10  # default orders (3, 3, 3, 1)
    given = get_sampler("dpm_solver_fast").steps_for_nfe(6, orders=(1, 2, 3))
    assert given == (3, {"orders": (1, 2, 3)})


def test_multistep_order_schedules():
    """Warm-up min(order, i + 1); with lower_order_final order k needs rho^(k - 1) <= 2 for the step
    ratio rho = h_i / h_{i-1} (order 3 up to rho = sqrt 2, order 2 up to rho = 2), wherever it is."""

    def orders(steps, order, lower_order_final=True):
        log_snrs = np.concatenate([[0.0], np.cumsum(steps)])
        return tuple(np.asarray(E.multistep_orders(log_snrs, order, lower_order_final)).tolist())

    assert orders([1.0] * 5, 3) == (1, 2, 3, 3, 3)
    assert orders([1.0] * 5, 2) == (1, 2, 2, 2, 2)
    # A uniform-t VP grid's last log-SNR step is about 4x the one before: order 1 there only.
    assert orders([1.0, 1.0, 1.0, 1.0, 4.0], 3) == (1, 2, 3, 3, 1)
    assert orders([1.0, 1.0, 1.0, 1.0, 4.0], 3, lower_order_final=False) == (1, 2, 3, 3, 3)
    # Ratios 1.4 (order 3 kept), 1.5 (order 2), 2.0 (order 2), 2.1 (order 1), then shrinking steps.
    steps = np.cumprod([1.0, 1.0, 1.4, 1.5, 2.0, 2.1, 0.5])
    assert orders(steps, 3) == (1, 2, 3, 2, 2, 1, 3)
    assert orders(steps, 2) == (1, 2, 2, 2, 2, 1, 2)
    assert E.AMPLIFICATION_LIMIT == 2.0


# ----------------------------------------------------------------------------- processes x parameterizations
SETUPS = [
    ("vp", "eps", "t", "dpm_solver", {"order": 3}),
    ("subvp", "x0", "999t", "dpm_solver_fast", {}),
    ("ve", "score", "log_sigma", "dpm_solver_multistep", {"order": 2}),
    ("cosine", "v", "t", "dpm_solver_pp_2s", {"thresholding": True}),
    ("ddpm", "eps", "index", "dpm_solver_pp_2m", {}),
    ("smld", "score", "sigma", "dpm_solver_pp_3m", {}),
    ("edm", "edm", "t", "dpm_solver_multistep", {"order": 3, "lower_order_final": False}),
    ("ddpm", "v", "t", "dpm_solver", {"order": 2}),
]


@pytest.mark.parametrize(
    "process_name, parameterization, time_input, name, options",
    SETUPS,
    ids=[f"{s[0]}-{s[1]}-{s[3]}" for s in SETUPS],
)
def test_every_process_and_parameterization(
    process_name, parameterization, time_input, name, options
):
    """Finite samples of the right shape, NFE as counted, and one trace for two calls under jit."""
    process = P.make_process(process_name)
    denoiser, counts = _counting_denoiser(process, parameterization, time_input)
    spec = get_sampler(name)
    num_steps = 6
    times = time_grid(process, "uniform_log_snr", num_steps)
    sample = jax.jit(lambda key, x: spec.fn(denoiser, key, x, times, **options))
    shape = (3, 4, 4, 2)
    first = sample(jax.random.PRNGKey(0), process.prior_sample(jax.random.PRNGKey(1), shape))
    first.samples.block_until_ready()
    jax.effects_barrier()
    traces, calls = counts["traces"], counts["calls"]
    assert first.samples.shape == shape
    assert bool(jnp.all(jnp.isfinite(first.samples)))
    assert calls == int(first.nfe) == spec.nfe(num_steps, **options)
    second = sample(jax.random.PRNGKey(2), process.prior_sample(jax.random.PRNGKey(3), shape))
    second.samples.block_until_ready()
    jax.effects_barrier()
    assert counts["traces"] == traces  # no retrace for a new key and x_init
    assert counts["calls"] == 2 * calls
    assert not bool(jnp.allclose(first.samples, second.samples))


# ----------------------------------------------------------------------------- thresholding
def _numpy_dynamic_threshold(x0, ratio, max_value):
    """Saharia et al. 2022, Sec. 2.3: s = max(max_value, quantile_p |x0|); clip to s, rescale."""
    flat = np.abs(x0).reshape(x0.shape[0], -1)
    bound = np.maximum(np.quantile(flat, ratio, axis=1), max_value)
    bound = bound.reshape((-1,) + (1,) * (x0.ndim - 1))
    return np.clip(x0, -bound, bound) * (max_value / bound)


@pytest.mark.parametrize("ratio, max_value", [(0.995, 1.0), (0.9, 1.0), (0.8, 2.0)])
def test_dynamic_threshold_matches_numpy(ratio, max_value, x64):
    rng = np.random.default_rng(0)
    x0 = rng.normal(0.0, 1.5, (4, 5, 6, 3))
    x0[0] *= 0.1  # one example entirely inside the range
    got = np.asarray(E.dynamic_threshold(jnp.asarray(x0), ratio, max_value))
    np.testing.assert_allclose(got, _numpy_dynamic_threshold(x0, ratio, max_value), rtol=1e-12)
    assert np.all(np.abs(got) <= max_value + 1e-12)
    np.testing.assert_array_equal(got[0], x0[0])


def test_dynamic_threshold_is_identity_inside_the_range():
    x0 = np.random.default_rng(1).uniform(-1.0, 1.0, (3, 8, 8, 3)).astype(np.float32)
    x0[1, 0, 0, 0], x0[2, 0, 0, 0] = 1.0, -1.0
    np.testing.assert_array_equal(E.dynamic_threshold(jnp.asarray(x0)), x0)


# ----------------------------------------------------------------------------- bad options
def _untraceable_denoiser(process):
    def apply_fn(params, x, t):
        raise AssertionError("the network was traced before the options were validated")

    return Denoiser(params=jnp.zeros(()), apply_fn=apply_fn, process=process)


BAD_CALLS = [
    ("dpm_solver", {"order": 4}, "order=4"),
    ("dpm_solver", {"order": 2.0}, "order=2.0"),
    ("dpm_solver_fast", {"orders": (3, 3)}, "3 steps"),
    ("dpm_solver_fast", {"orders": (3, 4, 1)}, "entry=4"),
    ("dpm_solver_multistep", {"order": 0}, "order=0"),
    ("dpm_solver_multistep", {"lower_order_final": "yes"}, "lower_order_final"),
    ("dpm_solver_pp_2s", {"thresholding_ratio": 1.5}, "thresholding_ratio"),
    ("dpm_solver_pp_2m", {"thresholding": True, "thresholding_max_value": 0.0}, "max_value"),
]


@pytest.mark.parametrize("name, options, message", BAD_CALLS, ids=[b[2] for b in BAD_CALLS])
def test_bad_options_raise_before_tracing(name, options, message):
    """The registry validates a sampler's options once, before anything is traced."""
    process = P.VPSDE()
    with pytest.raises(ValueError, match=message):
        sample(
            name,
            _untraceable_denoiser(process),
            jax.random.PRNGKey(0),
            (1, 2),
            num_steps=3,
            **options,
        )
    with pytest.raises(ValueError, match=message):
        get_sampler(name).nfe(3, **options)


def test_bad_nfe_raise():
    with pytest.raises(ValueError, match="cannot spend exactly nfe=2"):
        get_sampler("dpm_solver").steps_for_nfe(2, order=3)
    with pytest.raises(ValueError, match="cannot spend exactly nfe=7"):
        get_sampler("dpm_solver_pp_2s").steps_for_nfe(7)
    with pytest.raises(ValueError, match="nfe=0"):
        get_sampler("dpm_solver_fast").steps_for_nfe(0)
    with pytest.raises(ValueError, match="not nfe=7"):
        get_sampler("dpm_solver_fast").steps_for_nfe(7, orders=(3, 3))
    with pytest.raises(ValueError, match="no option"):
        get_sampler("dpm_solver").nfe(3, eta=0.0)
