"""UniPC (Zhao et al. 2023) against a transcription of its equations, exact solutions, DPM-Solver++(2M)
and counted network calls.

Truths used: a numpy transcription of UniP-p / UniC-p written from the paper's equations (Sec. 3: the
update x_t = x_t^(1) - w B(h) sum_m a_m D_m / r_m with R_p a = g_p / B(h), a_1 = 1/2 for a single
difference; the corrected state starts the next step, the model value at the predicted one is
reused), structured as the authors' loop rather than as the library's scan; the exact probability-flow
map of Gaussian data (docs/references.md #gaussian-data); the exact step for a constant prediction
(docs/references.md #exact-step-for-a-constant-prediction); DPM-Solver++(2M) from the registry; network
calls counted at run time.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multistep_checks import counted_nfe, global_order, untraceable

from diffusion import oracle as O
from diffusion import processes as P
from diffusion.parameterization import Denoiser
from diffusion.samplers import sample
from diffusion.samplers.base import get_sampler
from diffusion.samplers.exponential import multistep_orders
from diffusion.samplers.grids import time_grid


# ----------------------------------------------------------------------------- the transcription
def _phi(hh, n):
    """phi_n(hh) from its definition: phi_1 = (e^hh - 1)/hh, phi_{k+1} = (phi_k - 1/k!)/hh."""
    value = np.expm1(hh) / hh
    for k in range(1, n):
        value = (value - 1.0 / math.factorial(k)) / hh
    return value


def transcribed_unipc(
    denoiser, x_start, times, *, order, variant, prediction, predictor="unip", corrector=True
):
    """UniPC written out from Zhao et al. 2023, Sec. 3, as the authors' multistep loop (numpy).

    Orders per step: the project's ``multistep_orders`` (warm-up, lower orders on long steps).
    Returns the states at the grid times and the model outputs (each made at the predicted state).
    """
    process = denoiser.process
    times = np.asarray(times)
    lam = np.asarray(process.log_snr(times))
    alpha, sigma = np.asarray(process.alpha(times)), np.asarray(process.sigma(times))
    num_steps = len(times) - 1

    def model(x, i):
        eps, x0 = denoiser.predict(jnp.asarray(x), times[i])
        return np.asarray(x0 if prediction == "x0" else eps)

    def uni(x_s, i, j, m_s, points):
        """x at t_j from x_s at t_i with the base value m_s and points [(lambda_k, m_k)]."""
        h = lam[j] - lam[i]
        hh = -h if prediction == "x0" else h
        if prediction == "x0":  # x_t^(1) = sigma_t/sigma_s x_s + alpha_t (1 - e^-h) m_s
            linear = sigma[j] / sigma[i] * x_s - alpha[j] * np.expm1(hh) * m_s
            weight = alpha[j]
        else:  # x_t^(1) = alpha_t/alpha_s x_s - sigma_t (e^h - 1) m_s
            linear = alpha[j] / alpha[i] * x_s - sigma[j] * np.expm1(hh) * m_s
            weight = sigma[j]
        if not points:
            return linear
        r = np.array([(lam_k - lam[i]) / h for lam_k, _ in points])
        differences = [m_k - m_s for _, m_k in points]
        b_of_h = hh if variant == "bh1" else np.expm1(hh)
        if len(points) == 1:
            a = np.array([0.5])
        else:
            big_r = np.stack([r**n for n in range(len(points))])
            g = np.array(
                [math.factorial(n) * hh * _phi(hh, n + 1) for n in range(1, len(points) + 1)]
            )
            a = np.linalg.solve(big_r, g / b_of_h)
        terms = [a_m * d / r_m for a_m, d, r_m in zip(a, differences, r, strict=True)]
        return linear - weight * b_of_h * sum(terms)

    def dpm_solver_pp_2m(x_s, i, m):
        """Lu et al. 2022b, Alg. 2 (DPM-Solver++(2M)); order 1 is the first-order step."""
        h = lam[i + 1] - lam[i]
        linear = sigma[i + 1] / sigma[i] * x_s
        if orders[i] == 1:
            return linear - alpha[i + 1] * np.expm1(-h) * m[i]
        r = (lam[i] - lam[i - 1]) / h
        blend = (1 + 1 / (2 * r)) * m[i] - 1 / (2 * r) * m[i - 1]
        return linear - alpha[i + 1] * np.expm1(-h) * blend

    orders = np.asarray(multistep_orders(lam, order, True)).tolist()
    x = np.asarray(x_start)
    states, models = [x], [model(x, 0)]
    for i in range(num_steps):
        p = orders[i]
        history = [(lam[i - k], models[i - k]) for k in range(1, p)]
        if predictor == "unip":
            x_predicted = uni(x, i, i + 1, models[i], history)
        else:
            x_predicted = dpm_solver_pp_2m(x, i, models)
        if i == num_steps - 1:  # no evaluation, no correction after the last step
            states.append(x_predicted)
            break
        m_new = model(x_predicted, i + 1)
        # UniC: the same step recomputed with the new evaluation as its last point (r = 1).
        x = (
            uni(x, i, i + 1, models[i], [*history, (lam[i + 1], m_new)])
            if corrector
            else x_predicted
        )
        models.append(m_new)
        states.append(x)
    return np.stack(states), np.stack(models)


TRANSCRIPTION_CASES = [
    {"order": order, "variant": variant, "prediction": prediction}
    for order, variant, prediction in itertools.product((1, 2, 3), ("bh1", "bh2"), ("x0", "eps"))
] + [
    {"order": 3, "variant": "bh1", "prediction": "x0", "corrector": False},
    {"order": 2, "variant": "bh2", "prediction": "x0", "predictor": "dpm_solver"},
    {"order": 2, "variant": "bh1", "prediction": "x0", "predictor": "dpm_solver"},
]
# The fast tier keeps one case of each order, prediction, variant and predictor.
FAST_TRANSCRIPTIONS = (
    {"order": 3, "variant": "bh1", "prediction": "x0"},
    {"order": 2, "variant": "bh2", "prediction": "eps"},
    {"order": 2, "variant": "bh1", "prediction": "x0", "predictor": "dpm_solver"},
)


def _label(options):
    return "-".join(f"{k}={v}" for k, v in options.items())


@pytest.fixture(scope="module")
def ring_problem():
    """A bimodal-in-every-direction problem on a uniform-t VP grid, whose last step is about 4x the
    one before in lambda (so the lower-order rule acts)."""
    with jax.enable_x64(True):
        process = P.VPSDE()
        denoiser = O.preset("ring8_2d").denoiser(process)
        x_start = process.prior_sample(jax.random.PRNGKey(3), (5, 2))
        times = time_grid(process, "uniform_t", 9)
    return denoiser, x_start, times


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(options, marks=() if options in FAST_TRANSCRIPTIONS else pytest.mark.slow)
        for options in TRANSCRIPTION_CASES
    ],
    ids=map(_label, TRANSCRIPTION_CASES),
)
def test_unipc_matches_the_transcribed_equations(options, ring_problem, x64):
    denoiser, x_start, times = ring_problem
    states, models = transcribed_unipc(denoiser, x_start, times, **options)
    result = get_sampler("unipc").fn(denoiser, None, x_start, times, **options)
    scale = float(np.max(np.abs(states)))
    np.testing.assert_allclose(result.trajectory, states, rtol=0, atol=1e-11 * scale)
    np.testing.assert_allclose(result.samples, states[-1], rtol=0, atol=1e-11 * scale)
    if options["prediction"] == "x0":  # the recorded x0 predictions are the model's evaluations
        np.testing.assert_allclose(result.denoised, models, rtol=0, atol=1e-11)


def test_unip2_with_bh2_is_dpm_solver_pp_2m(ring_problem, x64):
    """B(h) = e^-h - 1 and a_1 = 1/2 make UniP-2 in data prediction DPM-Solver++(2M) (Lu et al. 2022b,
    Alg. 2): the module docstring's identity, independent of the grid."""
    denoiser, x_start, times = ring_problem
    ours = get_sampler("unipc").fn(
        denoiser, None, x_start, times, order=2, variant="bh2", corrector=False
    )
    reference = get_sampler("dpm_solver_pp_2m").fn(denoiser, None, x_start, times)
    np.testing.assert_allclose(ours.trajectory, reference.trajectory, rtol=0, atol=1e-13)
    with_dpm_predictor = get_sampler("unipc").fn(
        denoiser, None, x_start, times, order=2, predictor="dpm_solver", corrector=False
    )
    np.testing.assert_allclose(with_dpm_predictor.samples, reference.samples, rtol=0, atol=1e-13)


