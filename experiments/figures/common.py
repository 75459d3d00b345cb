"""Small helpers the figures share: 1-D mixtures, their exact CDFs under a process, KS checks."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special, stats

from diffusion import oracle, samplers
from diffusion.processes import Process
from experiments.figures.base import Check, bound_check

__all__ = [
    "bonferroni_ks_bound",
    "ks_check",
    "langevin_at_level",
    "langevin_path",
    "log_prob",
    "mixture_1d",
    "mixture_cdf",
    "mixture_density",
    "posterior_mean",
    "sample_with_snapshots",
    "score",
]


def mixture_1d(
    weights: Sequence[float], means: Sequence[float], stds: Sequence[float]
) -> oracle.GaussianMixture:
    """The 1-D Gaussian mixture sum_k w_k N(mu_k, s_k^2) as an exact oracle."""
    return oracle.gaussian_mixture(
        np.asarray(weights, float),
        np.asarray(means, float)[:, None],
        [np.array([s**2]) for s in stds],
    )


# The oracle's methods, compiled once per process (eager calls would compile every small op).
@functools.partial(jax.jit, static_argnums=1)
def log_prob(mixture: oracle.GaussianMixture, process: Process, x: jax.Array, t) -> jax.Array:
    """log p_t(x) of an oracle mixture (rows of x), jitted."""
    return mixture.log_prob(process, x, t)


@functools.partial(jax.jit, static_argnums=1)
def score(mixture: oracle.GaussianMixture, process: Process, x: jax.Array, t) -> jax.Array:
    """grad log p_t(x) of an oracle mixture (rows of x), jitted."""
    return mixture.score(process, x, t)


@functools.partial(jax.jit, static_argnums=1)
def posterior_mean(mixture: oracle.GaussianMixture, process: Process, x: jax.Array, t) -> jax.Array:
    """E[x_0 | x_t = x] of an oracle mixture (rows of x), jitted."""
    return mixture.x0(process, x, t)


def mixture_density(
    mixture: oracle.GaussianMixture, process: Process, x: np.ndarray, t: float
) -> np.ndarray:
    """p_t(x) on a 1-D grid x from the oracle's exact log-density (Chan 2024, Sec. 3.2)."""
    x = jnp.asarray(x, dtype=jnp.result_type(float))[:, None]
    return np.exp(np.asarray(log_prob(mixture, process, x, t)))


def mixture_cdf(
    mixture: oracle.GaussianMixture, process: Process, t: float
) -> Callable[[np.ndarray], np.ndarray]:
    """The exact CDF of a 1-D mixture's marginal p_t = sum_k w_k N(alpha mu_k, alpha^2 c_k + sigma^2)
    (the marginal identity of Chan 2024, Sec. 3.2, integrated component by component)."""
    alpha, sigma = (float(v) for v in _alpha_sigma(process, t))
    weights = np.asarray(mixture.weights, float)
    means = alpha * np.asarray(mixture.means, float)[:, 0]
    stds = np.sqrt(alpha**2 * np.asarray(mixture.eigvals, float)[:, 0] + sigma**2)

    def cdf(x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, float)[..., None] - means) / stds
        return np.sum(weights * special.ndtr(z), axis=-1)

    return cdf


@functools.partial(jax.jit, static_argnums=0)
def _alpha_sigma(process: Process, t) -> tuple[jax.Array, jax.Array]:
    return process.alpha(t), process.sigma(t)


def bonferroni_ks_bound(num_samples: int, num_tests: int, level: float = 1e-3) -> float:
    """Critical value of the one-sample KS statistic at family-wise level ``level`` over
    ``num_tests`` tests (Bonferroni): the (1 - level/num_tests) quantile of Kolmogorov's law."""
    return float(stats.kstwo.ppf(1.0 - level / num_tests, num_samples))


def ks_check(
    quantity: str,
    samples: np.ndarray,
    cdf: Callable[[np.ndarray], np.ndarray],
    num_tests: int,
    level: float = 1e-3,
) -> Check:
    """KS statistic of ``samples`` against the exact ``cdf``, bounded by its Bonferroni critical
    value (fixed seeds; a correct sampler fails with probability below ``level`` per figure)."""
    samples = np.asarray(samples, float).ravel()
    statistic = stats.kstest(samples, cdf).statistic
    return bound_check(
        quantity,
        statistic,
        bonferroni_ks_bound(len(samples), num_tests, level),
        note=f"KS statistic, n = {len(samples)}, critical value at family-wise level {level} "
        f"over {num_tests} tests",
    )


