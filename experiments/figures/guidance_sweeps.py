"""Guidance and acceleration sweeps (the survey's Sec. 5): samples against the guidance scale on a
labelled toy, error against NFE for the solver families, both with exact oracles (no training)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import guidance, metrics, oracle, samplers
from diffusion.flow import ode_end_at_zero_noise
from diffusion.processes import VPSDE, Process
from experiments.figures import common
from experiments.figures.base import (
    FigureContext,
    bound_check,
    check,
    new_figure,
    register,
    save,
)

# The labelled toy: four anisotropic 2-D Gaussians, class 0 the two on the left (bimodal), class 1
# the right one, class 2 the top one; neighbouring classes overlap.
TOY = dict(
    weights=(1.0, 1.0, 1.0, 1.0),
    means=((-1.2, -0.9), (-1.0, 1.0), (1.0, -0.2), (0.3, 1.9)),
    variances=((0.35, 0.2), (0.25, 0.3), (0.4, 0.3), (0.3, 0.25)),
    labels=(0, 0, 1, 2),
)
TARGET = 0  # the class every guided run asks for
PANEL_SCALES = (0.0, 1.0, 2.0, 4.0)  # the scatter panels
CONFIDENCE_SCALES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)  # the monotonicity check, superset of those
GUIDED_SAMPLER = dict(name="dpm_solver_pp_2m", grid="uniform_log_snr", num_steps=50)
# Solver families on the exact denoiser of ring8_2d: (label, registered name, options).
SOLVERS = (
    ("DDIM", "ddim", {}),
    ("Heun", "heun", {}),
    ("DPM-Solver++(2M)", "dpm_solver_pp_2m", {}),
    ("DPM-Solver++(3M)", "dpm_solver_pp_3m", {}),
    ("UniPC-2 (bh2)", "unipc", {"order": 2, "variant": "bh2"}),
    ("DEIS-3", "deis", {"order": 3}),
)
SOLVER_GRID = "karras"  # one grid for every family (Karras et al. 2022, eq. 5, rho = 7)
SLOPE_SOLVER = "DPM-Solver++(2M)"


def labelled_toy() -> oracle.GaussianMixture:
    """The labelled 2-D mixture of the guidance panels (``TOY``) as an exact oracle."""
    return oracle.gaussian_mixture(
        np.asarray(TOY["weights"]),
        np.asarray(TOY["means"]),
        [np.asarray(v) for v in TOY["variances"]],
        labels=TOY["labels"],
    )


@functools.partial(jax.jit, static_argnums=1)
def class_probability(mixture: oracle.GaussianMixture, process: Process, x: jax.Array) -> jax.Array:
    """The exact p(y = TARGET | x_0 = x) of each row: the oracle's noisy classifier at t_min (Bayes'
    rule over the components' noised densities; at t_min, sigma = 1e-3 against stds >= 0.45)."""
    return jnp.exp(mixture.class_log_prob(process, x, process.t_min)[:, TARGET])


