"""What every sampler shares: its result type and the registry that maps names to samplers.

A sampler is a pure function

    fn(denoiser, key, x_init, times, **options) -> SampleResult

that integrates from ``x_init`` at ``times[0]`` down the decreasing time grid ``times`` (shape
(num_steps + 1,), see ``diffusion.samplers.grids``) and returns the samples at ``times[-1]`` with the
exact number of network evaluations, the states at every grid time and the x0 prediction of every
step (``SampleResult``). The process is the denoiser's (``denoiser.process``). The loop
over steps is a single ``lax.scan`` / ``fori_loop`` / ``while_loop``, never a Python loop. Options are
static Python values (names, orders, flags, numbers) validated before anything compiles
(``SamplerSpec.check_options``).

Noise convention shared by the fixed-step samplers (``scan_time_grid``): step i, from ``times[i]`` to
``times[i + 1]``, draws its randomness from ``jax.random.split(key, num_steps)[i]``, and a step that
needs a single Gaussian draw takes it as ``jax.random.normal(step_key, x.shape, x.dtype)``. Two samplers
that draw the same noise (e.g. DDIM with eta = 1 and ancestral sampling) therefore see identical draws
for the same key.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import Array

__all__ = [
    "SAMPLERS",
    "SampleResult",
    "SamplerFn",
    "SamplerSpec",
    "constant_nfe",
    "get_sampler",
    "keyword_defaults",
    "num_steps_of",
    "one_evaluation_per_step",
    "register_sampler",
    "require_choice",
    "require_int",
    "require_real",
    "scan_time_grid",
    "standard_normal",
    "two_evaluations_per_step",
]


@struct.dataclass
class SampleResult:
    """What a sampler returns.

    Attributes:
      samples: the state at the grid's last time (or at sigma = 0 after a final denoising step).
      nfe: int32 scalar, the exact number of network evaluations (dynamic for adaptive solvers).
      trajectory: the states at every grid time, (num_steps + 1, *x.shape), from ``x_init`` to the
        last (plus the final denoised state when there is one); None where a sampler has no grid
        (the adaptive solver).
      denoised: the x0 prediction of each step, (num_steps, *x.shape): the one its first network
        evaluation makes at the step's start (after any churn); None where there is none.

    The trajectory costs nothing unless it is returned from the compiled program: ``sample`` drops
    it unless asked (``record=True``), and JAX removes unused scan outputs.
    """

    samples: Array
    nfe: Array
    trajectory: Array | None = None
    denoised: Array | None = None


SamplerFn = Callable[..., SampleResult]


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler.

    ``fn`` is the sampler; ``nfe(num_steps, **options)`` is its exact network-evaluation count on a
    grid of ``num_steps`` steps (None for adaptive solvers, whose count is only known after the run);
    ``deterministic`` says whether the output is a function of ``x_init`` alone (with the default
    options; see ``is_deterministic``); ``defaults`` lists
    every option the sampler accepts with its default value; ``reference`` names the paper and
    algorithm it implements. ``plan(nfe, **options) -> (num_steps, options)`` chooses the grid size
    (and any NFE-dependent options, e.g. DPM-Solver-fast's orders) that spends exactly ``nfe``
    evaluations; the default searches num_steps with ``nfe(num_steps, **options) == nfe``.
    ``validate(**options)`` (optional) receives every option (defaults filled in) and raises
    ValueError for a bad value; ``deterministic_if(**options)`` (optional) refines ``deterministic``
    for options that switch the noise off (e.g. DDIM's eta = 0).
    """

    name: str
    fn: SamplerFn
    nfe: Callable[..., int | None]
    deterministic: bool
    defaults: dict[str, Any]
    reference: str
    plan: Callable[..., tuple[int, dict[str, Any]]] | None = None
    validate: Callable[..., None] | None = None
    deterministic_if: Callable[..., bool] | None = None

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Every option of this sampler, ``options`` over ``defaults``; ValueError for a bad one.

        Rejects names not in ``defaults`` and, through ``validate``, bad values; nothing compiles.
        """
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            accepted = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(
                f"sampler {self.name!r} has no option(s) {', '.join(unknown)}; accepted: {accepted}"
            )
        full_options = {**self.defaults, **options}
        if self.validate is not None:
            try:
                self.validate(**full_options)
            except ValueError as error:
                raise ValueError(f"sampler {self.name!r}: {error}") from None
        return full_options

    def is_deterministic(self, **options) -> bool:
        """Whether the output is a function of ``x_init`` alone with these options."""
        if self.deterministic_if is None:
            return self.deterministic
        return bool(self.deterministic_if(**self.check_options(options)))

    def is_adaptive(self, **options) -> bool:
        """Whether the sampler chooses its own steps (no grid, no fixed NFE) with these options."""
        try:
            return self.nfe(1, **self.check_options(options)) is None
        except ValueError:  # a one-step grid is refused (e.g. DPM-Solver-fast's planned orders)
            return False

    def steps_for_nfe(self, nfe: int, **options) -> tuple[int, dict[str, Any]]:
        """(num_steps, options) that make this sampler spend exactly ``nfe`` network evaluations.

        The returned options are complete (defaults filled in and validated).
        """
        if self.plan is not None:
            return self.plan(nfe, **options)
        full_options = self.check_options(options)
        for num_steps in range(1, int(nfe) + 1):
            if self.nfe(num_steps, **full_options) == nfe:
                return num_steps, full_options
        raise ValueError(f"sampler {self.name!r} cannot spend exactly nfe={nfe!r} with {options}")


SAMPLERS: dict[str, SamplerSpec] = {}


def register_sampler(
    *,
    nfe: Callable[..., int | None],
    deterministic: bool,
    reference: str,
    validate: Callable[..., None] | None = None,
    deterministic_if: Callable[..., bool] | None = None,
    plan: Callable[..., tuple[int, dict[str, Any]]] | None = None,
) -> Callable[[SamplerFn], SamplerFn]:
    """Decorator: register a sampler function under its own name.

    Its keyword-only parameters are its options and their defaults the registry's defaults
    (``keyword_defaults``); the other fields are those of ``SamplerSpec``. Names are unique.
    """

    def decorator(fn: SamplerFn) -> SamplerFn:
        if fn.__name__ in SAMPLERS:
            raise ValueError(f"a sampler named {fn.__name__!r} is already registered")

        def exact_nfe(num_steps: int, **options: Any) -> int | None:
            # The count takes every option, defaults filled in and validated.
            require_int("num_steps", num_steps)
            return nfe(num_steps, **SAMPLERS[fn.__name__].check_options(options))

        SAMPLERS[fn.__name__] = SamplerSpec(
            name=fn.__name__,
            fn=fn,
            nfe=exact_nfe,
            deterministic=deterministic,
            defaults=keyword_defaults(fn),
            reference=reference,
            plan=plan,
            validate=validate,
            deterministic_if=deterministic_if,
        )
        return fn

    return decorator


def one_evaluation_per_step(num_steps: int, **_) -> int:
    """NFE of a sampler that evaluates the network once per grid step."""
    return num_steps


def two_evaluations_per_step(num_steps: int, **_) -> int:
    """NFE of a sampler that evaluates the network twice per grid step (Heun-type)."""
    return 2 * num_steps


def get_sampler(name: str) -> SamplerSpec:
    """The registered sampler called ``name``; ValueError listing the registered names otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; registered: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]


