"""DPM-Solver++(2M) SDE and (3M) SDE: the multistep data-prediction solvers of the reverse SDE.

The reverse SDEs whose marginals are the process's (Song et al. 2021) form, in data prediction, a
family with noise rate eta >= 0 whose exact step from s to t (h = lambda_t - lambda_s) is
(Lu et al. 2022b, "DPM-Solver++", App. A: SDE-DPM-Solver++1 at eta = 1; the eta form of k-diffusion's
``sample_dpmpp_2m_sde`` / ``sample_dpmpp_3m_sde``)

    x_t = (sigma_t/sigma_s) e^{-eta h} x_s + alpha_t (1 + eta) int_0^h e^{-(1+eta)(h-u)} x0(u) du
          + sigma_t sqrt(1 - e^{-2 eta h}) z,   z ~ N(0, I).

eta = 0 is the probability-flow ODE and these solvers are then DPM-Solver++(2M) / (3M) exactly;
eta = 1 is the reverse SDE. The multistep approximations of x0(u) are DPM-Solver++'s
(``dpm_solver._multistep_update``), integrated against the kernel above, which is the ODE's kernel at
step (1 + eta) h (``predictor_corrector.sde_end`` and ``stretch``):

* 2M, 'midpoint' (Lu et al. 2022b, App. A, SDE-DPM-Solver++(2M)): x0 ~ m_0 + D1_0 / 2 with the
  first-order weight, D1_0 = (m_0 - m_1) / r_0;
* 2M, 'heun': the exact integral of the line through m_1 and m_0, weight (1+eta) h phi_2(-(1+eta) h)
  on D1_0 (k-diffusion's solver_type='heun');
* 3M: the exact integral of the quadratic through m_0, m_1, m_2 (Lu et al. 2022b, App. B), with
  DPM-Solver++(3M)'s warm-up (its second step is the 2M midpoint step).

k-diffusion's 3M SDE weights its second-derivative term D2 = (D1_0 - D1_1) / (r_0 + r_1), half of the
quadratic's h^2 x0'' (the factor of DPM-Solver's official code; see ``dpm_solver._multistep_update``);
here D2 is the quadratic's, so that eta = 0 is this project's DPM-Solver++(3M) (global order 3).
Noise: step i draws z_i from ``split(key, num_steps)[i]`` (k-diffusion defaults to a Brownian tree).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

from diffusion.parameterization import Denoiser
from diffusion.samplers.base import (
    SampleResult,
    one_evaluation_per_step,
    register_sampler,
    require_choice,
    require_real,
)
from diffusion.samplers.dpm_solver import _multistep_update
from diffusion.samplers.exponential import Node, exponential_step, model_fn, multistep_orders, node
from diffusion.samplers.predictor_corrector import (
    Past,
    check_bool,
    pec_scan,
    sde_end,
    sde_noise_scale,
    stretch,
)

__all__ = ["SOLVER_TYPES", "dpm_solver_pp_2m_sde", "dpm_solver_pp_3m_sde", "sde_multistep_step"]

SOLVER_TYPES = ("midpoint", "heun")


def sde_multistep_step(
    order: int,
    solver_type: str,
    eta: float,
    x: Array,
    start: Node,
    end: Node,
    past: Past,
    noise: Array | None,
) -> Array:
    """One DPM-Solver++ SDE step of ``order`` from start to end (module docstring).

    ``past`` holds m_0 (at start), m_1, m_2 and their lambdas; ``noise`` is z (None when eta = 0).
    """
    virtual_end = sde_end(start, end, eta)
    if order == 2 and solver_type == "heun":
        h = end.log_snr - start.log_snr
        ratio = (past.log_snrs[0] - past.log_snrs[1]) / h
        slope = (past.models[0] - past.models[1]) / ratio  # D1_0 ~ h dx0/dlambda
        x_next = exponential_step("x0", x, start, virtual_end, [(0, past.models[0]), (1, slope)])
    else:
        stretched = stretch(start, past.log_snrs, eta)
        x_next = _multistep_update(order, "x0", x, start, virtual_end, past.models, stretched)
    if noise is not None:
        x_next = x_next + sde_noise_scale(start, end, eta) * noise
    return x_next.astype(x.dtype)


def _validate(**options: Any) -> None:
    require_real("eta", options["eta"], low=0.0)
    check_bool("lower_order_final", options["lower_order_final"])
    if "solver_type" in options:
        require_choice("solver_type", options["solver_type"], SOLVER_TYPES)


def _sde_sample(
    denoiser: Denoiser,
    key: Array,
    x_init: ArrayLike,
    times: ArrayLike,
    order: int,
    eta: float,
    solver_type: str,
    lower_order_final: bool,
) -> SampleResult:
    process = denoiser.process
    times = jnp.asarray(times)
    orders = multistep_orders(node(process, times).log_snr, order, lower_order_final)

    def predictor(step_order):
        def predict(x, start, end, past, noise, data):
            return sde_multistep_step(step_order, solver_type, eta, x, start, end, past, noise)

        return predict

    return pec_scan(
        model_fn(denoiser, "x0", None),
        process,
        x_init,
        times,
        predictors=[predictor(k) for k in range(1, order + 1)],
        predictor_orders=orders,
        depth=order - 1,
        key=None if eta == 0 else key,
    )


def _deterministic_if(*, eta: float, **_) -> bool:
    return eta == 0


@register_sampler(
    nfe=one_evaluation_per_step,
    deterministic=False,
    reference="Lu et al. 2022b, DPM-Solver++: SDE-DPM-Solver++(2M), App. A; the eta family of "
    "k-diffusion's sample_dpmpp_2m_sde",
    validate=_validate,
    deterministic_if=_deterministic_if,
)
def dpm_solver_pp_2m_sde(
    denoiser: Denoiser,
    key: Array,
    x_init: ArrayLike,
    times: ArrayLike,
    *,
    eta: float = 1.0,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
) -> SampleResult:
    """DPM-Solver++(2M) SDE (module docstring): NFE = num_steps, one Gaussian draw per step.

    ``eta`` >= 0 scales the noise (1: the reverse SDE; 0: DPM-Solver++(2M), deterministic);
    ``solver_type`` 'midpoint' or 'heun' is the second-order term. Orders per step:
    ``multistep_orders``.
    """
    return _sde_sample(denoiser, key, x_init, times, 2, eta, solver_type, lower_order_final)


@register_sampler(
    nfe=one_evaluation_per_step,
    deterministic=False,
    reference="Lu et al. 2022b, DPM-Solver++: third-order multistep (App. B) on the SDE of App. A; "
    "the eta family of k-diffusion's sample_dpmpp_3m_sde",
    validate=_validate,
    deterministic_if=_deterministic_if,
)
def dpm_solver_pp_3m_sde(
    denoiser: Denoiser,
    key: Array,
    x_init: ArrayLike,
    times: ArrayLike,
    *,
    eta: float = 1.0,
    lower_order_final: bool = True,
) -> SampleResult:
    """DPM-Solver++(3M) SDE (module docstring): NFE = num_steps, one Gaussian draw per step.

    ``eta`` >= 0 scales the noise (1: the reverse SDE; 0: DPM-Solver++(3M), deterministic).
    Orders per step: ``multistep_orders``.
    """
    return _sde_sample(denoiser, key, x_init, times, 3, eta, "midpoint", lower_order_final)
