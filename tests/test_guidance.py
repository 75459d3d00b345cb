"""Guidance and inpainting wrappers against the exact oracle of labelled Gaussian mixtures.

Exact identities (float64): CFG at w = 0 / 1 is the unconditional / conditional denoiser; classifier
guidance with the exact noisy classifier is CFG with the exact conditional score at the same scale
(grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x)); the guided probability-flow ODE of
every sampler converges to an independent tight solve of the guided field; inpainting's predictions
are the point mass's on the known part and the exact marginal's on an independent unknown part.
Statistical tests (marked slow) use fixed seeds and tolerances from the noise floor / standard errors.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import guidance as G
from diffusion import metrics as M
from diffusion import oracle as O
from diffusion import processes as P
from diffusion.flow import solve_adaptive
from diffusion.models.noisy_classifier import NoisyClassifier
from diffusion.parameterization import Denoiser
from diffusion.samplers import SAMPLERS, get_sampler, sample, time_grid


def ring_two_classes():
    """ring8_2d with alternate modes in class 0 and class 1 (four well-separated modes each)."""
    return O.preset("ring8_2d").with_labels([0, 1, 0, 1, 0, 1, 0, 1])


def overlapping_classes():
    """Three anisotropic 2-D Gaussians, class 0 one of them and class 1 two, overlapping."""
    means = [[-1.0, 0.0], [1.0, 0.0], [0.0, 1.5]]
    covariances = [np.array([0.6, 0.3]), np.array([0.3, 0.6]), np.array([0.5, 0.5])]
    return O.gaussian_mixture([1.0, 1.0, 1.0], means, covariances, labels=[0, 1, 1])


@jax.jit
def predict(denoiser, x, t):
    """(eps, x0) of any denoiser, compiled once per wrapper configuration and shape (tests run
    whole programs rather than op by op: several times faster on CPU)."""
    return denoiser.predict(x, t)


def points(process, oracle, num, seed):
    """Noised data at spread-out times (rows at different t)."""
    fractions = np.linspace(0.02, 0.95, num)
    t = jnp.asarray(process.t_min + fractions * (process.T - process.t_min))
    return oracle.sample_marginal(jax.random.PRNGKey(seed), process, num, t), t


# ================================================================================ classifier-free
def slow_beyond(names, fast):
    """Parameters ``names`` where only those in ``fast`` run in the fast tier."""
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", slow_beyond(["vp", "ve", "edm", "cosine"], fast=("vp",)))
def test_cfg_is_the_affine_combination_of_exact_predictions(name, x64):
    process = P.make_process(name)
    oracle = overlapping_classes()
    x, t = points(process, oracle, 6, 0)
    labels = jnp.array([0, 1, 0, 1, 1, 0])
    alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]

    @functools.partial(jax.jit, static_argnums=1)
    def guided_views(w, doubled_batch):
        guided = G.ClassifierFreeGuidance(
            oracle.denoiser(process), labels, w, num_classes=2, doubled_batch=doubled_batch
        )
        return (*guided.predict(x, t), guided.score(x, t))

    @jax.jit
    def exact_views():
        return [
            oracle.eps(process, x, t),
            oracle.eps(process, x, t, labels=labels),
            oracle.score(process, x, t),
            oracle.score(process, x, t, labels=labels),
            oracle.x0(process, x, t, labels=labels),
        ]

    eps_uncond, eps_cond, score_uncond, score_cond, x0_cond = exact_views()
    for w in (0.0, 1.0, 2.5):
        for doubled_batch in (True, False):
            eps, x0, score = guided_views(w, doubled_batch)
            # Ho & Salimans 2022, eq. 6 with (1 + w') = w, from the oracle directly.
            np.testing.assert_allclose(eps, eps_uncond + w * (eps_cond - eps_uncond), rtol=1e-10)
            np.testing.assert_allclose(alpha * x0 + sigma * eps, x, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(
                score, score_uncond + w * (score_cond - score_uncond), rtol=1e-9
            )
            if w == 1.0:
                np.testing.assert_allclose(x0, x0_cond, rtol=1e-10)


class CountingEps:
    """An oracle network that records the batch size of every call."""

    def __init__(self, process):
        self.process = process
        self.batch_sizes = []

    def __call__(self, oracle, x, t, y=None):
        self.batch_sizes.append(x.shape[0])
        return oracle.eps(self.process, x, t, labels=y)


def test_cfg_network_passes_and_nfe_accounting():
    """One pass on a doubled batch, or two passes: twice one evaluation either way."""
    process = P.VPSDE()
    oracle = ring_two_classes()
    x = oracle.sample_marginal(jax.random.PRNGKey(1), process, 5, 0.4)
    for doubled_batch, expected in ((True, [10]), (False, [5, 5])):
        network = CountingEps(process)
        denoiser = Denoiser(params=oracle, apply_fn=network, process=process)
        guided = G.ClassifierFreeGuidance(
            denoiser, 1, 3.0, num_classes=2, doubled_batch=doubled_batch
        )
        predict(guided, x, 0.4)  # the network runs (is traced) once per pass
        assert network.batch_sizes == expected
        assert G.evaluations_per_call(guided) == 2
    assert G.evaluations_per_call(denoiser) == 1
    inpainted = G.Inpainting(guided, known=jnp.zeros(2), mask=jnp.array([True, False]))
    assert G.evaluations_per_call(inpainted) == 2
    classifier_guided = G.ClassifierGuidance(denoiser, oracle.classifier(process), 0, 1.0)
    assert G.evaluations_per_call(classifier_guided) == 1
    assert classifier_guided.classifier_gradients_per_call == 1


@pytest.mark.slow
def test_wrappers_pass_through_jit_without_retracing():
    process = P.VESDE()
    oracle = ring_two_classes()
    x = oracle.sample_marginal(jax.random.PRNGKey(2), process, 4, 0.3)
    traces = []

    @jax.jit
    def guided_eps(denoiser, x):
        traces.append(1)
        return denoiser.eps(x, 0.3)

    for labels, w in ((jnp.array([0, 1, 0, 1]), 2.0), (jnp.array([1, 1, 0, 0]), 5.0)):
        guided = G.ClassifierFreeGuidance(oracle.denoiser(process), labels, w, num_classes=2)
        np.testing.assert_allclose(guided_eps(guided, x), guided.eps(x, 0.3), rtol=1e-5)
    assert len(traces) == 1


@pytest.mark.slow
def test_guidance_interval_guides_inside_and_is_conditional_outside(x64):
    """Kynkäänniemi et al. 2024: guidance for sigma_hat in (0.3, 2], plain conditional elsewhere;
    the same set written in log-SNR is [-log 2, -log 0.3)."""
    process = P.VPSDE()
    oracle = overlapping_classes()
    denoiser = oracle.denoiser(process)
    sigma_hat = np.array([0.05, 0.29, 0.31, 1.0, 1.99, 2.01, 10.0])
    t = process.t_from_log_snr(-jnp.log(jnp.asarray(sigma_hat)))
    x = oracle.sample_marginal(jax.random.PRNGKey(3), process, len(t), t)
    inside = (sigma_hat > 0.3) & (sigma_hat <= 2.0)
    everywhere = G.ClassifierFreeGuidance(denoiser, 0, 4.0, num_classes=2)
    conditional = G.ClassifierFreeGuidance(denoiser, 0, 1.0, num_classes=2)
    expected = np.where(
        inside[:, None], predict(everywhere, x, t)[0], predict(conditional, x, t)[0]
    )
    np.testing.assert_allclose(
        predict(conditional, x, t)[0], oracle.eps(process, x, t, labels=jnp.zeros(7, int))
    )
    for variable, interval in (("sigma", (0.3, 2.0)), ("log_snr", (-np.log(2.0), -np.log(0.3)))):
        windowed = G.ClassifierFreeGuidance(
            denoiser, 0, 4.0, num_classes=2, interval=interval, interval_variable=variable
        )
        np.testing.assert_array_equal(windowed.guidance_weight(t), np.where(inside, 4.0, 1.0))
        np.testing.assert_allclose(predict(windowed, x, t)[0], expected, rtol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("prediction", slow_beyond(["x0", "eps"], fast=("x0",)))
def test_rescaled_cfg(prediction, x64):
    """Lin et al. 2024, Sec. 3.4: phi = 0 is plain CFG; phi = 1 gives the guided prediction the
    per-example std of the conditional one, keeping its direction; w = 1 is left unchanged."""
    process = P.VPSDE()
    oracle = O.gaussian_mixture(
        [1.0, 1.0],
        [[-1.0, 0.5, 0.0, 1.0], [1.0, 0.0, -0.5, 0.0]],
        [np.full(4, 0.3), np.full(4, 0.5)],
        labels=[0, 1],
    )
    x, t = points(process, oracle, 5, 4)
    denoiser = oracle.denoiser(process)

    def guided(w, phi):
        return G.ClassifierFreeGuidance(
            denoiser, 1, w, num_classes=2, rescale=phi, rescale_prediction=prediction
        )

    index = 1 if prediction == "x0" else 0
    plain = predict(guided(3.0, 0.0), x, t)
    conditional = predict(guided(1.0, 0.0), x, t)
    rescaled = predict(guided(3.0, 1.0), x, t)
    std = functools.partial(np.std, axis=1)
    np.testing.assert_allclose(std(rescaled[index]), std(conditional[index]), rtol=1e-10)
    np.testing.assert_allclose(  # same direction: a positive multiple of the plain CFG prediction
        rescaled[index] / plain[index],
        np.broadcast_to(std(conditional[index]) / std(plain[index]), (4, 5)).T,
        rtol=1e-9,
    )
    eps, x0 = half = predict(guided(3.0, 0.5), x, t)
    np.testing.assert_allclose(half[index], 0.5 * (rescaled[index] + plain[index]), rtol=1e-10)
    alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
    np.testing.assert_allclose(alpha * x0 + sigma * eps, x, rtol=1e-10, atol=1e-12)
    for view_got, view_want in zip(predict(guided(1.0, 0.5), x, t), conditional, strict=True):
        np.testing.assert_allclose(view_got, view_want, rtol=1e-10, atol=1e-12)
    # 1-D data: a per-example std of one number is 0, and the rescale leaves the prediction alone
    line = O.gaussian_mixture([1.0, 1.0], [[-1.0], [1.0]], [np.ones(1), np.ones(1)], labels=[0, 1])
    x1 = x[:, :1]
    one_d = G.ClassifierFreeGuidance(
        line.denoiser(process), 1, 3.0, num_classes=2, rescale=1.0, rescale_prediction=prediction
    )
    unscaled = G.ClassifierFreeGuidance(line.denoiser(process), 1, 3.0, num_classes=2)
    np.testing.assert_allclose(predict(one_d, x1, t)[0], predict(unscaled, x1, t)[0], rtol=1e-12)


# ================================================================================ classifier guidance
@pytest.mark.parametrize(
    "name", slow_beyond(["vp", "subvp", "ve", "edm", "ddpm"], fast=("ve", "ddpm"))
)
def test_classifier_guidance_with_the_exact_classifier_is_cfg_at_the_same_scale(name, x64):
    """score + s grad log p_t(y | x) with the exact unconditional score and classifier equals
    score_u + w (score_c - score_u) at w = s, since score_c = score_u + grad log p_t(y | x)."""
    process = P.make_process(name)
    oracle = overlapping_classes()
    x, t = points(process, oracle, 6, 5)
    labels = jnp.array([0, 1, 1, 0, 0, 1])

    @jax.jit
    def both(scale):
        classifier_guided = G.ClassifierGuidance(
            oracle.denoiser(process), oracle.classifier(process), labels, scale
        )
        free = G.ClassifierFreeGuidance(oracle.denoiser(process), labels, scale, num_classes=2)
        return classifier_guided.predict(x, t), free.predict(x, t)

    for scale in (0.0, 1.0, 4.0):
        classifier_views, free_views = both(scale)
        for got, want in zip(classifier_views, free_views, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.slow
def test_classifier_guided_and_cfg_samples_agree(x64):
    """... and so do the samples of a stochastic sampler driven by the same noise."""
    process = P.VPSDE()
    oracle = overlapping_classes()
    labels = jnp.array([0, 1, 1, 0])
    classifier_guided = G.ClassifierGuidance(
        oracle.denoiser(process), oracle.classifier(process), labels, 3.0
    )
    free = G.ClassifierFreeGuidance(oracle.denoiser(process), labels, 3.0, num_classes=2)
    kwargs = {"grid": "uniform_t", "num_steps": 30, "denoise_final": True}
    key = jax.random.PRNGKey(6)
    guided_samples = sample("ancestral", classifier_guided, key, (4, 2), **kwargs).samples
    free_samples = sample("ancestral", free, key, (4, 2), **kwargs).samples
    np.testing.assert_allclose(guided_samples, free_samples, rtol=1e-7, atol=1e-9)


# ================================================================================ the guided ODE
def guided_flow_setup(name, num):
    """x_T, labels, the CFG wrapper (w = 3) and an independent tight solve of the guided field
    dx/dt = f x - g^2/2 [score_u + w (score_c - score_u)] written from the oracle's scores."""
    process = P.make_process(name)
    oracle = ring_two_classes()
    w = 3.0
    x_init = process.prior_sample(jax.random.PRNGKey(7), (num, 2), jnp.float64)
    labels = jnp.arange(num) % 2
    times = time_grid(process, "uniform_t", 1)

    def guided_field(t, x, args):
        score_uncond = oracle.score(process, x, t)
        score_cond = oracle.score(process, x, t, labels=labels)
        drift, diffusion = process.sde(x, t)
        return drift - 0.5 * diffusion**2 * (score_uncond + w * (score_cond - score_uncond))

    reference, _ = solve_adaptive(
        guided_field, x_init, times[0], times[-1], None, process=process,
        time_variable="log_snr", rtol=1e-10, atol=1e-10, max_steps=20000,
    )  # fmt: skip
    guided = G.ClassifierFreeGuidance(oracle.denoiser(process), labels, w, num_classes=2)
    return x_init, guided, reference


