"""The PDE view of diffusion (Higham, Higham & Grindrod 2023, Sec. 7 and Fig. 7).

Two equations on an interval, each solved two ways:

* the renormalised heat equation u_t = u_xx + mu(t) u on (0, 1) with no-flux ends and
  mu(t) = int u_xx^2 / int u_x^2, which conserves int u_x^2 and drives u to the first Neumann
  eigenmode cos(pi x); solved by cosine Galerkin (spectral: exactly in time, and by RK4) and by
  finite differences (method of lines, RK4);
* the Fokker-Planck equation of the VE SDE, p_t = 1/2 g(t)^2 p_xx (the heat equation in the
  variance sigma(t)^2 / 2), solved by finite differences from a Gaussian mixture and compared with the
  exact noised mixture p_t = sum_k w_k N(mu_k, s_k^2 + sigma(t)^2) (the oracle).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.processes import VESDE
from experiments.figures import common
from experiments.figures.base import FigureContext, check, new_figure, register, save

NUM_MODES = 40  # cosine modes of the spectral solution (the initial bump's coefficients at j = 40
#                 are ~1e-9)
BUMP = dict(
    centre=0.3, width=0.05
)  # u_0 = bump - its mean (zero mean: int u is then conserved at 0)
FINAL_TIME = 0.5
FD_SIZES = (32, 64, 128)
MIXTURE = dict(weights=(0.3, 0.7), means=(-2.0, 1.5), stds=(0.3, 0.5))
VE = VESDE(sigma_min=0.01, sigma_max=10.0)
FP_TIMES = (0.3, 0.7)  # sigma(0.3) = 0.079, sigma(0.7) = 1.26
FP_DOMAIN = 8.0
FP_SIZES = (200, 400)


# ================================================================================ renormalised heat
def initial_coefficients(num_modes: int = NUM_MODES) -> np.ndarray:
    """Cosine coefficients a_j, j = 0..num_modes, of u_0 = bump - mean: a_j = 2 int u_0 cos(j pi x)
    (a_0 = int u_0 = 0), by the midpoint rule on 20,000 cells (spectrally accurate here)."""
    cells = 20_000
    x = (np.arange(cells) + 0.5) / cells
    bump = np.exp(-0.5 * ((x - BUMP["centre"]) / BUMP["width"]) ** 2)
    u0 = bump - bump.mean()
    modes = np.arange(num_modes + 1)
    coefficients = 2.0 * np.cos(np.pi * np.outer(modes, x)) @ u0 / cells
    coefficients[0] = 0.0
    return coefficients


def eigenvalues(num_modes: int) -> np.ndarray:
    """Neumann eigenvalues lambda_j = (j pi)^2 of -d^2/dx^2 on (0, 1), eigenfunctions cos(j pi x)."""
    return (np.pi * np.arange(num_modes + 1)) ** 2


def galerkin_exact(coefficients: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The cosine-Galerkin system a_j' = (mu - lambda_j) a_j, mu = sum lambda^2 a^2 / sum lambda a^2,
    solved exactly: a_j(t) = a_j(0) e^{-lambda_j t} e^{M(t)} with e^{2M} = C / sum lambda_j a_j(0)^2
    e^{-2 lambda_j t} (M' = mu makes sum lambda_j a_j^2 = C constant). Returns (len(t), modes)."""
    lam = eigenvalues(len(coefficients) - 1)
    decay = np.exp(-np.outer(np.atleast_1d(t), lam))
    conserved = np.sum(lam * coefficients**2)
    weighted = np.sum(lam * coefficients**2 * decay**2, axis=1, keepdims=True)
    return coefficients * decay * np.sqrt(conserved / weighted)


