"""A time grid fitted to one solver and one denoiser: the grid's times learned by gradient descent.

A deterministic sampler is a differentiable function of its time grid, so the grid can be trained like
any other parameter. The objective is Xue et al. 2024's ("Accelerating diffusion sampling with
optimized time steps", CVPR): the distance between the solver's output and the ground-truth solution
of the probability-flow ODE, as a function of the time steps of a fixed solver; here it is the RMSE,
over calibration draws x_T from the prior, between the sampler's output (with its final step to
sigma = 0) and the ODE's end at sigma = 0 from the same x_T (``diffusion.flow.ode_end_at_zero_noise``).
Xue et al. solve it with a constrained trust-region method; here it is minimized by differentiating
through every solver step into the times, as Watson et al. 2022 ("Learning fast samplers for
diffusion models by differentiating through sample quality", ICLR) do for their sampler's
parameters. Nothing else of the solver changes.

The grid is parameterized by its increments in sqrt(t) (the 'quadratic_t' coordinate): a softmax over
num_steps + 1 logits splits sqrt(T) - sqrt(t_min) into the num_steps steps and the gap left between the
grid's last time and t_min, so every fitted grid starts at T, decreases strictly and ends inside
[t_min, T] whatever the logits. The logits start from ``initial_times`` (any grid of
``diffusion.samplers.grids``); Adam with a cosine-decayed learning rate moves them, and the best grid
seen on the calibration draws is returned (never worse there than the initial one).

The fitted grid is a property of the denoiser: for a trained network, fit it with that network and
calibration draws of its own, then sample with ``sampler_program(name, ...)(denoiser, key, x_T,
times)``. Held-out draws measure whether it generalizes (``benchmarks/fitted_grid.py``). Use thousands
of calibration draws: the RMSE is dominated by the few draws that start near the boundary between two
modes, where the ODE's map is steep, and a fit on too few of them learns those draws instead of the
grid. On ring8_2d at 20 NFE (UniPC-3, VP) a grid fitted on 2,048 draws brought their RMSE to 3.2e-4
while that of 1,000 others rose from 1.2e-3 to 5.4e-3 (two of them at 0.12, though the median fell
9x); fitted on 8,192 draws it brought the held-out RMSE to 6.9e-4.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array
from tqdm.auto import tqdm

from diffusion.flow import ode_end_at_zero_noise
from diffusion.parameterization import DenoiserViews
from diffusion.samplers.api import sampler_program
from diffusion.samplers.base import get_sampler, require_int

__all__ = ["FittedGrid", "fit_time_grid"]


@dataclasses.dataclass(frozen=True)
class FittedGrid:
    """A fitted grid: ``times`` (decreasing, times[0] = T) and the calibration RMSE before and after."""

    times: Array
    initial_rmse: float
    rmse: float


def _logits_from_times(times: Array, t_min: float) -> Array:
    """The logits whose softmax gives ``times``' increments in sqrt(t), and the gap to t_min last."""
    roots = jnp.sqrt(jnp.concatenate([times, jnp.asarray([t_min], times.dtype)]))
    return jnp.log(roots[:-1] - roots[1:])


def _times_from_logits(logits: Array, t_start: float, t_min: float) -> Array:
    """The grid of ``_logits_from_times``'s inverse: sqrt(t) falls from sqrt(t_start) in the softmax's
    fractions of sqrt(t_start) - sqrt(t_min); the last fraction is the gap left above t_min."""
    fractions = jnp.cumsum(jax.nn.softmax(logits))[:-1]
    root_start, root_min = jnp.sqrt(t_start), jnp.sqrt(t_min)
    roots = root_start - fractions * (root_start - root_min)
    return jnp.concatenate([jnp.asarray([t_start], logits.dtype), roots**2])