@pytest.mark.slow
def test_guided_flow_of_the_adaptive_sampler_matches_a_tight_solve_of_the_guided_field(x64):
    x_init, guided, reference = guided_flow_setup("vp", 8)
    adaptive = sample(
        "adaptive", guided, jax.random.PRNGKey(0), x_init, num_steps=1, rtol=1e-10, atol=1e-10,
        max_steps=20000, time_variable="log_snr",
    ).samples  # fmt: skip
    np.testing.assert_allclose(adaptive, reference, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vp", "ve"])
def test_guided_flow_of_fixed_step_solvers_converges_to_the_tight_solve(name, x64):
    """DPM-Solver++(3M) and Heun on the CFG wrapper, from the same x_T, converge to the tight solve:
    within 2e-3 at 200 steps (measured 2e-4 to 1e-3) and at least 4x closer than at 25 steps."""
    x_init, guided, reference = guided_flow_setup(name, 32)
    errors = {}
    for num_steps in (25, 200):
        for solver, grid in (("dpm_solver_pp_3m", "uniform_log_snr"), ("heun", "karras")):
            got = sample(
                solver, guided, jax.random.PRNGKey(0), x_init, grid=grid, num_steps=num_steps
            ).samples
            errors[solver, num_steps] = float(jnp.max(jnp.abs(got - reference)))
    for solver in ("dpm_solver_pp_3m", "heun"):
        assert errors[solver, 200] < 2e-3, errors
        assert errors[solver, 200] < errors[solver, 25] / 4, errors


# ================================================================================ noisy classifier
def check_noisy_classifier_at_init(shape):
    """The zero-initialised head gives uniform probabilities, so the initial loss is log C exactly;
    logits have shape (B, C); the loss has a gradient."""
    process = P.VPSDE()
    labels = jnp.arange(4) % 3
    x0 = jax.random.normal(jax.random.PRNGKey(0), shape)
    module = NoisyClassifier(num_classes=3, width=8, num_blocks=1, channels=(4, 8), embedding_dim=8)
    classifier = G.init_classifier(
        module, jax.random.PRNGKey(1), process, x0, num_classes=3, time_input="999t"
    )

    @jax.jit
    def evaluate(classifier):
        def loss(params):
            return G.noisy_classifier_loss(
                classifier.replace(params=params), jax.random.PRNGKey(2), x0, labels
            )

        loss_value, grads = jax.value_and_grad(loss)(classifier.params)
        return classifier.logits(x0, 0.5), classifier.log_prob(x0, 0.5, labels), loss_value, grads

    logits, log_prob, loss_value, grads = evaluate(classifier)
    assert logits.shape == (4, 3)
    np.testing.assert_allclose(log_prob, -np.log(3.0), rtol=1e-6)
    np.testing.assert_allclose(loss_value, np.log(3.0), rtol=1e-6)
    assert float(jnp.abs(grads["logits"]["kernel"]).max()) > 0


def test_noisy_classifier_of_points():
    check_noisy_classifier_at_init((4, 2))
    with pytest.raises(ValueError, match="num_classes"):
        NoisyClassifier(num_classes=1)


@pytest.mark.slow
def test_noisy_classifier_of_images():
    check_noisy_classifier_at_init((4, 4, 4, 1))


@pytest.mark.slow
def test_trained_noisy_classifier_approaches_the_exact_one_and_guides():
    """Trained on noised samples of the labelled ring (VP), its p(y | x_t) is within a small KL of
    the exact p_t(y | x); guiding the exact unconditional denoiser with it raises the exact
    p(y | x_0) of the samples from the prior's 1/2 to near 1 (as the exact classifier does)."""
    process = P.VPSDE()
    oracle = ring_two_classes()
    x0, labels = oracle.sample_with_labels(jax.random.PRNGKey(0), 8192)
    module = NoisyClassifier(num_classes=2, width=64)
    classifier = G.init_classifier(module, jax.random.PRNGKey(1), process, x0, num_classes=2)
    trained = G.train_noisy_classifier(
        classifier, jax.random.PRNGKey(2), x0, labels, steps=1500, batch_size=256,
        learning_rate=3e-3,
    )  # fmt: skip
    exact = oracle.classifier(process)
    for t in (0.05, 0.2, 0.4, 0.7):
        x_t = oracle.sample_marginal(jax.random.PRNGKey(3), process, 4096, t)
        exact_probs = jax.nn.softmax(exact.logits(x_t, t))
        learned_log_probs = jax.nn.log_softmax(trained.logits(x_t, t))
        kl = jnp.mean(jnp.sum(exact_probs * (jnp.log(exact_probs + 1e-30) - learned_log_probs), -1))
        assert float(kl) < 0.02, (t, float(kl))  # measured <= 0.004 nats at these t
    confidences = []
    for classifier_used in (exact, trained):
        guided = G.ClassifierGuidance(oracle.denoiser(process), classifier_used, 0, 2.0)
        result = sample(
            "ancestral", guided, jax.random.PRNGKey(4), (2048, 2), num_steps=100,
            denoise_final=True,
        )  # fmt: skip
        confidences.append(float(jnp.exp(exact.logits(result.samples, process.t_min)[:, 0]).mean()))
    assert confidences[0] > 0.99 and confidences[1] > 0.97, confidences


# ================================================================================ w = 1 and larger w
STOCHASTIC_CASES = [
    # (process, sampler, options, grid, num_steps): every stochastic sampler of the registry
    ("vp", "ancestral", {}, "uniform_t", 100),
    ("cosine", "ddim", {"eta": 1.0}, "uniform_t", 100),
    ("subvp", "euler_maruyama", {}, "uniform_t", 100),
    ("ve", "reverse_diffusion", {}, "uniform_t", 100),
    ("ve", "pc", {"predictor": "reverse_diffusion", "corrector": "annealed_langevin"}, "uniform_t", 100),
    ("ve", "annealed_langevin", {"n_steps_each": 5}, "uniform_t", 100),
    ("vp", "edm_stochastic", {"S_churn": 30.0, "S_tmin": 0.01, "S_tmax": 1.0}, "karras", 50),
    ("vp", "dpm_solver_pp_2m_sde", {}, "uniform_log_snr", 50),
    ("flow", "dpm_solver_pp_3m_sde", {}, "uniform_log_snr", 50),
    ("ve", "sa_solver", {}, "karras", 50),
]  # fmt: skip
NUM_POINTS = 4096


@functools.cache
def class_one_floor():
    """Mean sliced W2 between independent pairs of NUM_POINTS samples of p_0(x | y = 1)."""
    conditional = ring_two_classes().class_conditional(1)

    def draw(seed, num):
        return np.asarray(conditional.sample(jax.random.PRNGKey(seed), num))

    return conditional, M.sliced_wasserstein_noise_floor(draw, NUM_POINTS, num_repeats=8, seed=0)


def test_every_stochastic_sampler_is_covered():
    """The w = 1 test runs every registered sampler that draws noise (DDIM with eta = 1)."""
    stochastic = {name for name, spec in SAMPLERS.items() if not spec.deterministic} | {"ddim"}
    assert stochastic == {case[1] for case in STOCHASTIC_CASES}


@pytest.mark.slow
@pytest.mark.parametrize(("process_name", "name", "options", "grid", "num_steps"), STOCHASTIC_CASES)
def test_w1_samples_match_the_class_conditional_law(process_name, name, options, grid, num_steps):
    """CFG at w = 1 through every stochastic sampler: sliced W2 to fresh samples of p_0(x | y = 1)
    within 1.5x the two-sample noise floor at the same size (mean of two seeds)."""
    conditional, floor = class_one_floor()
    process = P.make_process(process_name)
    guided = G.ClassifierFreeGuidance(ring_two_classes().denoiser(process), 1, 1.0, num_classes=2)
    distances = []
    for seed in range(2):
        result = sample(
            name, guided, jax.random.PRNGKey(100 + seed), (NUM_POINTS, 2), grid=grid,
            num_steps=num_steps, denoise_final=True, **options,
        )  # fmt: skip
        fresh = np.asarray(conditional.sample(jax.random.PRNGKey(1000 + seed), NUM_POINTS))
        distances.append(M.sliced_wasserstein_distance(result.samples, fresh, seed=seed))
    ratio = np.mean(distances) / floor
    assert ratio < 1.5, f"sliced W2 {np.mean(distances):.4f} is {ratio:.2f} x the floor {floor:.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dpm_solver_pp_3m", "ancestral"])
