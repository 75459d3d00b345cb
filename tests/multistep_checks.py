"""Checks shared by the tests of UniPC, DEIS, SA-Solver and the DPM-Solver++ SDE samplers.

* ``global_order``: the slope of log error against log steps on the exact probability-flow map of
  Gaussian data (``oracle.ode_flow``, docs/references.md #gaussian-data), float64 (callers use the
  ``x64`` fixture), from T to a time where lambda ~ 1 on a grid uniform in lambda;
* ``counted_nfe``: the network evaluations of one compiled run, counted as they execute;
* ``untraceable``: a denoiser that fails if traced, to show that options are checked first.
"""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import oracle as O
from diffusion import processes as P
from diffusion.parameterization import Denoiser
from diffusion.samplers.base import get_sampler
from diffusion.samplers.grids import time_grid

# End times with lambda ~ 1 (VP 1.1, VE -log 0.3 ~ 1.2 at t = 0.4 of sigma 0.01..50, flow log 3): the
# errors stay far above float64 round-off at 256 steps and are asymptotic from 64 steps.
T_END = {"vp": 0.2, "ve": 0.4, "flow": 0.25}
STEPS = (64, 128, 256)


def global_order(name, options, process_name, steps=STEPS, grid="uniform_log_snr"):
    """(slope of -log error vs log steps, errors) of sampler ``name`` on Gaussian data."""
    process = P.make_process(process_name)
    oracle = O.preset("gaussian_2d")
    denoiser = oracle.denoiser(process)
    x_start = process.prior_sample(jax.random.PRNGKey(0), (6, 2))
    t_end = T_END[process_name]
    exact = oracle.ode_flow(process, x_start, process.T, t_end)
    grids = [time_grid(process, grid, n, t_end=t_end) for n in steps]
    spec = get_sampler(name)

    @jax.jit
    def solve_all(x, grids):
        # The key only matters to stochastic samplers, whose noise is switched off in these tests.
        key = jax.random.PRNGKey(1)
        return [spec.fn(denoiser, key, x, grid, **options).samples for grid in grids]

    errors = [float(jnp.max(jnp.abs(samples - exact))) for samples in solve_all(x_start, grids)]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    return slope, errors


class CountingNetwork:
    """A network wrapper that counts its executions at run time (jax.debug.callback)."""

    def __init__(self, apply_fn):
        self.apply_fn = apply_fn
        self.calls = 0

    def _count(self):
        self.calls += 1

    def __call__(self, params, x, t, **kwargs):
        jax.debug.callback(self._count, ordered=True)
        return self.apply_fn(params, x, t, **kwargs)


def counted_nfe(name, options, process_name, num_steps, grid="uniform_t"):
    """(network executions counted during one compiled run, the NFE the run reports, registry NFE)."""
    process = P.make_process(process_name)
    exact = O.preset("ring8_2d").denoiser(process)
    network = CountingNetwork(exact.apply_fn)
    denoiser = exact.replace(apply_fn=network)
    times = time_grid(process, grid, num_steps)
    spec = get_sampler(name)
    run = jax.jit(lambda key, x: spec.fn(denoiser, key, x, times, **options))
    x_init = process.prior_sample(jax.random.PRNGKey(0), (4, 2))
    result = jax.block_until_ready(run(jax.random.PRNGKey(1), x_init))
    jax.effects_barrier()
    return network.calls, int(result.nfe), spec.nfe(num_steps, **options)


def untraceable(process):
    """A denoiser whose network raises if it is ever traced."""

    def apply_fn(params, x, t):
        raise AssertionError("the network was traced before the options were validated")

    return Denoiser(params=jnp.zeros(()), apply_fn=apply_fn, process=process)
