"""Parameterizations: round trips, the loss identities of docs/references.md #loss-conversions, EDM
preconditioning, Denoiser."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import parameterization as PZ
from diffusion import processes as P


def random_state(key, vp: bool):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    x0 = jax.random.normal(k1, (64, 5))
    eps = jax.random.normal(k2, (64, 5))
    alpha = jax.random.uniform(k3, (64, 1), minval=0.05, maxval=1.5)
    if vp:
        alpha = jnp.minimum(alpha, 0.999)
        sigma = jnp.sqrt(1 - alpha**2)
    else:
        sigma = jax.random.uniform(k4, (64, 1), minval=0.01, maxval=30.0)
    return x0, eps, alpha, sigma, alpha * x0 + sigma * eps


@pytest.mark.parametrize("vp", [True, False])
@pytest.mark.parametrize("kind", PZ.PARAMETERIZATIONS)
def test_every_parameterization_round_trips(kind, vp, x64):
    x0, eps, alpha, sigma, x = random_state(jax.random.PRNGKey(0), vp)
    prediction = PZ.prediction_from_eps_x0(eps, x0, kind, alpha, sigma, sigma_data=0.7)
    eps_back, x0_back = PZ.eps_x0_from_prediction(prediction, kind, x, alpha, sigma, sigma_data=0.7)
    np.testing.assert_allclose(eps_back, eps, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(x0_back, x0, rtol=1e-9, atol=1e-9)


def test_score_target_is_the_gradient_of_the_conditional_log_density(x64):
    """Song et al. 2021, eq. 7: the score target is grad_x log N(x; alpha x0, sigma^2 I), here by
    autodiff of the Gaussian log-density, not by a formula of the table."""
    x0, eps, alpha, sigma, x = random_state(jax.random.PRNGKey(1), vp=False)

    def log_density(x):
        return jnp.sum(-0.5 * ((x - alpha * x0) / sigma) ** 2)

    target = PZ.prediction_from_eps_x0(eps, x0, "score", alpha, sigma)
    np.testing.assert_allclose(target, jax.grad(log_density)(x), rtol=1e-9)


def test_v_target_is_the_velocity_of_the_angular_path(x64):
    """Salimans & Ho 2022, Sec. 4: on a variance-preserving path x_phi = cos(phi) x0 + sin(phi) eps,
    v = d x_phi / d phi; here by forward-mode autodiff in phi at alpha = cos phi, sigma = sin phi."""
    x0, eps, alpha, _, _ = random_state(jax.random.PRNGKey(1), vp=True)
    phi = jnp.arccos(alpha)

    def path(phi):
        return jnp.cos(phi) * x0 + jnp.sin(phi) * eps

    _, velocity = jax.jvp(path, (phi,), (jnp.ones_like(phi),))
    target = PZ.prediction_from_eps_x0(eps, x0, "v", jnp.cos(phi), jnp.sin(phi))
    np.testing.assert_allclose(target, velocity, rtol=1e-9, atol=1e-12)


def test_velocity_target_is_the_time_derivative_of_the_straight_path(x64):
    """Lipman et al. 2022, eq. 23 (Liu et al. 2022, eq. 1): the flow-matching target is
    u = d x_t / dt on x_t = (1 - t) x0 + t eps; here by forward-mode autodiff in t."""
    x0, eps, _, _, _ = random_state(jax.random.PRNGKey(7), vp=True)
    t = jax.random.uniform(jax.random.PRNGKey(8), (x0.shape[0], 1), minval=0.01, maxval=0.99)

    def path(t):
        return (1.0 - t) * x0 + t * eps

    _, velocity = jax.jvp(path, (t,), (jnp.ones_like(t),))
    np.testing.assert_allclose(
        PZ.prediction_from_eps_x0(eps, x0, "velocity", 1.0 - t, t), velocity, rtol=1e-12
    )


@pytest.mark.parametrize("vp", [True, False])
def test_loss_conversions(vp, x64):
    """docs/references.md #loss-conversions: errors of consistent predictions in the different views."""
    x0, eps, alpha, sigma, x = random_state(jax.random.PRNGKey(2), vp)
    x0_hat = x0 + 0.3 * jax.random.normal(jax.random.PRNGKey(3), x0.shape)
    eps_hat, _ = PZ.eps_x0_from_prediction(x0_hat, "x0", x, alpha, sigma)
    snr = (alpha / sigma) ** 2
    sq = lambda a: jnp.sum(a**2, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(sq(eps - eps_hat), snr * sq(x0 - x0_hat), rtol=1e-9)
    score, score_hat = (
        PZ.prediction_from_eps_x0(e, x0, "score", alpha, sigma) for e in (eps, eps_hat)
    )
    np.testing.assert_allclose(sq(score - score_hat), sq(eps - eps_hat) / sigma**2, rtol=1e-9)
    v = PZ.prediction_from_eps_x0(eps, x0, "v", alpha, sigma)
    v_hat = PZ.prediction_from_eps_x0(eps_hat, x0_hat, "v", alpha, sigma)
    factor = (alpha**2 + sigma**2) ** 2 / sigma**2
    np.testing.assert_allclose(sq(v - v_hat), factor * sq(x0 - x0_hat), rtol=1e-9)
    if vp:
        np.testing.assert_allclose(factor, 1 + snr, rtol=1e-9)


def test_edm_preconditioning_table_and_unit_variance_target(x64):
    """Karras et al. 2022 Table 1, and their design rule: the F target has unit variance (eq. 8, B.6)."""
    sigma_data = 0.5
    sigma_hat = jnp.array([0.002, 0.5, 3.0, 80.0])
    c_skip, c_out, c_in, c_noise = PZ.edm_preconditioning(sigma_hat, sigma_data)
    np.testing.assert_allclose(c_skip, 0.25 / (sigma_hat**2 + 0.25))
    np.testing.assert_allclose(c_out, sigma_hat * 0.5 / jnp.sqrt(0.25 + sigma_hat**2))
    np.testing.assert_allclose(c_in, 1 / jnp.sqrt(sigma_hat**2 + 0.25))
    np.testing.assert_allclose(c_noise, jnp.log(sigma_hat) / 4)
    # Unit-variance target and input for data with std sigma_data, by Monte Carlo.
    key1, key2 = jax.random.split(jax.random.PRNGKey(4))
    x0 = sigma_data * jax.random.normal(key1, (200000,))
    eps = jax.random.normal(key2, (200000,))
    for s in [0.01, 0.5, 10.0]:
        x = x0 + s * eps  # alpha = 1
        target = PZ.prediction_from_eps_x0(eps, x0, "edm", 1.0, s, sigma_data)
        _, _, c_in_s, _ = PZ.edm_preconditioning(s, sigma_data)
        assert abs(float(jnp.std(target)) - 1) < 0.01
        assert abs(float(jnp.std(c_in_s * x)) - 1) < 0.01


def test_network_time_inputs(x64):
    ddpm = P.DDPM(num_steps=500)
    np.testing.assert_allclose(PZ.network_time(ddpm, ddpm.chain_times, "index"), np.arange(500))
    smld = P.SMLD()
    np.testing.assert_allclose(
        PZ.network_time(smld, smld.chain_times, "index"), np.arange(9, -1, -1)
    )
    t = jnp.array([0.1, 0.7])
    vp, ve, edm = P.VPSDE(), P.VESDE(), P.EDM()
    np.testing.assert_allclose(PZ.network_time(vp, t, "t"), t)
    np.testing.assert_allclose(PZ.network_time(vp, t, "999t"), 999 * t)
    np.testing.assert_allclose(PZ.network_time(ve, t, "sigma"), 0.01 * 5000**t, rtol=1e-12)
    np.testing.assert_allclose(PZ.network_time(ve, t, "log_sigma"), jnp.log(0.01 * 5000**t))
    np.testing.assert_allclose(
        PZ.network_time(vp, t, "sigma"), vp.sigma(t) / vp.alpha(t), rtol=1e-12
    )
    s = jnp.array([0.01, 2.0, 80.0])
    np.testing.assert_allclose(PZ.network_time(edm, s, "quarter_log_sigma"), jnp.log(s) / 4)


def _linear_net(params, x, t_in):
    """A toy network: output = w * x + b * t_in (time enters as the network sees it)."""
    return params["w"] * x + params["b"] * t_in.reshape((-1,) + (1,) * (x.ndim - 1))


@pytest.mark.parametrize("kind", PZ.PARAMETERIZATIONS)
def test_denoiser_views_are_consistent(kind, x64):
    process = P.VPSDE()
    denoiser = PZ.Denoiser(
        params={"w": 0.3, "b": -0.2}, apply_fn=_linear_net, process=process, parameterization=kind
    )
    x = jax.random.normal(jax.random.PRNGKey(5), (6, 3))
    t = jnp.linspace(0.1, 0.9, 6)
    eps, x0 = denoiser.predict(x, t)
    alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
    np.testing.assert_allclose(alpha * x0 + sigma * eps, x, rtol=1e-10)
    np.testing.assert_allclose(denoiser.score(x, t), -eps / sigma, rtol=1e-12)
    # scalar t broadcasts to the batch
    np.testing.assert_allclose(denoiser.eps(x, 0.4), denoiser.eps(x, jnp.full((6,), 0.4)))


def test_edm_denoiser_feeds_the_preconditioned_input(x64):
    """With F = 0 the EDM denoiser is D = c_skip x_hat; the net sees c_in x_hat and, through the time
    input 'quarter_log_sigma', c_noise (Karras et al. 2022, Table 1)."""
    process = P.VPSDE()
    seen = {}

    def net(params, x_in, t_in):
        seen["x_in"], seen["t_in"] = x_in, t_in
        return jnp.zeros_like(x_in)

    denoiser = PZ.Denoiser(
        params=None,
        apply_fn=net,
        process=process,
        parameterization="edm",
        time_input="quarter_log_sigma",
    )
    x = jax.random.normal(jax.random.PRNGKey(6), (4, 2))
    t = jnp.array([0.2, 0.4, 0.6, 0.8])
    x0 = denoiser.x0(x, t)
    alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
    sigma_hat = sigma / alpha
    np.testing.assert_allclose(x0, 0.25 / (sigma_hat**2 + 0.25) * x / alpha, rtol=1e-10)
    np.testing.assert_allclose(seen["x_in"], x / alpha / jnp.sqrt(sigma_hat**2 + 0.25), rtol=1e-10)
    np.testing.assert_allclose(seen["t_in"], jnp.log(sigma_hat[:, 0]) / 4, rtol=1e-10)


def test_denoiser_is_a_pytree_and_jits_once():
    traces = []

    def net(params, x, t_in):
        traces.append(1)
        return params * x

    process = P.VESDE()
    make = lambda p: PZ.Denoiser(params=p, apply_fn=net, process=process, time_input="sigma")  # noqa: E731
    assert jax.tree_util.tree_leaves(make(jnp.ones(()))) == [jnp.ones(())]
    step = jax.jit(lambda d, x, t: d.eps(x, t))
    x = jnp.ones((2, 3))
    step(make(jnp.float32(2.0)), x, 0.5)
    step(make(jnp.float32(3.0)), x, 0.5)
    assert len(traces) == 1


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"parameterization": "noise"}, "'noise'"),
        ({"time_input": "minutes"}, "'minutes'"),
        ({"time_input": "index"}, "VPSDE"),
        ({"sigma_data": -1.0}, "-1.0"),
    ],
)
def test_denoiser_rejects_bad_options(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        PZ.Denoiser(params=None, apply_fn=_linear_net, process=P.VPSDE(), **kwargs)
    assert fragment in str(info.value)


def test_conversion_rejects_unknown_parameterization():
    with pytest.raises(ValueError, match="'speed'"):
        PZ.eps_x0_from_prediction(jnp.zeros(2), "speed", jnp.zeros(2), 1.0, 1.0)
    with pytest.raises(ValueError, match="'hours'"):
        PZ.network_time(P.VPSDE(), 0.5, "hours")
    assert math.isfinite(float(PZ.network_time(P.VPSDE(), 0.5, "log_sigma")))