def test_larger_guidance_concentrates_samples_on_the_class(name):
    """From the same x_T (and noise), raising w raises the mean exact p(y | x_0) of the samples
    monotonically (the classification confidence of Wu et al. 2024, "Theoretical insights for
    diffusion guidance: a case study for Gaussian mixture models"), and the mean class log-density
    log p_0(x | y) rises from w = 0 to 1 to 1.5. Measured: past w ~ 1.5 the log-density falls again
    on these overlapping classes (guidance pushes samples beyond the class's mode, away from the
    other class), so its rise is asserted only there."""
    process = P.VPSDE()
    oracle = overlapping_classes()
    grid = "uniform_log_snr" if name.startswith("dpm") else "uniform_t"
    x_init = process.prior_sample(jax.random.PRNGKey(8), (2048, 2))
    confidence, log_density = [], []
    scales = (0.0, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0)
    for w in scales:
        guided = G.ClassifierFreeGuidance(oracle.denoiser(process), 0, w, num_classes=2)
        result = sample(
            name, guided, jax.random.PRNGKey(9), x_init, grid=grid, num_steps=100,
            denoise_final=True,
        )  # fmt: skip
        class_log_prob = oracle.class_log_prob(process, result.samples, process.t_min)[:, 0]
        confidence.append(float(jnp.exp(class_log_prob).mean()))
        log_density.append(
            float(oracle.log_prob(process, result.samples, process.t_min, labels=0).mean())
        )
    print(f"{name}: w {scales}\n p(y|x) {np.round(confidence, 4)}\n log p(x|y) "
          f"{np.round(log_density, 3)}")  # fmt: skip
    assert np.all(np.diff(confidence) > 0), confidence
    assert log_density[0] < log_density[1] < log_density[2], log_density


