"""The sampling entry point: validate everything, build the grid, run one compiled program.

``sample`` checks the sampler's name and options, the grid and the initial state before anything
compiles, draws x_T from the prior when given a shape, and runs the sampler and the optional final
step to sigma = 0 as one jitted program. Programs are cached by their static configuration
(sampler, options, final step, whether the trajectory is returned): the denoiser, key, initial state
and time grid are traced arguments, so repeated calls with the same configuration and shapes never
retrace.

The last mile. With ``denoise_final`` the grid's last step goes to sigma = 0: the state at the grid's
last time t_N is replaced by the x0 prediction there (Tweedie's formula, +1 NFE; the last step of Ho
et al. 2020's Alg. 2, of NCSNv2 and of score_sde), which for a grid whose last point is sigma = 0 is
what k-diffusion's and Karras et al.'s samplers do with their final evaluation. The probability-flow
ODE's end at sigma = 0 is the limit of its x0 prediction along the trajectory as sigma_hat -> 0 (the
data-prediction solution x_t/alpha_t = (sigma_hat_t/sigma_hat_s) x_s/alpha_s + sigma_hat_t
int x0 dsigma_hat / sigma_hat^2 tends to x0(sigma_hat = 0) as sigma_hat_t -> 0, Lu et al. 2022b,
eq. 9 in sigma_hat). Along the trajectory the x0 prediction is a smooth function of the variance
v = sigma_hat^2 (the ODE in x_hat = x / alpha is dx_hat/dv = -score/2, Karras et al. 2022, eq. 4, and
D = x_hat + v score; for Gaussian data D = x_hat(0) s / sqrt(s^2 + v) exactly), so a deterministic
sampler can take that step at a higher order without another evaluation: ``denoise_order`` = k
extrapolates the x0 predictions of the last k network evaluations (at t_N and the k - 1 grid times
before, which the sampler made anyway) to v = 0 with the Lagrange polynomial in v, an error
O(sigma_hat^(2k)). Order 1 is Tweedie's step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from diffusion.parameterization import DenoiserViews
from diffusion.samplers.base import SampleResult, get_sampler, require_int
from diffusion.samplers.grids import time_grid

__all__ = ["SamplerProgram", "final_denoise", "plan_steps", "sample", "sampler_program"]

SamplerProgram = Callable[[DenoiserViews, Array, Array, Array], SampleResult]


def _extrapolate_to_zero(nodes: Array, predictions: Array) -> Array:
    """The value at 0 of the polynomial through (nodes[j], predictions[j]) (Lagrange's form:
    sum_j p_j prod_{l != j} v_l / (v_l - v_j))."""
    count = nodes.shape[0]
    weights = []
    for j in range(count):
        weight = 1.0
        for other in range(count):
            if other != j:
                weight = weight * nodes[other] / (nodes[other] - nodes[j])
        weights.append(weight)
    return sum(w * predictions[j] for j, w in enumerate(weights))


def final_denoise(
    denoiser: DenoiserViews, result: SampleResult, times: Array, order: int = 1
) -> SampleResult:
    """The final step from the grid's last time t_N to sigma = 0 (+1 NFE; module docstring).

    Order 1 replaces the samples by the x0 prediction at t_N (Tweedie). Order k > 1 extrapolates
    that prediction and those the sampler recorded at the k - 1 grid times before t_N to
    sigma_hat^2 = 0 (``result.denoised``; a deterministic sampler's). The trajectory and the
    predictions gain the final state and the prediction at t_N.
    """
    x0_end = denoiser.x0(result.samples, times[-1]).astype(result.samples.dtype)
    x_zero = x0_end
    if order > 1:
        previous = result.denoised[-(order - 1) :]
        predictions = jnp.concatenate([previous, x0_end[None]])
        variances = jnp.exp(-2.0 * denoiser.process.log_snr(times[-order:]))  # sigma_hat^2
        variances = variances.reshape(-1, *([1] * x0_end.ndim))
        x_zero = _extrapolate_to_zero(variances, predictions).astype(x0_end.dtype)
    trajectory, denoised = result.trajectory, result.denoised
    return SampleResult(
        samples=x_zero,
        nfe=result.nfe + 1,
        trajectory=None if trajectory is None else jnp.concatenate([trajectory, x_zero[None]]),
        denoised=None if denoised is None else jnp.concatenate([denoised, x0_end[None]]),
    )


@functools.cache
def _compiled_program(
    name: str,
    option_items: tuple[tuple[str, Any], ...],
    denoise_final: bool,
    denoise_order: int,
    record: bool,
) -> SamplerProgram:
    spec = get_sampler(name)
    options = dict(option_items)

    def program(denoiser: DenoiserViews, key: Array, x_init: Array, times: Array) -> SampleResult:
        result = spec.fn(denoiser, key, x_init, times, **options)
        if denoise_final:
            order = min(denoise_order, times.shape[0])  # a grid of N steps has N + 1 predictions
            result = final_denoise(denoiser, result, times, order)
        if not record:  # unreturned, the scans' trajectory outputs are removed by JAX
            result = result.replace(trajectory=None, denoised=None)
        return result

    return jax.jit(program)


def sampler_program(
    name: str,
    *,
    denoise_final: bool = False,
    denoise_order: int = 1,
    record: bool = False,
    **options,
) -> SamplerProgram:
    """The cached jitted ``(denoiser, key, x_init, times) -> SampleResult`` of sampler ``name``.

    Validates the name and the options (ValueError before anything compiles). ``denoise_final``
    appends ``final_denoise`` of ``denoise_order`` at ``times[-1]`` (an order above 1 needs a
    deterministic sampler with a grid: its recorded predictions are extrapolated); ``record``
    returns the trajectory and the x0 predictions (``SampleResult``).
    """
    spec = get_sampler(name)
    full_options = spec.check_options(options)
    for flag, value in (("denoise_final", denoise_final), ("record", record)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be True or False, got {value!r}")
    require_int("denoise_order", denoise_order)
    deterministic = spec.is_deterministic(**full_options)
    if denoise_order > 1 and (not deterministic or spec.is_adaptive(**full_options)):
        raise ValueError(
            f"denoise_order={denoise_order} extrapolates the predictions along a deterministic "
            f"trajectory; sampler {name!r} with {options or 'its defaults'} is "
            f"{'adaptive' if deterministic else 'stochastic'}: "
            "use denoise_order=1"
        )
    option_items = tuple(sorted(full_options.items()))
    try:
        hash(option_items)
    except TypeError:
        raise ValueError(
            f"sampler {name!r}: option values must be hashable (numbers, strings, tuples), "
            f"got {full_options}"
        ) from None
    return _compiled_program(name, option_items, denoise_final, denoise_order, record)


def plan_steps(name: str, nfe: int, *, denoise_final: bool = False, **options) -> tuple[int, dict]:
    """(num_steps, complete options) with which sampler ``name`` spends exactly ``nfe`` network
    evaluations, the final step to sigma = 0 included (``SamplerSpec.steps_for_nfe``)."""
    require_int("nfe", nfe, low=1 + int(denoise_final))
    return get_sampler(name).steps_for_nfe(nfe - int(denoise_final), **options)


def _is_shape(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def sample(
    name: str,
    denoiser: DenoiserViews,
    key: Array,
    x_init_or_shape: Array | Sequence[int],
    *,
    grid: str = "uniform_t",
    num_steps: int | None = None,
    nfe: int | None = None,
    t_start: float | None = None,
    t_end: float | None = None,
    rho: float | None = None,
    denoise_final: bool = False,
    denoise_order: int = 1,
    record: bool = False,
    **options,
) -> SampleResult:
    """Sample with the registered sampler ``name`` down a ``grid`` of ``num_steps`` steps, or of the
    steps (and orders, for DPM-Solver-fast) that spend exactly ``nfe`` evaluations (``plan_steps``).

    ``x_init_or_shape`` is either x_T (batch first) or a shape, in which case x_T is drawn from
    ``process.prior_sample`` with the first half of ``jax.random.split(key)`` and the sampler uses
    the second. The grid is ``time_grid(process, grid, num_steps, t_start=..., t_end=..., rho=...)``
    (see ``diffusion.samplers.grids``); ``denoise_final`` adds the final step to sigma = 0 of
    ``denoise_order`` (+1 NFE; module docstring); ``record`` returns the trajectory. Every argument
    is checked (ValueError) before anything compiles.
    """
    if (num_steps is None) == (nfe is None):
        raise ValueError(f"give exactly one of num_steps and nfe, got {num_steps=} and {nfe=}")
    if nfe is not None:
        num_steps, options = plan_steps(name, nfe, denoise_final=denoise_final, **options)
    program = sampler_program(
        name, denoise_final=denoise_final, denoise_order=denoise_order, record=record, **options
    )
    process = denoiser.process
    times = time_grid(process, grid, num_steps, t_start=t_start, t_end=t_end, rho=rho)
    if _is_shape(x_init_or_shape):
        shape = tuple(x_init_or_shape)
        if not shape or not all(isinstance(n, int | np.integer) and n >= 1 for n in shape):
            raise ValueError(f"shape must be a non-empty tuple of positive integers, got {shape!r}")
        prior_key, key = jax.random.split(key)
        x_init = process.prior_sample(prior_key, shape)
    else:
        x_init = jnp.asarray(x_init_or_shape)
        if x_init.ndim < 1 or not jnp.issubdtype(x_init.dtype, jnp.floating):
            raise ValueError(
                f"x_init must be a floating array with a batch axis, got shape {x_init.shape} "
                f"and dtype {x_init.dtype}"
            )
    return program(denoiser, key, x_init, times.astype(x_init.dtype))
