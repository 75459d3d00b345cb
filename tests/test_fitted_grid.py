"""Fitted time grids: the parameterization, the gradient the fit follows, the held-out gain, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import oracle as O
from diffusion import processes as P
from diffusion.flow import ode_end_at_zero_noise
from diffusion.samplers import fit_time_grid, sampler_program, time_grid
from diffusion.samplers.fitted_grid import _logits_from_times, _times_from_logits


def rmse(a, b):
    return float(jnp.sqrt(jnp.mean((a - b) ** 2)))


@pytest.mark.parametrize("process_name", ["vp", "ve", "flow", "ddpm"])
def test_logits_reproduce_any_grid_and_every_logit_vector_is_a_valid_grid(process_name, x64):
    process = P.PROCESSES[process_name]()
    times = time_grid(process, "flow_t", 12)
    logits = _logits_from_times(times, process.t_min)
    np.testing.assert_allclose(
        _times_from_logits(logits, float(times[0]), process.t_min), times, rtol=1e-12, atol=1e-15
    )
    for seed in range(5):  # arbitrary logits: starts at T, strictly decreasing, ends above t_min
        random_logits = 3.0 * jax.random.normal(jax.random.PRNGKey(seed), logits.shape)
        grid = np.asarray(_times_from_logits(random_logits, process.T, process.t_min))
        assert grid[0] == process.T and np.all(np.diff(grid) < 0) and grid[-1] > process.t_min


@pytest.mark.slow
@pytest.mark.parametrize("process_name", ["vp", "ddpm"])
def test_solver_output_is_differentiable_in_the_grid(process_name, x64):
    """The fit follows jax.grad through every solver step into the times: it must agree with central
    finite differences (a sampler that lost the times' gradient, e.g. through a bisection or a
    host-side conversion, would give zero here)."""
    process = P.PROCESSES[process_name]()
    denoiser = O.preset("ring8_2d").denoiser(process)
    x_init = process.prior_sample(jax.random.PRNGKey(0), (64, 2))
    program = sampler_program("dpm_solver_pp_2m", denoise_final=True, denoise_order=3)
    # t_end off DDPM's knots t_i = i / 1000, where its piecewise-linear log alpha has a kink.
    logits = _logits_from_times(time_grid(process, "flow_t", 6, t_end=0.0437), process.t_min)

    def loss(logits):
        grid = _times_from_logits(logits, process.T, process.t_min)
        return jnp.mean(program(denoiser, jax.random.PRNGKey(1), x_init, grid).samples ** 2)

    gradient = np.asarray(jax.grad(loss)(logits))
    step = 1e-6
    finite = [
        (loss(logits.at[i].add(step)) - loss(logits.at[i].add(-step))) / (2 * step)
        for i in range(logits.shape[0])
    ]
    assert np.abs(gradient).max() > 1e-3
    np.testing.assert_allclose(gradient, finite, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_fitted_grid_beats_its_start_on_draws_it_never_saw(x64):
    """VP, DPM-Solver++(2M) at 10 NFE on ring8_2d's exact denoiser: fitted on 512 draws, measured on
    1,024 others against the ODE's end at sigma = 0."""
    process = P.PROCESSES["vp"]()
    denoiser = O.preset("ring8_2d").denoiser(process)
    calibration = process.prior_sample(jax.random.PRNGKey(1), (512, 2))
    held_out = process.prior_sample(jax.random.PRNGKey(2), (1024, 2))
    reference = jax.jit(lambda x: ode_end_at_zero_noise(denoiser, x, process.T))(held_out)
    t_end = float(process.t_from_log_snr(-jnp.log(0.03)))
    initial = time_grid(process, "flow_t", 9, t_end=t_end)  # 9 steps + the final one = 10 NFE
    fitted = fit_time_grid(denoiser, "dpm_solver_pp_2m", initial, calibration, denoise_order=3)
    program = sampler_program("dpm_solver_pp_2m", denoise_final=True, denoise_order=3)
    key = jax.random.PRNGKey(0)
    assert int(program(denoiser, key, held_out, initial).nfe) == 10
    before = rmse(program(denoiser, key, held_out, initial).samples, reference)
    after = rmse(program(denoiser, key, held_out, fitted.times).samples, reference)
    assert fitted.rmse < fitted.initial_rmse / 3
    assert after < before / 3, (before, after)
    times = np.asarray(fitted.times)
    assert times[0] == process.T and np.all(np.diff(times) < 0) and times[-1] > process.t_min


def test_the_fit_measures_the_initial_grid_as_the_sampler_does(x64):
    """initial_rmse is the sampler's RMSE on the calibration draws against the given reference, and
    the returned grid is never worse there."""
    process = P.PROCESSES["flow"]()
    denoiser = O.preset("ring8_2d").denoiser(process)
    x_init = process.prior_sample(jax.random.PRNGKey(3), (32, 2))
    reference = jax.jit(lambda x: ode_end_at_zero_noise(denoiser, x, process.T))(x_init)
    initial = time_grid(process, "flow_t", 4, t_end=0.05)
    fitted = fit_time_grid(denoiser, "heun", initial, x_init, reference=reference, iterations=3)
    program = sampler_program("heun", denoise_final=True)
    expected = rmse(program(denoiser, jax.random.PRNGKey(0), x_init, initial).samples, reference)
    assert fitted.initial_rmse == pytest.approx(expected, rel=1e-10)
    assert fitted.rmse <= fitted.initial_rmse
    fitted_samples = program(denoiser, jax.random.PRNGKey(0), x_init, fitted.times).samples
    assert rmse(fitted_samples, reference) == pytest.approx(fitted.rmse, rel=1e-10)


@pytest.mark.parametrize(
    ("name", "arguments", "options", "message"),
    [
        ("ancestral", {}, {}, "is stochastic"),
        ("adaptive", {}, {}, "is adaptive"),
        ("heun", {"iterations": 0}, {}, "iterations=0 must be an integer >= 1"),
        ("heun", {"learning_rate": -1.0}, {}, "learning_rate must be a number > 0, got -1.0"),
        ("heun", {"initial_times": [0.5, 0.7]}, {}, "initial_times must be a decreasing"),
        ("heun", {"initial_times": [1.0, 1e-5]}, {}, "must end above t_min = 1e-05"),
        ("heun", {"initial_times": [2.0, 0.5]}, {}, r"\[t_min, T\]"),
        ("dpm_solver_pp_2m", {}, {"order": 2}, "option"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(name, arguments, options, message):
    process = P.PROCESSES["vp"]()
    denoiser = O.preset("ring8_2d").denoiser(process)
    call = {"initial_times": [1.0, 0.5, 0.1], "calibration_x": jnp.zeros((2, 2))} | arguments
    with pytest.raises(ValueError, match=message):
        fit_time_grid(denoiser, name, **call, **options)