# ================================================================================ inpainting
def block_gaussian():
    """4-D Gaussian whose unknown block (0, 1) is correlated within itself but independent of the
    known block (2, 3)."""
    covariance = np.zeros((4, 4))
    covariance[:2, :2] = [[1.0, 0.6], [0.6, 0.8]]
    covariance[2:, 2:] = [[0.5, -0.2], [-0.2, 0.7]]
    return O.gaussian(np.array([0.3, -0.2, 0.5, 0.0]), covariance), covariance


def correlated_gaussian():
    """4-D Gaussian with all coordinates correlated (a fixed random correlation matrix)."""
    factor = np.random.default_rng(0).normal(size=(4, 4))
    covariance = factor @ factor.T / 4 + 0.1 * np.eye(4)
    std = np.sqrt(np.diag(covariance))
    return O.gaussian(np.array([0.3, -0.2, 0.5, 0.0]), covariance / np.outer(std, std))


KNOWN = G.coordinate_mask(4, [2, 3])
KNOWN_VALUES = np.array([0.0, 0.0, 1.5, -1.0])


def test_inpainting_predictions_are_exact_for_an_independent_unknown_block(x64):
    """Known part: the point mass's x0 = y and eps = (x - alpha y)/sigma; unknown part: the exact
    denoiser of the unknown block's own law (independent of the known block), with or without
    score_sde's fresh replacement of the known part."""
    oracle, covariance = block_gaussian()
    unknown_block = O.gaussian(np.array([0.3, -0.2]), covariance[:2, :2])
    for name in ("vp", "ve"):
        process = P.make_process(name)
        x, t = points(process, oracle, 6, 10)
        alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
        for key in (None, jax.random.PRNGKey(11)):
            inpainted = G.Inpainting(oracle.denoiser(process), KNOWN_VALUES, KNOWN, key)
            eps, x0 = predict(inpainted, x, t)
            np.testing.assert_allclose(x0[:, 2:], np.broadcast_to(KNOWN_VALUES[2:], (6, 2)))
            np.testing.assert_allclose(eps[:, 2:], (x[:, 2:] - alpha * KNOWN_VALUES[2:]) / sigma)
            np.testing.assert_allclose(
                eps[:, :2], predict(unknown_block.denoiser(process), x[:, :2], t)[0], rtol=1e-9,
                atol=1e-11,
            )  # fmt: skip
            np.testing.assert_allclose(alpha * x0 + sigma * eps, x, rtol=1e-10, atol=1e-12)
            np.testing.assert_array_equal(
                inpainted.paste(x)[:, 2:], np.tile(KNOWN_VALUES[2:], (6, 1))
            )
            np.testing.assert_array_equal(inpainted.paste(x)[:, :2], x[:, :2])