def _rk4(field, y0: jax.Array, dt: float, num_steps: int, record_every: int) -> jax.Array:
    """Classical RK4 for y' = field(y), recording y every ``record_every`` steps (lax.scan)."""

    def step(y, _):
        k1 = field(y)
        k2 = field(y + 0.5 * dt * k1)
        k3 = field(y + 0.5 * dt * k2)
        k4 = field(y + dt * k3)
        return y + dt * (k1 + 2 * k2 + 2 * k3 + k4) / 6, None

    def block(y, _):
        y = jax.lax.scan(step, y, None, length=record_every)[0]
        return y, y

    records = jax.lax.scan(block, y0, None, length=num_steps // record_every)[1]
    return jnp.concatenate([y0[None], records])


@functools.partial(jax.jit, static_argnums=(1, 2))
def galerkin_rk4(coefficients: jax.Array, num_steps: int, record_every: int) -> jax.Array:
    """The cosine-Galerkin system integrated by RK4 to FINAL_TIME."""
    lam = jnp.asarray(eigenvalues(coefficients.shape[0] - 1))

    def field(a):
        mu = jnp.sum(lam**2 * a**2) / jnp.sum(lam * a**2)  # int u_xx^2 / int u_x^2
        return (mu - lam) * a

    return _rk4(field, coefficients, FINAL_TIME / num_steps, num_steps, record_every)


def fd_operators(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell-centred finite differences on (0, 1) with no-flux ends (ghost cells u_{-1} = u_0,
    u_N = u_{N-1}): the forward difference D, (N - 1, N), and the Laplacian L = -D^T D, whose
    eigenvectors are cos(j pi x_i) with eigenvalues -(4/h^2) sin^2(j pi h / 2)."""
    h = 1.0 / size
    difference = (np.eye(size, k=1) - np.eye(size))[:-1] / h
    return difference, -difference.T @ difference


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def fd_rk4(u0: jax.Array, size: int, num_steps: int, record_every: int) -> jax.Array:
    """Method of lines: u' = L u + mu_h u, mu_h = h |L u|^2 / h |D u|^2 (which conserves the
    discrete int u_x^2 = h |D u|^2 exactly in the semi-discrete system), RK4 in time."""
    difference, laplacian = (jnp.asarray(m) for m in fd_operators(size))

    def field(u):
        lu = laplacian @ u
        mu = jnp.sum(lu**2) / jnp.sum((difference @ u) ** 2)
        return lu + mu * u

    return _rk4(field, u0, FINAL_TIME / num_steps, num_steps, record_every)


def heat_equation_panel(context: FigureContext) -> dict:
    """The renormalised heat equation, spectral and finite differences (Higham et al. Fig. 7)."""
    checks = []
    coefficients = initial_coefficients()
    lam = eigenvalues(NUM_MODES)
    conserved = 0.5 * np.sum(lam * coefficients**2)  # int u_x^2 = 1/2 sum lambda_j a_j^2
    records = 50
    # Spectral, RK4 with dt lambda_max = 1/8 (RK4 is stable to 2.78; its error here is ~4e-11).
    spectral_steps = records * math.ceil(8 * FINAL_TIME * lam[-1] / records)
    spectral = np.asarray(
        galerkin_rk4(jnp.asarray(coefficients), spectral_steps, spectral_steps // records)
    )
    record_times = np.linspace(0.0, FINAL_TIME, records + 1)
    exact = galerkin_exact(coefficients, record_times)
    spectral_norm = 0.5 * np.sum(lam * spectral**2, axis=1)
    checks.append(
        check(
            "spectral (RK4): max_t |int u_x^2 - C| / C",
            np.max(np.abs(spectral_norm - conserved)) / conserved,
            0.0,
            1e-9,
        )
    )
    checks.append(
        check(
            "spectral: max |RK4 - exact Galerkin solution| (coefficients)",
            np.max(np.abs(spectral - exact)),
            0.0,
            1e-9,
        )
    )
    # Decay to the first eigenmode at the rate lambda_2 - lambda_1 = 3 pi^2 (a_1 is the slowest mode).
    amplitude = math.copysign(math.sqrt(2.0 * conserved) / math.pi, coefficients[1])
    x_plot = np.linspace(0.0, 1.0, 201)
    basis = np.cos(np.pi * np.outer(np.arange(NUM_MODES + 1), x_plot))
    profiles = exact @ basis
    deviation = np.max(np.abs(profiles - amplitude * np.cos(np.pi * x_plot)), axis=1)
    late = record_times >= 0.2
    rate = -np.polyfit(record_times[late], np.log(deviation[late]), 1)[0]
    checks.append(
        check(
            "decay rate of |u - A_1 cos(pi x)| (exact: lambda_2 - lambda_1 = 3 pi^2)",
            rate,
            3 * np.pi**2,
            0.01,
            relative=True,
        )
    )
    checks.append(
        check(
            f"|u(T) - A_1 cos(pi x)|_inf / |A_1| at T = {FINAL_TIME}",
            deviation[-1] / abs(amplitude),
            0.0,
            1e-5,
            note="A_1 = sqrt(2 C)/pi: the conserved int u_x^2 fixes the limit's amplitude",
        )
    )
    # Finite differences at three resolutions against the spectral solution at T.
    fd_errors, fd_solutions = [], {}
    for size in FD_SIZES:
        h = 1.0 / size
        x = (np.arange(size) + 0.5) * h
        cell_basis = np.cos(np.pi * np.outer(np.arange(NUM_MODES + 1), x))
        u0 = coefficients @ cell_basis
        steps = records * math.ceil(2 * FINAL_TIME * (4.0 / h**2) / records)  # dt = h^2 / 8
        solution = np.asarray(fd_rk4(jnp.asarray(u0), size, steps, steps // records))
        difference, _ = fd_operators(size)
        norms = h * np.sum((solution @ difference.T) ** 2, axis=1)
        if size == FD_SIZES[-1]:
            checks.append(
                check(
                    f"finite differences (N = {size}): max_t |h |D u|^2 - C_h| / C_h",
                    np.max(np.abs(norms - norms[0])) / norms[0],
                    0.0,
                    1e-9,
                )
            )
            checks.append(
                check(
                    f"finite differences (N = {size}): max_t |int u|",
                    np.max(np.abs(h * solution.sum(axis=1))),
                    0.0,
                    1e-12,
                    note="d/dt int u = mu int u, and int u_0 = 0",
                )
            )
        fd_errors.append(float(np.max(np.abs(solution[-1] - exact[-1] @ cell_basis))))
        fd_solutions[size] = (x, solution)
    order = np.polyfit(np.log(1.0 / np.array(FD_SIZES)), np.log(fd_errors), 1)[0]
    checks.append(check("finite differences vs spectral at T: order in h", order, 2.0, 0.15))
    return {
        "checks": checks,
        "conserved": conserved,
        "record_times": record_times,
        "profiles": profiles,
        "x": x_plot,
        "deviation": deviation,
        "amplitude": amplitude,
        "fd_errors": fd_errors,
        "fd_solutions": fd_solutions,
    }


# ================================================================================ Fokker-Planck
@functools.partial(jax.jit, static_argnums=(1, 2))
def fokker_planck_ve(p0: jax.Array, size: int, num_steps: int) -> jax.Array:
    """p_t = 1/2 g(t)^2 p_xx (the Fokker-Planck equation of dx = g dW, Song et al. 2021 eq. 5 with
    f = 0) from FP_TIMES[0] to FP_TIMES[1] on [-FP_DOMAIN, FP_DOMAIN], no-flux ends, node-centred
    second differences, RK4 in t with g(t)^2 = ``VE.diffusion_sq(t)``."""
    h = 2 * FP_DOMAIN / (size - 1)
    t0, t1 = FP_TIMES
    dt = (t1 - t0) / num_steps

    def laplacian(p):
        padded = jnp.concatenate([p[1:2], p, p[-2:-1]])  # reflecting ghost nodes: p_x = 0
        return (padded[2:] - 2 * p + padded[:-2]) / h**2

    def field(p, t):
        return 0.5 * VE.diffusion_sq(t) * laplacian(p)

    def step(p, t):
        k1 = field(p, t)
        k2 = field(p + 0.5 * dt * k1, t + 0.5 * dt)
        k3 = field(p + 0.5 * dt * k2, t + 0.5 * dt)
        k4 = field(p + dt * k3, t + dt)
        return p + dt * (k1 + 2 * k2 + 2 * k3 + k4) / 6, None

    return jax.lax.scan(step, p0, t0 + dt * jnp.arange(num_steps))[0]


def fokker_planck_panel(context: FigureContext) -> dict:
    mixture = common.mixture_1d(**MIXTURE)
    t0, t1 = FP_TIMES
    errors, solutions, checks = [], {}, []
    for size in FP_SIZES:
        x = np.linspace(-FP_DOMAIN, FP_DOMAIN, size)
        h = x[1] - x[0]
        diffusion_max = 0.5 * float(VE.diffusion_sq(t1))
        steps = math.ceil((t1 - t0) * 4 * diffusion_max / h**2)  # dt * 4 D / h^2 <= 1 (RK4: 2.78)
        p0 = common.mixture_density(mixture, VE, x, t0)
        p1 = np.asarray(fokker_planck_ve(jnp.asarray(p0), size, steps))
        exact = common.mixture_density(mixture, VE, x, t1)
        errors.append(float(np.max(np.abs(p1 - exact))))
        solutions[size] = (x, p0, p1, exact)
        if size == FP_SIZES[-1]:
            # Trapezoid weights: the node-centred no-flux scheme conserves sum_i w_i p_i exactly.
            weights = np.full(size, h)
            weights[[0, -1]] = h / 2
            checks.append(
                check(
                    f"Fokker-Planck (N = {size}): |mass(t1) - mass(t0)|",
                    abs(weights @ p1 - weights @ p0),
                    0.0,
                    1e-12,
                )
            )
            checks.append(
                check(
                    f"Fokker-Planck (N = {size}): max |p_FD - exact noised mixture| at t = {t1}",
                    errors[-1],
                    0.0,
                    1e-3,
                )
            )
    order = np.log(errors[0] / errors[1]) / np.log((FP_SIZES[1] - 1) / (FP_SIZES[0] - 1))
    checks.append(check("Fokker-Planck FD vs exact: order in h", order, 2.0, 0.15))
    return {"checks": checks, "errors": errors, "solutions": solutions}


@register(
    "pde",
    "the renormalised heat equation (spectral and finite differences: conservation, decay to the "
    "first Neumann eigenmode) and the VE Fokker-Planck equation against the exact noised mixture "
    "(Higham et al. Sec. 7, Fig. 7)",
)
def pde(context: FigureContext) -> dict:
    """The PDE view (Higham, Higham & Grindrod 2023, Sec. 7, Fig. 7).

    Renormalised heat equation u_t = u_xx + mu(t) u, u_x(0) = u_x(1) = 0,
    mu = int u_xx^2 / int u_x^2, from u_0 = exp(-(x - 0.3)^2 / (2 0.05^2)) minus its mean, to T = 0.5.
    Spectral: 41 cosine modes, the Galerkin system solved exactly (closed form) and by RK4
    (dt = 1/(8 lambda_max)); finite differences: cell-centred, N = 32, 64, 128 cells, RK4 with
    dt = h^2/8. Checks: int u_x^2 conserved (spectral RK4 and the discrete FD norm), int u = 0
    conserved, the decay of |u - A_1 cos(pi x)| at the rate lambda_2 - lambda_1 = 3 pi^2 with
    A_1 = sqrt(2 C)/pi fixed by the conserved C, FD against spectral at order h^2.

    Fokker-Planck of the VE SDE (sigma 0.01 -> 10): p_t = 1/2 g^2 p_xx from the exact density of
    p_0 = 0.3 N(-2, 0.3^2) + 0.7 N(1.5, 0.5^2) noised to t = 0.3 (sigma 0.079) up to t = 0.7
    (sigma 1.26), on [-8, 8] with 200 and 400 nodes; checks: mass conservation, the maximum error
    against the exact noised mixture at t = 0.7 and its order h^2. The settings are ours (the text
    gives none for this comparison). ``quick`` does not change this figure (seconds anyway).
    """
    heat = heat_equation_panel(context)
    fokker = fokker_planck_panel(context)
    figure = new_figure(4, 1)
    axes = figure.add_subplot(1, 4, 1)
    shown = [0, 1, 2, 5, 10, 50]
    for index in shown:
        axes.plot(
            heat["x"], heat["profiles"][index], lw=1, label=f"t = {heat['record_times'][index]:.2f}"
        )
    size = FD_SIZES[0]
    x_cells, solution = heat["fd_solutions"][size]
    axes.plot(x_cells, solution[-1], "k.", ms=3, label=f"FD, N = {size}, t = {FINAL_TIME}")
    axes.set_title("u_t = u_xx + mu(t) u, no flux", fontsize=9)
    axes.legend(fontsize=6)
    axes = figure.add_subplot(1, 4, 2)
    axes.semilogy(heat["record_times"], heat["deviation"], "tab:blue", label="|u - A_1 cos(pi x)|")
    axes.semilogy(
        heat["record_times"],
        heat["deviation"][10]
        * np.exp(-3 * np.pi**2 * (heat["record_times"] - heat["record_times"][10])),
        "k--",
        lw=1,
        label="exp(-3 pi^2 t)",
    )
    axes.set_xlabel("t")
    axes.set_title("decay to the first Neumann eigenmode", fontsize=9)
    axes.legend(fontsize=7)
    axes = figure.add_subplot(1, 4, 3)
    axes.loglog(FD_SIZES, heat["fd_errors"], "o-", ms=3, label="renormalised heat, FD vs spectral")
    axes.loglog(
        [FP_SIZES[0] - 1, FP_SIZES[1] - 1],
        fokker["errors"],
        "s-",
        ms=3,
        label="VE Fokker-Planck, FD vs exact",
    )
    reference = np.array([30, 400])
    axes.loglog(
        reference, heat["fd_errors"][0] * (reference / FD_SIZES[0]) ** -2.0, "k:", label="h^2"
    )
    ticks = [*FD_SIZES, *(n - 1 for n in FP_SIZES)]
    axes.set_xticks(ticks, [str(n) for n in ticks], fontsize=7)
    axes.minorticks_off()
    axes.set_xlabel("cells")
    axes.set_title("finite-difference error", fontsize=9)
    axes.legend(fontsize=6)
    axes = figure.add_subplot(1, 4, 4)
    x, p0, p1, exact = fokker["solutions"][FP_SIZES[-1]]
    axes.plot(
        x, p0, "0.6", label=f"p at t = {FP_TIMES[0]} (sigma {float(VE.sigma(FP_TIMES[0])):.2f})"
    )
    axes.plot(
        x,
        exact,
        "k",
        label=f"exact at t = {FP_TIMES[1]} (sigma {float(VE.sigma(FP_TIMES[1])):.2f})",
    )
    axes.plot(x[::8], p1[::8], "r.", ms=3, label="heat equation, FD")
    axes.set_xlim(-6, 6)
    axes.set_title("VE Fokker-Planck = heat equation", fontsize=9)
    axes.legend(fontsize=6)
    figure.suptitle("The PDE view (Higham, Higham & Grindrod 2023, Sec. 7, Fig. 7)")
    save(figure, context, "pde")
    return {
        "settings": {
            "bump": BUMP,
            "num_modes": NUM_MODES,
            "final_time": FINAL_TIME,
            "fd_sizes": FD_SIZES,
            "mixture": MIXTURE,
            "ve": {"sigma_min": VE.sigma_min, "sigma_max": VE.sigma_max},
            "fokker_planck_times": FP_TIMES,
            "fokker_planck_sizes": FP_SIZES,
        },
        "checks": heat["checks"] + fokker["checks"],
        "data": {
            "conserved_int_ux2": heat["conserved"],
            "limit_amplitude": heat["amplitude"],
            "heat_fd_errors": heat["fd_errors"],
            "fokker_planck_errors": fokker["errors"],
        },
    }