def test_without_corrector_the_denoised_outputs_are_the_trajectorys_predictions(ring_problem, x64):
    """With corrector=False each step evaluates the network at the recorded state."""
    denoiser, x_start, times = ring_problem
    result = get_sampler("unipc").fn(denoiser, None, x_start, times, order=3, corrector=False)
    for i in range(len(times) - 1):
        expected = denoiser.x0(result.trajectory[i], times[i])
        np.testing.assert_allclose(result.denoised[i], expected, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(result.trajectory[0], x_start)


# ----------------------------------------------------------------------------- convergence orders
# (process, options, theoretical global order): UniP-p has order p, UniC-p after it order p + 1.
ORDER_CASES = [("vp", {"order": 3}, 4), ("flow", {"order": 2, "variant": "bh1"}, 3)]
SLOW_ORDER_CASES = [
    (process, {"order": order, "variant": variant}, order + 1)
    for process, order, variant in itertools.product(("vp", "ve", "flow"), (1, 2, 3), ("bh1", "bh2"))
    if (process, order, variant) not in {("vp", 3, "bh2"), ("flow", 2, "bh1")}
] + [("ve", {"order": 1, "prediction": "eps"}, 2)] + [
    (process, {"order": order, "prediction": "eps", "variant": "bh1"}, order + 1)
    for process, order in itertools.product(("vp", "flow"), (2, 3))
] + [
    (process, {"order": order, "corrector": False}, order)
    for process, order in itertools.product(("vp", "ve", "flow"), (1, 2, 3))
] + [
    (process, {"order": order, "predictor": "dpm_solver"}, order + 1)
    for process, order in itertools.product(("vp", "ve", "flow"), (2, 3))
]  # fmt: skip


def _check_order(process_name, options, order):
    # lower_order_final off: on a grid uniform in lambda it never acts, but say so.
    slope, errors = global_order("unipc", {**options, "lower_order_final": False}, process_name)
    assert min(errors) > 1e-12, errors  # far above round-off: the slope measures truncation
    assert abs(slope - order) < 0.3, (slope, errors)


@pytest.mark.parametrize(
    "process_name, options, order",
    ORDER_CASES,
    ids=[f"{c[0]}-{_label(c[1])}" for c in ORDER_CASES],
)
def test_global_order_on_gaussian_data(process_name, options, order, x64):
    _check_order(process_name, options, order)


@pytest.mark.slow
@pytest.mark.parametrize(
    "process_name, options, order",
    SLOW_ORDER_CASES,
    ids=[f"{c[0]}-{_label(c[1])}" for c in SLOW_ORDER_CASES],
)
def test_global_order_on_gaussian_data_all_variants(process_name, options, order, x64):
    _check_order(process_name, options, order)


# ----------------------------------------------------------------------------- exactness
def _constant_denoiser(process, parameterization, value):
    return Denoiser(
        params=jnp.asarray(value),
        apply_fn=lambda params, x, t: jnp.broadcast_to(params, x.shape),
        process=process,
        parameterization=parameterization,
    )


@pytest.mark.parametrize(
    "process_name, prediction",
    [
        ("flow", "x0"),
        pytest.param("vp", "x0", marks=pytest.mark.slow),
        pytest.param("ve", "eps", marks=pytest.mark.slow),
        pytest.param("ddpm", "eps", marks=pytest.mark.slow),
    ],
)
def test_exact_for_a_constant_prediction(process_name, prediction, x64):
    """A constant prediction makes every difference D vanish: the first-order step is exact
    (x0: x_t = sigma_t/sigma_s x_s + alpha_t (1 - e^-h) c; eps: x_t = alpha_t/alpha_s x_s - sigma_t
    (e^h - 1) c), composed over the grid."""
    process = P.make_process(process_name)
    value = jnp.array([0.7, -1.3, 0.2])
    denoiser = _constant_denoiser(process, prediction, value)
    x_start = process.prior_sample(jax.random.PRNGKey(1), (2, 3))
    times = time_grid(process, "uniform_t", 7)
    h = process.log_snr(times[-1]) - process.log_snr(times[0])
    if prediction == "x0":
        ratio = process.sigma(times[-1]) / process.sigma(times[0])
        exact = ratio * x_start - process.alpha(times[-1]) * jnp.expm1(-h) * value
    else:
        ratio = process.alpha(times[-1]) / process.alpha(times[0])
        exact = ratio * x_start - process.sigma(times[-1]) * jnp.expm1(h) * value
    for variant in ("bh1", "bh2"):
        result = get_sampler("unipc").fn(
            denoiser, None, x_start, times, order=3, variant=variant, prediction=prediction
        )
        np.testing.assert_allclose(result.samples, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_thresholding_integrates_the_thresholded_prediction(x64):
    """A constant x0 prediction c beyond [-1, 1]: the integrand becomes clip(c, -s, s) / s with s the
    0.9-quantile of |c| (Saharia et al. 2022, Sec. 2.3)."""
    process = P.VPSDE()
    value = np.array([0.5, -3.0, 1.5, 0.1])
    denoiser = _constant_denoiser(process, "x0", jnp.asarray(value))
    x_start = process.prior_sample(jax.random.PRNGKey(2), (2, 4))
    times = time_grid(process, "uniform_log_snr", 5)
    bound = np.quantile(np.abs(value), 0.9)
    thresholded = np.clip(value, -bound, bound) / bound
    h = process.log_snr(times[-1]) - process.log_snr(times[0])
    ratio = process.sigma(times[-1]) / process.sigma(times[0])
    exact = ratio * x_start - process.alpha(times[-1]) * jnp.expm1(-h) * thresholded
    result = get_sampler("unipc").fn(
        denoiser, None, x_start, times, thresholding=True, thresholding_ratio=0.9
    )
    np.testing.assert_allclose(result.samples, exact, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- NFE and options
@pytest.mark.parametrize(
    "options",
    [
        {},
        pytest.param({"order": 3, "prediction": "eps"}, marks=pytest.mark.slow),
        pytest.param({"order": 1, "corrector": False}, marks=pytest.mark.slow),
    ],
    ids=_label,
)
def test_nfe_is_counted_at_run_time(options):
    counted, reported, registered = counted_nfe("unipc", options, "flow", 7)
    assert counted == reported == registered == 7


BAD_OPTIONS = [
    ({"order": 4}, "order=4"),
    ({"order": 2.0}, "order=2.0"),
    ({"variant": "bh3"}, "variant='bh3'"),
    ({"prediction": "v"}, "prediction='v'"),
    ({"predictor": "heun"}, "predictor='heun'"),
    ({"corrector": 1}, "corrector=1"),
    ({"lower_order_final": "no"}, "lower_order_final"),
    ({"thresholding": True, "prediction": "eps"}, "prediction='eps' ignores it"),
    ({"thresholding_ratio": 0.0}, "thresholding_ratio"),
]


@pytest.mark.parametrize("options, message", BAD_OPTIONS, ids=[b[1] for b in BAD_OPTIONS])
def test_bad_options_raise_before_tracing(options, message):
    process = P.VPSDE()
    with pytest.raises(ValueError, match=message):
        sample("unipc", untraceable(process), jax.random.PRNGKey(0), (1, 2), num_steps=3, **options)
    with pytest.raises(ValueError, match=message):
        get_sampler("unipc").nfe(3, **options)