class ImageOracleEps:
    """The oracle of 4-D data seen as 2x2x1 images: a network on NHWC arrays."""

    def __init__(self, process):
        self.process = process

    def __call__(self, oracle, x, t):
        return oracle.eps(self.process, x.reshape(x.shape[0], -1), t).reshape(x.shape)


def test_inpainting_images_with_a_named_mask(x64):
    """NHWC: a (H, W, C) mask broadcasts over the batch; the known pixels' x0 is the known image and
    the unknown pixels' predictions are the flat oracle's at the same state."""
    oracle, _ = block_gaussian()
    process = P.VPSDE()
    denoiser = Denoiser(params=oracle, apply_fn=ImageOracleEps(process), process=process)
    mask = G.inpainting_mask("left_half", (2, 2, 1))  # known: the right column = coordinates 1, 3
    known_images = jax.random.normal(jax.random.PRNGKey(20), (3, 2, 2, 1), jnp.float64)
    x, t = points(process, oracle, 3, 21)
    images = x.reshape(3, 2, 2, 1)
    eps, x0 = predict(G.Inpainting(denoiser, known_images, mask), images, t)
    np.testing.assert_array_equal(x0[:, :, 1], known_images[:, :, 1])
    np.testing.assert_allclose(
        eps[:, :, 0].reshape(3, 2), predict(oracle.denoiser(process), x, t)[0][:, [0, 2]],
        rtol=1e-12,
    )  # fmt: skip


