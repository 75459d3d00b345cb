"""UniPC: the unified predictor (UniP) and corrector (UniC) of Zhao et al. 2023.

Notation (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models", Sec. 3, and its data-prediction form in the appendix). A step from s to t has
lambda-length h = lambda_t - lambda_s > 0; m is the network's noise prediction (``prediction='eps'``)
or data prediction ('x0'), with the signed step hh = h or -h and the output weight w = sigma_t or
alpha_t. Its first-order part is the exponential step of ``exponential_step``,

    x_t^(1) = scale x_s - w (e^hh - 1) m_s     (scale alpha_t/alpha_s or sigma_t/sigma_s; DDIM),

and UniPC adds the evaluations m_k at lambda_s + r_k h (k = 1..K, distinct nonzero r_k) as

    x_t = x_t^(1) - w B(hh) sum_k a_k D_k / r_k,         D_k = m_k - m_s,
    R_K a = g_K / B(hh),   R_K[n, k] = r_k^n (n = 0..K-1),   g_n = n! hh phi_{n+1}(hh) (n = 1..K),

with B(hh) = hh ('bh1') or e^hh - 1 ('bh2') and phi_n the phi-functions (``exponential.phi``).
For K = 1 UniPC uses a_1 = 1/2, the h -> 0 limit of the solution g_1 / B (Zhao et al.'s simplified
coefficient; their code and diffusers' UniPCMultistepScheduler do the same).

* UniP-p, the predictor of order p, uses the p - 1 previous evaluations (r_k < 0): K = p - 1.
* UniC-p, the corrector after a step of order p, adds the evaluation at the step's end (r = 1,
  made at the predicted state) to the same p - 1 earlier ones: K = p, and the corrected state has
  order p + 1 (Zhao et al. 2023, Theorem 3.1). The next step starts from the corrected state and
  reuses the evaluation at the predicted one: NFE = num_steps, and the last step is not corrected.

Solving R_K a = g_K / B exactly makes B(hh) a independent of B: for K >= 2 the update is the exact
integral of the polynomial through the K + 1 points, whatever B. The two variants therefore differ
only where K = 1 (UniP-2 and UniC-1), through B(hh) / 2 against the exact g_1 = hh phi_2(hh); with
'bh2' UniP-2 in data prediction is DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) exactly.

The corrector works after any multistep predictor (Zhao et al. 2023, Sec. 3.1): ``predictor=
'dpm_solver'`` predicts with the multistep DPM-Solver of ``diffusion.samplers.dpm_solver`` (DPM-Solver++
in data prediction), so that ``order=2, predictor='dpm_solver'`` is UniC-2 after DPM-Solver++(2M).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
from diffusion.samplers.exponential import (
    Node,
    exponential_step,
    model_fn,
    multistep_orders,
    node,
    phi,
    thresholder,
)
from diffusion.samplers.predictor_corrector import Past, check_bool, check_order, pec_scan

__all__ = ["ORDERS", "PREDICTIONS", "PREDICTORS", "VARIANTS", "unified_update", "unipc"]

ORDERS = (1, 2, 3)
VARIANTS = ("bh1", "bh2")
PREDICTIONS = ("x0", "eps")
PREDICTORS = ("unip", "dpm_solver")


def unified_update(
    prediction: str,
    variant: str,
    x: Array,
    start: Node,
    end: Node,
    m_start: Array,
    ratios: Sequence[Array],
    values: Sequence[Array],
) -> Array:
    """UniPC's update from ``start`` to ``end`` with the evaluations ``values`` m_k at lambda_s + r_k h.

    x_t = x_t^(1) - w B(hh) sum_k a_k (m_k - m_s) / r_k with R_K a = g_K / B(hh), a_1 = 1/2 when
    K = 1 (module docstring; Zhao et al. 2023, Sec. 3). No ratios: the first-order step (DDIM).
    """
    base = exponential_step(prediction, x, start, end, [(0, m_start)])
    count = len(ratios)
    if count == 0:
        return base
    h = end.log_snr - start.log_snr
    if prediction == "x0":
        signed_h, weight = -h, jnp.exp(end.log_alpha)
    else:
        signed_h, weight = h, jnp.exp(end.log_sigma)
    b_of_h = signed_h if variant == "bh1" else jnp.expm1(signed_h)
    if count == 1:
        coefficients = [0.5]
    else:
        powers = jnp.stack([jnp.stack([ratio**n for ratio in ratios]) for n in range(count)])
        # g_n = n! hh phi_{n+1}(hh), and exponential.phi(hh, n) = hh phi_{n+1}(hh).
        targets = jnp.stack([math.factorial(n) * phi(signed_h, n) for n in range(1, count + 1)])
        solution = jnp.linalg.solve(powers, targets / b_of_h)
        coefficients = [solution[k] for k in range(count)]
    correction = sum(
        a * (value - m_start) / ratio
        for a, value, ratio in zip(coefficients, values, ratios, strict=True)
    )
    return (base - weight * b_of_h * correction).astype(x.dtype)


def _unip(order: int, prediction: str, variant: str):
    """UniP-``order`` from start = t_i to end with m_i, m_{i-1}, ..., m_{i-order+1}."""

    def predict(x, start, end, past: Past, noise, data):
        h = end.log_snr - start.log_snr
        ratios = [(past.log_snrs[k] - start.log_snr) / h for k in range(1, order)]
        values = [past.models[k] for k in range(1, order)]
        return unified_update(prediction, variant, x, start, end, past.models[0], ratios, values)

    return predict


def _dpm_solver_predictor(order: int, prediction: str):
    """The multistep DPM-Solver(++) step of ``order`` (Lu et al. 2022b, Alg. 2 and App. B)."""

    def predict(x, start, end, past: Past, noise, data):
        return _multistep_update(order, prediction, x, start, end, past.models, past.log_snrs)

    return predict


def _unic(order: int, prediction: str, variant: str):
    """UniC-``order``: the state at t_i (``start``) recomputed from the one at t_{i-1} (``previous``)
    with m_{i-1}, ..., m_{i-order} and the new m_i (ratio 1), made at the predicted state."""

    def correct(x_previous, x_predicted, previous, start, past: Past, noise, data):
        h = start.log_snr - previous.log_snr
        ratios = [(past.log_snrs[1 + k] - previous.log_snr) / h for k in range(1, order)]
        values = [past.models[1 + k] for k in range(1, order)]
        return unified_update(
            prediction,
            variant,
            x_previous,
            previous,
            start,
            past.models[1],
            [*ratios, jnp.ones_like(h)],
            [*values, past.models[0]],
        )

    return correct


def _validate(**options: Any) -> None:
    check_order("order", options["order"], ORDERS)
    require_choice("variant", options["variant"], VARIANTS)
    require_choice("prediction", options["prediction"], PREDICTIONS)
    require_choice("predictor", options["predictor"], PREDICTORS)
    check_bool("corrector", options["corrector"])
    check_bool("lower_order_final", options["lower_order_final"])
    check_bool("thresholding", options["thresholding"])
    require_real(
        "thresholding_ratio", options["thresholding_ratio"], low=0.0, high=1.0, low_open=True
    )
    require_real(
        "thresholding_max_value", options["thresholding_max_value"], low=0.0, low_open=True
    )
    if options["thresholding"] and options["prediction"] != "x0":
        raise ValueError(
            f"thresholding=True acts on the data prediction; prediction={options['prediction']!r} "
            "ignores it: use prediction='x0'"
        )


@register_sampler(
    nfe=one_evaluation_per_step,
    deterministic=True,
    reference="Zhao et al. 2023, UniPC: UniP-p and UniC-p (Sec. 3, Theorem 3.1), B(h) = h (bh1) or "
    "e^h - 1 (bh2); corrector after DPM-Solver++ multistep (Lu et al. 2022b)",
    validate=_validate,
)
def unipc(
    denoiser: Denoiser,
    key: Array,
    x_init: ArrayLike,
    times: ArrayLike,
    *,
    order: int = 2,
    variant: str = "bh2",
    prediction: str = "x0",
    predictor: str = "unip",
    corrector: bool = True,
    lower_order_final: bool = True,
    thresholding: bool = False,
    thresholding_ratio: float = 0.995,
    thresholding_max_value: float = 1.0,
) -> SampleResult:
    """UniPC-``order`` (Zhao et al. 2023): UniP-p then UniC-p, one network evaluation per step.

    ``order`` p in 1..3 is the predictor's (UniP-p, or the multistep DPM-Solver(++) of order p with
    ``predictor='dpm_solver'``); the corrector UniC-p after it makes the corrected states of order
    p + 1. ``corrector=False`` leaves the predictor alone (order p). ``variant`` is B(h): 'bh1'
    (B = h) or 'bh2' (B = e^h - 1; the default of diffusers). ``prediction`` 'x0' (data
    prediction, the default) or 'eps'. The per-step orders are ``multistep_orders`` (warm-up, and
    with ``lower_order_final`` a lower order on a step much longer in lambda than the one before); each
    correction has the order of the step it corrects, and the last step is not corrected.
    ``thresholding`` (data prediction only) applies ``dynamic_threshold`` to every x0 prediction, as
    DPM-Solver++ does. Deterministic: ``key`` is unused. NFE = num_steps.
    """
    del key
    process = denoiser.process
    threshold = thresholder(thresholding, thresholding_ratio, thresholding_max_value)
    model = model_fn(denoiser, prediction, threshold)
    times = jnp.asarray(times)
    predictor_orders = multistep_orders(node(process, times).log_snr, order, lower_order_final)
    if predictor == "unip":
        predictors = [_unip(p, prediction, variant) for p in range(1, order + 1)]
    else:
        predictors = [_dpm_solver_predictor(p, prediction) for p in range(1, order + 1)]
    correctors, corrector_orders = (), None
    if corrector:
        correctors = [_unic(p, prediction, variant) for p in range(1, order + 1)]
        # The correction at t_i has the order of step i - 1; none at t_0.
        corrector_orders = jnp.concatenate([jnp.zeros(1, jnp.int32), predictor_orders[:-1]])
    return pec_scan(
        model,
        process,
        x_init,
        times,
        predictors=predictors,
        predictor_orders=predictor_orders,
        depth=order,
        correctors=correctors,
        corrector_orders=corrector_orders,
    )