def two_sample_ks_check(
    quantity: str, first: np.ndarray, second: np.ndarray, num_tests: int, level: float = 1e-3
) -> Check:
    """Two-sample KS statistic with its Bonferroni critical value (asymptotic Kolmogorov law with
    the effective size n m / (n + m))."""
    first, second = np.ravel(first), np.ravel(second)
    statistic = stats.ks_2samp(first, second).statistic
    effective = len(first) * len(second) / (len(first) + len(second))
    critical = stats.kstwobign.ppf(1.0 - level / num_tests) / math.sqrt(effective)
    return bound_check(
        quantity,
        statistic,
        critical,
        note=f"two-sample KS, sizes {len(first)} and {len(second)}, family-wise level {level} "
        f"over {num_tests} tests",
    )


# ------------------------------------------------------------------------------ Langevin
def langevin_at_level(
    denoiser, key: jax.Array, x: jax.Array, t: float, step_size: float, num_steps: int
) -> jax.Array:
    """``num_steps`` steps of unadjusted Langevin x <- x + tau score(x, t) + sqrt(2 tau) z on the
    marginal p_t (Chan 2024, eq. 68, tau = ``step_size``).

    This is the library's annealed Langevin sampler (Song & Ermon 2019, Alg. 1) with one noise
    level: its step a = step_lr sigma_t^2 / sigma_L^2 is step_lr when the only level is t, and its
    update x + a/2 score + sqrt(a) z is Chan's with a = 2 tau.
    """
    program = samplers.sampler_program(
        "annealed_langevin", step_lr=2.0 * float(step_size), n_steps_each=int(num_steps)
    )
    times = jnp.full((1,), t, dtype=x.dtype)
    return program(denoiser, key, x, times).samples


def langevin_path(
    denoiser, key: jax.Array, x: jax.Array, t: float, step_size: float, num_steps: int
) -> jax.Array:
    """The whole path (num_steps + 1, *x.shape) of ``langevin_at_level``: the one-level sampler
    composed one step at a time in a lax.scan (the sampler returns only its final state)."""
    spec = samplers.get_sampler("annealed_langevin")
    times = jnp.full((1,), t, dtype=x.dtype)

    @jax.jit
    def run(denoiser, key, x):
        def step(current, step_key):
            result = spec.fn(
                denoiser, step_key, current, times, step_lr=2.0 * float(step_size), n_steps_each=1
            )
            return result.samples, result.samples

        _, path = jax.lax.scan(step, x, jax.random.split(key, num_steps))
        return jnp.concatenate([x[None], path])

    return run(denoiser, key, x)


# ------------------------------------------------------------------------------ snapshots
def sample_with_snapshots(
    name: str,
    denoiser,
    key: jax.Array,
    x_init: jax.Array,
    times: jax.Array,
    snapshot_indices: Sequence[int],
    **options,
) -> list[np.ndarray]:
    """The states of registered sampler ``name`` at ``times[i]`` for each i in ``snapshot_indices``.

    The samplers return only their final state, so the run is composed of the same sampler on the
    consecutive sub-grids times[i:j + 1] between snapshots (sub-run k with fold_in(key, k)). For a
    sampler whose step depends only on (x, t, s) and fresh noise (ancestral, DDIM, Euler-Maruyama,
    reverse diffusion, PC, Euler, Heun) this is the same Markov chain as one run down ``times``, so
    the final state has the law of a single run; multistep solvers would restart at every snapshot.
    """
    indices = sorted(set(int(i) for i in snapshot_indices))
    if not indices or indices[0] < 0 or indices[-1] >= len(times):
        raise ValueError(f"snapshot indices must lie in [0, {len(times) - 1}], got {indices}")
    program = samplers.sampler_program(name, **options)
    states, x, current = [], x_init, 0
    for chunk, index in enumerate(indices):
        if index > current:
            sub_grid = times[current : index + 1]
            x = program(denoiser, jax.random.fold_in(key, chunk), x, sub_grid).samples
            current = index
        states.append(np.asarray(x))
    return states