def test_fresh_replacement_noise_is_a_function_of_key_time_and_row():
    oracle, _ = block_gaussian()
    process = P.VPSDE()
    inpainted = G.Inpainting(oracle.denoiser(process), KNOWN_VALUES, KNOWN, jax.random.PRNGKey(3))
    t = jnp.array([0.5, 0.5, 0.7])
    noise = inpainted._replacement_noise(t, jnp.zeros((3, 4)))
    np.testing.assert_array_equal(noise, inpainted._replacement_noise(t, jnp.zeros((3, 4))))
    assert not np.allclose(noise[0], noise[1]) and not np.allclose(noise[0], noise[2])
    shifted = inpainted._replacement_noise(jnp.array([0.7, 0.5, 0.5]), jnp.zeros((3, 4)))
    np.testing.assert_array_equal(shifted[1], noise[1])  # same (t, row): same draw


def test_named_masks():
    left = G.inpainting_mask("left_half", (4, 6, 1))
    assert left.shape == (4, 6, 1) and left.dtype == bool
    np.testing.assert_array_equal(left[..., 0].all(axis=0), [False] * 3 + [True] * 3)
    top = G.inpainting_mask("top_half", (5, 4))
    np.testing.assert_array_equal(top.all(axis=1), [False] * 3 + [True] * 2)
    center = G.inpainting_mask("center_square", (8, 8, 3))
    assert (~center).sum() == 4 * 4 * 3 and not center[2:6, 2:6].any() and center[:2].all()
    outside = G.inpainting_mask("outside_center_square", (8, 8))
    np.testing.assert_array_equal(outside, ~center[..., 0])
    rows = G.inpainting_mask("alternate_rows", (4, 3))
    np.testing.assert_array_equal(rows[:, 0], [False, True, False, True])
    right = G.inpainting_mask("right_half", (5,))
    np.testing.assert_array_equal(right, [True, True, False, False, False])
    np.testing.assert_array_equal(
        G.inpainting_mask("bottom_half", (2, 2)), [[True] * 2, [False] * 2]
    )
    np.testing.assert_array_equal(G.coordinate_mask(4, [1, 3]), [False, True, False, True])
    with pytest.raises(ValueError, match="unknown mask 'middle'"):
        G.inpainting_mask("middle", (8, 8))
    with pytest.raises(ValueError, match="vector shape"):
        G.inpainting_mask("center_square", (8,))
    with pytest.raises(ValueError, match="known_indices"):
        G.coordinate_mask(4, [4])


