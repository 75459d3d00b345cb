"""The sampling entry point: validate everything, build the grid, run one compiled program.

``sample`` checks the sampler's name and options, the grid and the initial state before anything
compiles, draws x_T from the prior when given a shape, and runs the sampler and the optional final
denoising step as one jitted program. Programs are cached by (sampler, options, denoise_final): the
denoiser, key, initial state and time grid are traced arguments, so repeated calls with the same
static configuration and shapes never retrace.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from diffusion.parameterization import Denoiser
from diffusion.samplers.base import SampleResult, get_sampler
from diffusion.samplers.grids import time_grid

__all__ = ["SamplerProgram", "final_denoise", "sample", "sampler_program"]

SamplerProgram = Callable[[Denoiser, Array, Array, Array], SampleResult]


def final_denoise(denoiser: Denoiser, result: SampleResult, t_end: Array) -> SampleResult:
    """Replace the samples at ``t_end`` by the x0 prediction E[x_0 | x_t_end] (Tweedie): +1 NFE.

    This is the last step of Ho et al. 2020's Algorithm 2 (z = 0 at t = 1) and the final denoising
    step of NCSNv2 (Song & Ermon 2020) and score_sde.
    """
    return SampleResult(
        samples=denoiser.x0(result.samples, t_end).astype(result.samples.dtype),
        nfe=result.nfe + 1,
    )


@functools.cache
def _compiled_program(
    name: str, option_items: tuple[tuple[str, Any], ...], denoise_final: bool
) -> SamplerProgram:
    spec = get_sampler(name)
    options = dict(option_items)

    def program(denoiser: Denoiser, key: Array, x_init: Array, times: Array) -> SampleResult:
        result = spec.fn(denoiser, key, x_init, times, **options)
        if denoise_final:
            result = final_denoise(denoiser, result, times[-1])
        return result

    return jax.jit(program)


def sampler_program(name: str, *, denoise_final: bool = False, **options) -> SamplerProgram:
    """The cached jitted ``(denoiser, key, x_init, times) -> SampleResult`` of sampler ``name``.

    Validates the name and the options (ValueError before anything compiles); ``denoise_final``
    appends ``final_denoise`` at ``times[-1]``.
    """
    spec = get_sampler(name)
    full_options = spec.check_options(options)
    if not isinstance(denoise_final, bool):
        raise ValueError(f"denoise_final must be True or False, got {denoise_final!r}")
    option_items = tuple(sorted(full_options.items()))
    try:
        hash(option_items)
    except TypeError:
        raise ValueError(
            f"sampler {name!r}: option values must be hashable (numbers, strings, tuples), "
            f"got {full_options}"
        ) from None
    return _compiled_program(name, option_items, denoise_final)


def _is_shape(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def sample(
    name: str,
    denoiser: Denoiser,
    key: Array,
    x_init_or_shape: Array | Sequence[int],
    *,
    grid: str = "uniform_t",
    num_steps: int,
    t_start: float | None = None,
    t_end: float | None = None,
    rho: float = 7.0,
    denoise_final: bool = False,
    **options,
) -> SampleResult:
    """Sample with the registered sampler ``name`` down a ``grid`` of ``num_steps`` steps.

    ``x_init_or_shape`` is either x_T (batch first) or a shape, in which case x_T is drawn from
    ``process.prior_sample`` with the first half of ``jax.random.split(key)`` and the sampler uses
    the second. The grid is ``time_grid(process, grid, num_steps, t_start=..., t_end=..., rho=...)``
    (see ``diffusion.samplers.grids``); ``denoise_final`` adds the Tweedie step to sigma = 0 (+1 NFE).
    Every argument is checked (ValueError) before anything compiles.
    """
    program = sampler_program(name, denoise_final=denoise_final, **options)
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