# ================================================================================ helpers for samplers
def keyword_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """The keyword-only parameters of a sampler function and their defaults: its options."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(fn).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }


def require_choice(option: str, value: Any, choices: Collection[str]) -> None:
    """ValueError unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{option}={value!r} is not one of {', '.join(map(repr, choices))}")


def require_real(
    option: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    allow_inf: bool = False,
) -> None:
    """ValueError unless ``value`` is a real number in [low, high] ((low, high] with ``low_open``)."""
    is_real = isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool
    )
    if not is_real or math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{option}={value!r} must be a {'' if allow_inf else 'finite '}number")
    below = value <= low if low_open else value < low
    if below or value > high:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{option}={value!r} must lie in {interval}")


def require_int(option: str, value: Any, *, low: int = 1) -> None:
    """ValueError unless ``value`` is an integer >= ``low``."""
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
        raise ValueError(f"{option}={value!r} must be an integer >= {low}")


def num_steps_of(times: Array) -> int:
    """Number of steps of a time grid of shape (num_steps + 1,) (static under jit)."""
    return times.shape[0] - 1


def constant_nfe(nfe: int) -> Array:
    """A statically known NFE as the int32 scalar that ``SampleResult.nfe`` holds."""
    return jnp.asarray(nfe, dtype=jnp.int32)


def standard_normal(key: Array, like: Array) -> Array:
    """z ~ N(0, I) of the shape and dtype of ``like``."""
    return jax.random.normal(key, like.shape, like.dtype)


def scan_time_grid(
    step: Callable[[Array, Array, Array, Array], tuple[Array, Array]],
    x_init: Array,
    times: Array,
    key: Array,
    nfe: int,
) -> SampleResult:
    """Run ``x, x0_pred = step(x, t, s, step_key)`` for consecutive (t, s) of ``times`` in one lax.scan.

    Step i goes from t = times[i] to s = times[i + 1] with ``step_key = split(key, num_steps)[i]``
    (the noise convention of the module docstring) and returns the new state and the x0 prediction
    its first network evaluation made. The state keeps its dtype: a float64 process coefficient never
    promotes float32 samples. Returns the SampleResult with the trajectory, the predictions and
    ``nfe`` (the sampler's static count).
    """
    x_init = jnp.asarray(x_init)
    step_keys = jax.random.split(key, num_steps_of(times))

    def body(x, inputs):
        t, s, step_key = inputs
        x_next, denoised = step(x, t, s, step_key)
        x_next = x_next.astype(x.dtype)
        return x_next, (x_next, denoised.astype(x.dtype))

    final, (states, denoised) = jax.lax.scan(body, x_init, (times[:-1], times[1:], step_keys))
    trajectory = jnp.concatenate([x_init[None], states])
    return SampleResult(
        samples=final, nfe=constant_nfe(nfe), trajectory=trajectory, denoised=denoised
    )