def test_repaint_without_resampling_is_plain_sampling_and_counts_nfe(x64):
    oracle, _ = block_gaussian()
    process = P.VPSDE()
    inpainted = G.Inpainting(oracle.denoiser(process), KNOWN_VALUES, KNOWN)
    x_init = process.prior_sample(jax.random.PRNGKey(12), (16, 4), jnp.float64)
    times = time_grid(process, "uniform_t", 20)
    plain = sample("ddim", inpainted, jax.random.PRNGKey(0), x_init, num_steps=20)
    once = G.repaint("ddim", inpainted, jax.random.PRNGKey(0), x_init, times, jump_length=5)
    np.testing.assert_allclose(once.samples, plain.samples, rtol=1e-12)
    assert int(once.nfe) == 20
    resampled = G.repaint(
        "heun", inpainted, jax.random.PRNGKey(0), x_init, times, jump_length=4, resamplings=3,
        denoise_final=True,
    )  # fmt: skip
    assert int(resampled.nfe) == 3 * get_sampler("heun").nfe(20) + 1
    np.testing.assert_array_equal(resampled.samples[:, 2:], np.tile(KNOWN_VALUES[2:], (16, 1)))
    with pytest.raises(ValueError, match="multiple of jump_length=3"):
        G.repaint("ddim", inpainted, jax.random.PRNGKey(0), x_init, times, jump_length=3)
    with pytest.raises(ValueError, match="resamplings"):
        G.repaint("ddim", inpainted, jax.random.PRNGKey(0), x_init, times, resamplings=0)
    with pytest.raises(ValueError, match="unknown sampler"):
        G.repaint("nope", inpainted, jax.random.PRNGKey(0), x_init, times)


def moments(samples):
    samples = np.asarray(samples, np.float64)
    return samples.mean(axis=0), np.cov(samples.T)


@pytest.mark.slow
@pytest.mark.parametrize("fresh", [False, True])
def test_inpainting_an_independent_block_matches_the_exact_conditional(fresh):
    """Unknown block independent of the known one: p(x_u | x_k = y) = p(x_u), so replacement is
    exact and the samples' mean and covariance match N(mu_u, C_uu) within 4.5 standard errors
    (sample mean: sqrt(C_ii / n); sample covariance entry: sqrt((C_ij^2 + C_ii C_jj) / n))."""
    oracle, covariance = block_gaussian()
    process = P.VPSDE()
    key = jax.random.PRNGKey(13) if fresh else None
    inpainted = G.Inpainting(oracle.denoiser(process), KNOWN_VALUES, KNOWN, key)
    num = 20000
    result = sample(
        "ancestral", inpainted, jax.random.PRNGKey(14), (num, 4), num_steps=200,
        denoise_final=True, variance="beta",
    )  # fmt: skip
    np.testing.assert_array_equal(result.samples[:, 2:], np.tile(KNOWN_VALUES[2:], (num, 1)))
    mean, cov = moments(result.samples[:, :2])
    exact_mean, exact_cov = np.array([0.3, -0.2]), covariance[:2, :2]
    diag = np.diag(exact_cov)
    np.testing.assert_array_less(np.abs(mean - exact_mean), 4.5 * np.sqrt(diag / num))
    cov_se = np.sqrt((exact_cov**2 + np.outer(diag, diag)) / num)
    np.testing.assert_array_less(np.abs(cov - exact_cov), 4.5 * cov_se)


