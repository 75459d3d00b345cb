"""Samplers: one pure function per solver, a registry, time grids and the ``sample`` entry point.

Every sampler is ``fn(denoiser, key, x_init, times, **options) -> SampleResult`` (see ``base``) and runs
every process and parameterization. Registered names:

* ``ancestral``, ``ddim`` (``ancestral``): Ho et al. 2020 Alg. 2; Song, Meng & Ermon 2021;
* ``euler_maruyama``, ``reverse_diffusion``, ``pc``, ``annealed_langevin`` (``sde``): Song et al. 2021;
  Song & Ermon 2019;
* ``euler``, ``heun``, ``edm_stochastic``, ``adaptive`` (``ode``): the probability-flow ODE; Karras et
  al. 2022 Alg. 1-2; diffrax;
* ``dpm_solver*`` (``dpm_solver``): Lu et al. 2022, DPM-Solver and DPM-Solver++, on the exponential
  integrator of ``exponential``.

``sample(name, denoiser, key, x_init_or_shape, grid=..., num_steps=..., **options)`` validates, builds
the grid and runs one cached jitted program; ``sweep`` runs solvers x NFE x grids against a reference;
``fit_time_grid`` learns a grid's times for one solver and denoiser (``fitted_grid``).
"""

# Importing a sampler module registers its samplers.
from diffusion.samplers import (
    ancestral,
    deis,
    dpm_solver,
    exponential,
    ode,
    predictor_corrector,
    sa_solver,
    sde,
    sde_dpm_solver,
    unipc,
)
from diffusion.samplers.api import (
    SamplerProgram,
    final_denoise,
    plan_steps,
    sample,
    sampler_program,
)
from diffusion.samplers.base import SAMPLERS, SampleResult, SamplerSpec, get_sampler
from diffusion.samplers.fitted_grid import FittedGrid, fit_time_grid
from diffusion.samplers.grids import (
    CONTINUOUS_GRIDS,
    DEFAULT_RHO,
    GRIDS,
    INDEX_GRIDS,
    shared_grid_arguments,
    time_grid,
)
from diffusion.samplers.sweep import sweep

__all__ = [
    "CONTINUOUS_GRIDS",
    "DEFAULT_RHO",
    "GRIDS",
    "INDEX_GRIDS",
    "SAMPLERS",
    "FittedGrid",
    "SampleResult",
    "SamplerProgram",
    "SamplerSpec",
    "ancestral",
    "deis",
    "dpm_solver",
    "exponential",
    "final_denoise",
    "fit_time_grid",
    "get_sampler",
    "ode",
    "plan_steps",
    "predictor_corrector",
    "sa_solver",
    "sample",
    "sampler_program",
    "sde",
    "sde_dpm_solver",
    "shared_grid_arguments",
    "sweep",
    "time_grid",
    "unipc",
]