@functools.partial(jax.jit, static_argnums=1)
def classifier_vs_free(
    mixture: oracle.GaussianMixture,
    process: Process,
    x: jax.Array,
    t: jax.Array,
    labels: jax.Array,
    scale: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """(eps, x0) of classifier guidance with the exact noisy classifier at scale s, and of
    classifier-free guidance with the exact conditional denoiser at w = s, stacked, at (x, t)."""
    denoiser = mixture.denoiser(process)
    classifier_guided = guidance.ClassifierGuidance(
        denoiser, mixture.classifier(process), labels, scale
    )
    free = guidance.ClassifierFreeGuidance(denoiser, labels, scale, num_classes=mixture.num_classes)
    return jnp.stack(classifier_guided.predict(x, t)), jnp.stack(free.predict(x, t))


def _guided_samples(
    mixture: oracle.GaussianMixture,
    process: Process,
    key: jax.Array,
    x_init: jax.Array,
    scales: tuple[float, ...],
) -> dict[float, np.ndarray]:
    """Samples of CFG towards TARGET at each scale w from one x_T through one deterministic sampler
    (the scale is a pytree leaf: the program compiles once)."""
    program = samplers.sampler_program(GUIDED_SAMPLER["name"], denoise_final=True)
    times = samplers.time_grid(process, GUIDED_SAMPLER["grid"], GUIDED_SAMPLER["num_steps"])
    denoiser = mixture.denoiser(process)
    labels = jnp.full(x_init.shape[:1], TARGET, jnp.int32)
    samples = {}
    for w in scales:
        guided = guidance.ClassifierFreeGuidance(
            denoiser, labels, jnp.asarray(w, x_init.dtype), num_classes=mixture.num_classes
        )
        samples[w] = np.asarray(program(guided, key, x_init, times.astype(x_init.dtype)).samples)
    return samples


def _slope(nfes: list[int], errors: list[float]) -> float:
    """-d log error / d log NFE between the first and the last point."""
    return float(-math.log(errors[-1] / errors[0]) / math.log(nfes[-1] / nfes[0]))


@register(
    "guidance_sweeps",
    "classifier-free guidance scale w = 0..4 on a labelled 2-D mixture (exact oracle); error "
    "against NFE of DDIM, Heun, DPM-Solver++(2M/3M), UniPC and DEIS on ring8_2d (survey Sec. 5)",
)
def guidance_sweeps(context: FigureContext) -> dict:
    """Guidance and acceleration, the two sweeps of the survey's Sec. 5, with exact denoisers.

    Guidance (top row). Data: the labelled 2-D mixture ``TOY`` (four Gaussians; class 0 is the two
    on the left, classes 1 and 2 one each) under the VP SDE, with the oracle's exact conditional and
    unconditional denoisers. Classifier-free guidance (Ho & Salimans 2022) towards class 0 with the
    convention eps = eps_uncond + w (eps_cond - eps_uncond): w = 0 is unconditional, w = 1
    conditional (Ho & Salimans's w' = w - 1). Samples of every w start from one x_T (8,192 points;
    quick: 4,096) and run through one deterministic sampler, DPM-Solver++(2M) on 50 uniform log-SNR
    steps with the final step to sigma = 0 (``denoise_final``). Checks: at w = 1 the samples have
    the class-conditional law (sliced W2 to fresh class samples within 1.5x the two-sample noise
    floor at the same size, mean over two x_T); the mean exact p(y = 0 | x_0) of the samples rises
    strictly with w over 0, 0.5, 1, 1.5, 2, 3, 4 (Wu et al. 2024, "Theoretical insights for
    diffusion guidance: a case study for Gaussian mixture models"); classifier guidance with the
    exact noisy classifier at scale s equals CFG at w = s (score_u + s grad log p_t(y | x) =
    score_u + s (score_c - score_u), since grad log p_t(x | y) = grad log p_t(x) +
    grad log p_t(y | x); Dhariwal & Nichol 2021, Ho & Salimans 2022) at 8 points, s = 0.5, 2, 4.

    Acceleration (bottom row). The exact unconditional denoiser of ``oracle.preset('ring8_2d')``
    (8 modes of std 0.05 on a circle of radius 2) under the VP SDE, float64; 1,024 points x_T ~ prior
    (quick: 256). Error: the RMSE over all coordinates against the probability-flow ODE's end at
    sigma = 0 from the same x_T (``diffusion.flow.ode_end_at_zero_noise``, Dopri5 in log-SNR at
    rtol = atol = 1e-10), as in benchmarks/solver_accuracy.py. Every solver runs on the Karras grid
    (rho = 7) down to the VP default t_end = 1e-3, then the final Tweedie step to sigma = 0, and
    spends exactly NFE 5, 10, 20, 50 (quick: 5, 20, 50) with that step counted; Heun (2 NFE per
    step + 1) spends the largest odd NFE within each budget (5, 9, 19, 49). Checks: every solver's
    error at the largest NFE is below its error at NFE 5; the log-log slope of DPM-Solver++(2M)
    (Lu et al. 2022b, second order) between NFE 20 and 50 is its order 2 within 0.5. Measured
    2.0-2.4 over x_T seeds 0-2 at 256 and 1,024 points, where the first-order DDIM gives 1.15-1.2:
    the check fails if the multistep correction is lost. The window is wide because NFE 20-50 is
    pre-asymptotic on this stiff data (its sharp modes); on the uniform log-SNR grid the same slope
    measures only ~1.5, the RMSE being dominated by the few trajectories that end near the
    boundary between two modes.
    """
    checks = []
    process = VPSDE()

    # ---------------------------------------------------------------- guidance
    mixture = labelled_toy()
    num_guided = context.size(8192, 4096)
    x_init = process.prior_sample(context.key(0), (num_guided, 2))
    guided = _guided_samples(mixture, process, context.key(1), x_init, CONFIDENCE_SCALES)
    confidence = [float(np.mean(class_probability(mixture, process, guided[w]))) for w in guided]
    rises = np.diff(confidence)
    checks.append(
        bound_check(
            "largest decrease of the mean exact p(y|x_0) between consecutive w "
            f"({', '.join(f'{w:g}' for w in CONFIDENCE_SCALES)}); negative: a strict rise",
            -rises.min(),
            0.0,
            note="mean p(y|x_0) " + ", ".join(f"{c:.4f}" for c in confidence),
        )
    )

    # w = 1 against the class-conditional law (two x_T, the figure's and one more).
    conditional = mixture.class_conditional(TARGET)
    second = _guided_samples(
        mixture,
        process,
        context.key(2),
        process.prior_sample(context.key(3), (num_guided, 2)),
        (1.0,),
    )[1.0]
    distances = [
        metrics.sliced_wasserstein_distance(
            samples, np.asarray(conditional.sample(context.key(4 + index), num_guided)), seed=index
        )
        for index, samples in enumerate((guided[1.0], second))
    ]

    def draw(seed: int, num: int) -> np.ndarray:
        return np.asarray(conditional.sample(jax.random.PRNGKey(seed), num))

    # The two-sample noise floor: sliced W2 between independent exact samples of the same size.
    floor = metrics.sliced_wasserstein_noise_floor(draw, num_guided, num_repeats=8, seed=0)
    checks.append(
        bound_check(
            "w = 1: sliced W2 to fresh samples of p_0(x | y) / two-sample noise floor",
            np.mean(distances) / floor,
            1.5,
            note=f"sliced W2 {np.mean(distances):.4f} (mean of two x_T), floor {floor:.4f}, "
            f"{num_guided} points",
        )
    )

    # Classifier guidance with the exact noisy classifier = CFG at w = s, at a few points.
    fractions = np.linspace(0.02, 0.95, 8)
    t_points = jnp.asarray(process.t_min + fractions * (process.T - process.t_min))
    x_points = mixture.sample_marginal(context.key(5), process, 8, t_points)
    point_labels = jnp.arange(8, dtype=jnp.int32) % mixture.num_classes
    worst = 0.0
    for scale in (0.5, 2.0, 4.0):
        with_classifier, free = classifier_vs_free(
            mixture, process, x_points, t_points, point_labels, jnp.asarray(scale)
        )
        worst = max(worst, float(jnp.max(jnp.abs(with_classifier - free)) / jnp.max(jnp.abs(free))))
    checks.append(
        check(
            "max |classifier guidance (exact p_t(y|x), scale s) - CFG (w = s)| / max |CFG|, "
            "eps and x0, s = 0.5, 2, 4",
            worst,
            0.0,
            1e-12,
            note="float64 rounding: the classifier's gradient by autodiff, the CFG combination "
            "from the conditional and unconditional oracles",
        )
    )

    # ---------------------------------------------------------------- acceleration
    ring = oracle.preset("ring8_2d")
    denoiser = ring.denoiser(process)
    num_points = context.size(1024, 256)
    x_ring = process.prior_sample(context.key(6), (num_points, 2))
    reference = np.asarray(jax.jit(lambda x: ode_end_at_zero_noise(denoiser, x, process.T))(x_ring))
    budgets = (5, 10, 20, 50) if not context.quick else (5, 20, 50)
    errors, spent, fewest = {}, {}, {}  # fewest: the samples at the smallest budget
    for label, name, options in SOLVERS:
        errors[label], spent[label] = [], []
        for budget in budgets:
            nfe = _largest_nfe_within(name, budget, options)
            result = samplers.sample(
                name,
                denoiser,
                context.key(7),
                x_ring,
                grid=SOLVER_GRID,
                nfe=nfe,
                denoise_final=True,
                **options,
            )
            assert int(result.nfe) == nfe, (label, int(result.nfe), nfe)
            samples = np.asarray(result.samples)
            errors[label].append(float(np.sqrt(np.mean((samples - reference) ** 2))))
            spent[label].append(nfe)
            if budget == budgets[0]:
                fewest[label] = samples
        checks.append(
            bound_check(
                f"{label}: RMSE at NFE {spent[label][-1]} <= RMSE at NFE {spent[label][0]}",
                errors[label][-1],
                errors[label][0],
            )
        )
    tail = [budgets.index(20), budgets.index(50)]
    slopes = {
        label: _slope([spent[label][i] for i in tail], [errors[label][i] for i in tail])
        for label in errors
    }
    checks.append(
        check(
            f"log-log slope of {SLOPE_SOLVER}'s RMSE between NFE 20 and 50 (order 2)",
            slopes[SLOPE_SOLVER],
            2.0,
            0.5,
            note="pre-asymptotic on ring8_2d's sharp modes; DDIM (first order): "
            f"{slopes['DDIM']:.2f}",
        )
    )

    # ---------------------------------------------------------------- drawing
    figure = new_figure(4, 2, panel_inches=3.4)
    grid_1d = np.linspace(-3.2, 3.2, 161)
    grid_x, grid_y = np.meshgrid(grid_1d, grid_1d)
    grid_points = jnp.asarray(np.stack([grid_x.ravel(), grid_y.ravel()], axis=1))
    density_target = np.exp(
        np.asarray(common.log_prob(conditional, process, grid_points, process.t_min))
    ).reshape(grid_x.shape)
    density_all = np.exp(
        np.asarray(common.log_prob(mixture, process, grid_points, process.t_min))
    ).reshape(grid_x.shape)
    shown = min(num_guided, 1500)
    for column, w in enumerate(PANEL_SCALES):
        axes = figure.add_subplot(2, 4, column + 1)
        axes.contourf(grid_x, grid_y, density_target, levels=8, cmap="Blues")
        axes.contour(grid_x, grid_y, density_all, levels=6, colors="0.55", linewidths=0.5)
        axes.scatter(guided[w][:shown, 0], guided[w][:shown, 1], s=1.5, c="tab:red", lw=0)
        axes.set_xlim(grid_1d[0], grid_1d[-1])
        axes.set_ylim(grid_1d[0], grid_1d[-1])
        axes.set_aspect("equal")
        role = {0.0: " (unconditional)", 1.0: " (conditional)"}.get(w, "")
        axes.set_title(
            f"w = {w:g}{role}: mean p(y|x_0) = {confidence[CONFIDENCE_SCALES.index(w)]:.3f}",
            fontsize=8,
        )
    axes = figure.add_subplot(2, 4, (5, 6))
    for label, _, _ in SOLVERS:
        axes.loglog(spent[label], errors[label], "o-", ms=3, label=f"{label} ({slopes[label]:.1f})")
    axes.set_xticks(list(budgets), [str(b) for b in budgets])
    axes.minorticks_off()
    axes.set_xlabel("NFE (final step to sigma = 0 included)")
    axes.set_ylabel("RMSE to the ODE's end at sigma = 0")
    axes.set_title(
        f"ring8_2d, VP, exact denoiser, {SOLVER_GRID} grid (slope NFE 20-50 in brackets)",
        fontsize=8,
    )
    axes.legend(fontsize=6)
    axes = figure.add_subplot(2, 4, 7)
    axes.plot(CONFIDENCE_SCALES, confidence, "o-", ms=3)
    axes.set_xlabel("guidance scale w")
    axes.set_ylabel("mean exact p(y | x_0)")
    axes.set_title("classification confidence of the samples", fontsize=8)
    axes = figure.add_subplot(2, 4, 8)
    axes.scatter(reference[:, 0], reference[:, 1], s=6, c="k", lw=0, label="ODE end (exact)")
    low = budgets[0]
    for label, colour in (("DDIM", "tab:blue"), (SLOPE_SOLVER, "tab:green")):
        axes.scatter(
            fewest[label][:, 0],
            fewest[label][:, 1],
            s=3,
            c=colour,
            lw=0,
            label=f"{label}, NFE {low}",
        )
    axes.set_aspect("equal")
    axes.set_title(f"ring8_2d: what the error at NFE {low} looks like", fontsize=8)
    axes.legend(fontsize=6, loc="center")
    figure.suptitle(
        "Guidance (CFG: eps_u + w (eps_c - eps_u), towards the left class) and acceleration "
        "(survey Sec. 5)"
    )
    save(figure, context, "guidance_sweeps")
    return {
        "settings": {
            "toy": TOY,
            "target_class": TARGET,
            "guided_sampler": GUIDED_SAMPLER,
            "num_guided_samples": num_guided,
            "solvers": [{"label": s[0], "name": s[1], "options": s[2]} for s in SOLVERS],
            "solver_grid": SOLVER_GRID,
            "num_ring_points": num_points,
            "nfe_budgets": budgets,
        },
        "checks": checks,
        "data": {
            "confidence": dict(zip(CONFIDENCE_SCALES, confidence, strict=True)),
            "w1_sliced_w2": distances,
            "w1_noise_floor": floor,
            "nfe": spent,
            "rmse": errors,
            "slope_20_50": slopes,
        },
    }


def _largest_nfe_within(name: str, budget: int, options: dict) -> int:
    """The largest NFE <= ``budget`` that sampler ``name`` can spend exactly, with the final step to
    sigma = 0 (Heun: 2 per step + 1 is odd)."""
    for nfe in range(budget, 1, -1):
        try:
            samplers.plan_steps(name, nfe, denoise_final=True, **options)
        except ValueError:
            continue
        return nfe
    raise ValueError(f"sampler {name!r} cannot spend any NFE in [2, {budget}]")