@pytest.mark.slow
def test_replacement_is_biased_on_correlated_data_and_resampling_reduces_the_bias(x64):
    """All coordinates correlated: replacement's samples of x_u miss the exact conditional
    N(m, S) of ``condition_on_coordinates`` (the known part reaches x_u only through its noised
    copies); RePaint's resampling (10 repetitions of 5-step blocks, 10x the NFE) cuts both biases.
    Ancestral sampling with the 'beta' variance, 100 steps, 10000 samples; figures are printed
    (measured: |mean bias| 0.31 -> 0.07, |cov bias|_F 0.10 -> 0.015)."""
    oracle = correlated_gaussian()
    exact = oracle.condition_on_coordinates(KNOWN, KNOWN_VALUES)
    exact_mean = np.asarray(exact.means[0])
    exact_cov = np.asarray((exact.eigvecs[0] * exact.eigvals[0]) @ exact.eigvecs[0].T)
    process = P.VPSDE()
    inpainted = G.Inpainting(oracle.denoiser(process), KNOWN_VALUES, KNOWN)
    num = 10000
    x_init = process.prior_sample(jax.random.PRNGKey(15), (num, 4), jnp.float64)
    times = time_grid(process, "uniform_t", 100)
    biases = {}
    for resamplings, jump_length in ((1, 1), (10, 5)):
        result = G.repaint(
            "ancestral", inpainted, jax.random.PRNGKey(16), x_init, times,
            jump_length=jump_length, resamplings=resamplings, denoise_final=True, variance="beta",
        )  # fmt: skip
        mean, cov = moments(result.samples[:, ~KNOWN])
        biases[resamplings] = (
            float(np.linalg.norm(mean - exact_mean)),
            float(np.linalg.norm(cov - exact_cov)),
            int(result.nfe),
        )
    print(f"exact mean {exact_mean}, cov {exact_cov.ravel()}")
    print("resamplings: (|mean bias|, |cov bias|_F, NFE)", biases)
    # Sampling noise at n = 10000: |mean error| ~ sqrt(tr S / n) = 0.013; each covariance entry
    # ~ sqrt((S_ij^2 + S_ii S_jj) / n) <= 0.013, so |cov error|_F ~ 0.025.
    mean_noise = np.sqrt(np.trace(exact_cov) / num)
    assert biases[1][0] > 10 * mean_noise, biases  # replacement is measurably biased
    assert biases[10][0] < biases[1][0] / 2.5, biases
    assert biases[10][1] < biases[1][1] / 2.5, biases


def test_sampling_labels():
    np.testing.assert_array_equal(G.sampling_labels("all", 3, 7), [0, 0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(G.sampling_labels(2, 3, 3), [2, 2, 2])
    np.testing.assert_array_equal(G.sampling_labels([2, 0], 3, 4), [2, 2, 0, 0])
    assert G.sampling_labels("all", 10, 100).dtype == np.int32
    with pytest.raises(ValueError, match="label 3 is out of range"):
        G.sampling_labels([0, 3], 3, 4)
    with pytest.raises(ValueError, match="'some'"):
        G.sampling_labels("some", 3, 4)
    with pytest.raises(ValueError, match="num must be"):
        G.sampling_labels("all", 3, 0)


# ================================================================================ bad input
def test_bad_guidance_arguments():
    process = P.VPSDE()
    oracle = ring_two_classes()
    denoiser = oracle.denoiser(process)
    with pytest.raises(ValueError, match=r"label 2 is out of range; accepted: 0\.\.1"):
        G.ClassifierFreeGuidance(denoiser, jnp.array([0, 2]), 2.0, num_classes=2)
    with pytest.raises(ValueError, match="label -1 is out of range"):
        G.ClassifierFreeGuidance(denoiser, -1, 2.0, num_classes=2)
    with pytest.raises(ValueError, match="integers"):
        G.ClassifierFreeGuidance(denoiser, jnp.array([0.0, 1.0]), 2.0, num_classes=2)
    with pytest.raises(ValueError, match="guidance_scale"):
        G.ClassifierFreeGuidance(denoiser, 0, float("nan"), num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        G.ClassifierFreeGuidance(denoiser, 0, 2.0, num_classes=0)
    with pytest.raises(ValueError, match="low < high"):
        G.ClassifierFreeGuidance(denoiser, 0, 2.0, num_classes=2, interval=(2.0, 1.0))
    with pytest.raises(ValueError, match="low >= 0"):
        G.ClassifierFreeGuidance(denoiser, 0, 2.0, num_classes=2, interval=(-1.0, 1.0))
    with pytest.raises(ValueError, match="interval_variable"):
        G.ClassifierFreeGuidance(denoiser, 0, 2.0, num_classes=2, interval_variable="t")
    with pytest.raises(ValueError, match="rescale"):
        G.ClassifierFreeGuidance(denoiser, 0, 2.0, num_classes=2, rescale=1.5)
    with pytest.raises(ValueError, match="rescale_prediction"):
        G.ClassifierFreeGuidance(denoiser, 0, 2.0, num_classes=2, rescale_prediction="v")
    classifier = oracle.classifier(process)
    with pytest.raises(ValueError, match="label 3 is out of range"):
        G.ClassifierGuidance(denoiser, classifier, 3, 1.0)
    with pytest.raises(ValueError, match="differs"):
        G.ClassifierGuidance(oracle.denoiser(P.VESDE()), classifier, 0, 1.0)
    with pytest.raises(ValueError, match="label 2 is out of range"):
        classifier.log_prob(jnp.zeros((1, 2)), 0.5, 2)
    with pytest.raises(ValueError, match="time_input"):
        G.Classifier(params=None, apply_fn=None, process=process, num_classes=2, time_input="x")
    with pytest.raises(ValueError, match="label 5 is out of range"):
        G.noisy_classifier_loss(classifier, jax.random.PRNGKey(0), jnp.zeros((2, 2)), [0, 5])