def fit_time_grid(
    denoiser: DenoiserViews,
    name: str,
    initial_times: Array,
    calibration_x: Array,
    *,
    reference: Array | None = None,
    denoise_order: int = 1,
    iterations: int = 300,
    learning_rate: float = 0.01,
    progress: bool = False,
    **options,
) -> FittedGrid:
    """Fit the times of a grid for the deterministic sampler ``name`` (module docstring).

    ``initial_times``: the grid to start from (its first time is kept; its length fixes num_steps).
    ``calibration_x``: x_T draws (batch first). ``reference``: the ODE's end at sigma = 0 from each of
    them (default: ``ode_end_at_zero_noise``, which wants float64). The sampler runs with its final
    step to sigma = 0 of ``denoise_order`` (``sampler_program``) and ``options``; ``progress`` shows a
    bar with the best calibration RMSE so far. Raises ValueError, before anything compiles, for a
    stochastic or adaptive sampler, a grid that is not decreasing inside [t_min, T], or iterations /
    learning_rate out of range.
    """
    spec = get_sampler(name)
    full_options = spec.check_options(options)
    adaptive = spec.is_adaptive(**full_options)
    if adaptive or not spec.is_deterministic(**full_options):
        raise ValueError(
            f"fit_time_grid differentiates a deterministic fixed-grid sampler; {name!r} with "
            f"{options or 'its defaults'} is {'adaptive' if adaptive else 'stochastic'}"
        )
    require_int("iterations", iterations, low=1)
    if not (isinstance(learning_rate, int | float) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a number > 0, got {learning_rate!r}")
    process = denoiser.process
    times = np.asarray(initial_times, dtype=np.float64)
    if times.ndim != 1 or times.size < 2 or not np.all(np.diff(times) < 0):
        raise ValueError(
            f"initial_times must be a decreasing 1-D grid of at least 2 times, got {times!r}"
        )
    process.check_times(float(times[0]), float(times[-1]))
    if not times[-1] > process.t_min:
        raise ValueError(
            f"initial_times must end above t_min = {process.t_min!r} (the gap to it is fitted), "
            f"got {times[-1]!r}"
        )
    program = sampler_program(name, denoise_final=True, denoise_order=denoise_order, **options)
    x_init = jnp.asarray(calibration_x)
    if reference is None:
        reference = jax.jit(lambda x: ode_end_at_zero_noise(denoiser, x, float(times[0])))(x_init)
    dtype = x_init.dtype
    t_start, t_min = float(times[0]), float(process.t_min)
    key = jax.random.PRNGKey(0)  # unused by a deterministic sampler

    def rmse(logits: Array) -> Array:
        grid = _times_from_logits(logits, t_start, t_min).astype(dtype)
        samples = program(denoiser, key, x_init, grid).samples
        return jnp.sqrt(jnp.mean((samples - reference) ** 2))

    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, iterations))

    @jax.jit
    def step(logits, state):
        value, gradient = jax.value_and_grad(rmse)(logits)
        updates, state = optimizer.update(gradient, state)
        return optax.apply_updates(logits, updates), state, value

    logits = _logits_from_times(jnp.asarray(times, dtype), t_min)
    state = optimizer.init(logits)
    best_logits, best_value, initial_value = logits, np.inf, None
    bar = tqdm(range(iterations), disable=not progress, desc=f"fitting {name}'s grid")
    for _ in bar:
        new_logits, state, value = step(logits, state)  # value: the RMSE at ``logits``
        value = float(value)
        initial_value = value if initial_value is None else initial_value
        if value < best_value:
            best_logits, best_value = logits, value
            bar.set_postfix(rmse=f"{best_value:.3g}", refresh=False)
        logits = new_logits
    final_value = float(rmse(logits))
    if final_value < best_value:
        best_logits, best_value = logits, final_value
    return FittedGrid(
        times=_times_from_logits(best_logits, t_start, t_min).astype(dtype),
        initial_rmse=initial_value,
        rmse=best_value,
    )
