"""Exact oracles: data distributions whose noised marginals are known in closed form.

For Gaussian-mixture data p_0 = sum_k w_k N(mu_k, C_k) and any linear-Gaussian process,

    p_t = sum_k w_k N(alpha_t mu_k, alpha_t^2 C_k + sigma_t^2 I)

(Chan 2024, "Tutorial on diffusion models for imaging and vision", Sec. 3.2; REFERENCE I-16), so the
log-density, the score, the posterior mean E[x_0 | x_t] (the optimal x0 prediction; Tweedie) and the
optimal eps are exact. Each covariance is stored by its eigendecomposition C_k = U_k diag(c_k) U_k^T,
which makes every noised covariance U_k diag(alpha^2 c_k + sigma^2) U_k^T at no extra cost.

For a single Gaussian the probability-flow ODE is affine and solved exactly by ``ode_flow``: along the
flow, each eigen-coordinate of (x - alpha mu) / sqrt(alpha^2 c + sigma^2) is constant (REFERENCE I-15).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import Array
from jax.typing import ArrayLike

from diffusion.parameterization import Denoiser
from diffusion.processes import Process

__all__ = ["PRESETS", "GaussianMixture", "gaussian", "gaussian_mixture", "preset"]


@struct.dataclass
class GaussianMixture:
    """p_0 = sum_k weights_k N(means_k, eigvecs_k diag(eigvals_k) eigvecs_k^T) in dimension D.

    Arrays: weights (K,), means (K, D), eigvals (K, D), eigvecs (K, D, D) (columns are eigenvectors).
    Build with ``gaussian`` or ``gaussian_mixture``. All methods take a batch x of shape (B, D) and t
    a scalar or (B,) array, and work for any ``Process``.
    """

    weights: Array
    means: Array
    eigvals: Array
    eigvecs: Array

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    # ------------------------------------------------------------------ noised components
    def _noised(self, process: Process, x: ArrayLike, t: ArrayLike):
        """Per-component quantities of p_t at x: eigen-coordinates of x - alpha mu, variances, log N."""
        x = jnp.asarray(x)
        t = jnp.broadcast_to(jnp.asarray(t, dtype=x.dtype), x.shape[:1])
        alpha = process.alpha(t)[:, None, None]  # (B, 1, 1)
        sigma = process.sigma(t)[:, None, None]
        centered = x[:, None, :] - alpha * self.means[None]  # (B, K, D)
        coords = jnp.einsum("bkd,kde->bke", centered, self.eigvecs)  # U_k^T (x - alpha mu_k)
        variances = alpha**2 * self.eigvals[None] + sigma**2  # (B, K, D)
        log_normal = -0.5 * jnp.sum(
            coords**2 / variances + jnp.log(2 * math.pi * variances), axis=-1
        )
        return coords, variances, log_normal, alpha

    def _responsibilities(self, log_normal: Array) -> Array:
        return jax.nn.softmax(jnp.log(self.weights)[None] + log_normal, axis=-1)  # (B, K)

    # ------------------------------------------------------------------ densities and scores
    def log_prob(self, process: Process, x: ArrayLike, t: ArrayLike) -> Array:
        """log p_t(x) for each row of x (REFERENCE I-16)."""
        _, _, log_normal, _ = self._noised(process, x, t)
        return jax.nn.logsumexp(jnp.log(self.weights)[None] + log_normal, axis=-1)

    def score(self, process: Process, x: ArrayLike, t: ArrayLike) -> Array:
        """grad_x log p_t(x) = sum_k r_k(x) (alpha^2 C_k + sigma^2 I)^{-1} (alpha mu_k - x)."""
        coords, variances, log_normal, _ = self._noised(process, x, t)
        resp = self._responsibilities(log_normal)
        per_component = -jnp.einsum("kde,bke->bkd", self.eigvecs, coords / variances)
        return jnp.einsum("bk,bkd->bd", resp, per_component)

    def x0(self, process: Process, x: ArrayLike, t: ArrayLike) -> Array:
        """E[x_0 | x_t = x] = sum_k r_k(x) [mu_k + alpha C_k (alpha^2 C_k + sigma^2 I)^{-1} (x - alpha mu_k)].

        The posterior mean computed component by component (REFERENCE I-17), not through Tweedie's
        formula, so that the two can be tested against each other.
        """
        coords, variances, log_normal, alpha = self._noised(process, x, t)
        resp = self._responsibilities(log_normal)
        gain = alpha * self.eigvals[None] / variances  # (B, K, D)
        per_component = self.means[None] + jnp.einsum("kde,bke->bkd", self.eigvecs, gain * coords)
        return jnp.einsum("bk,bkd->bd", resp, per_component)

    def eps(self, process: Process, x: ArrayLike, t: ArrayLike) -> Array:
        """E[eps | x_t = x] = (x - alpha E[x_0 | x_t]) / sigma, the optimal eps prediction."""
        x = jnp.asarray(x)
        t = jnp.broadcast_to(jnp.asarray(t, dtype=x.dtype), x.shape[:1])
        return (x - process.alpha(t)[:, None] * self.x0(process, x, t)) / process.sigma(t)[:, None]

    def denoiser(self, process: Process) -> Denoiser:
        """The exact denoiser of this distribution under ``process`` (eps parameterization, input t)."""
        return Denoiser(
            params=self,
            apply_fn=_OracleEps(process),
            process=process,
            parameterization="eps",
            time_input="t",
        )

    # ------------------------------------------------------------------ sampling
    def sample(self, key: Array, num: int) -> Array:
        """Draw ``num`` samples of x_0."""
        return _sample(self, key, num)

    def _sample_uncompiled(self, key: Array, num: int) -> Array:
        key_component, key_noise = jax.random.split(key)
        component = jax.random.choice(key_component, self.num_components, (num,), p=self.weights)
        noise = jax.random.normal(key_noise, (num, self.dim), self.means.dtype)
        scaled = noise * jnp.sqrt(self.eigvals[component])
        return self.means[component] + jnp.einsum("nde,ne->nd", self.eigvecs[component], scaled)

    def sample_marginal(self, key: Array, process: Process, num: int, t: ArrayLike) -> Array:
        """Draw ``num`` samples of x_t ~ p_t (t a scalar or (num,) array)."""
        key_data, key_noise = jax.random.split(key)
        x0 = self.sample(key_data, num)
        return process.sample_marginal(key_noise, x0, jnp.broadcast_to(t, (num,)))[0]

    # ------------------------------------------------------------------ exact ODE solution
    def ode_flow(self, process: Process, x: ArrayLike, t: ArrayLike, s: ArrayLike) -> Array:
        """Exact solution at time s of the probability-flow ODE started at x at time t (Gaussian data).

        dx/dt = f x - g^2/2 score (Song et al. 2021, eq. 13) maps each eigen-coordinate of
        (x - alpha_t mu)/sqrt(alpha_t^2 c + sigma_t^2) to itself; t and s may be either order.
        """
        if self.num_components != 1:
            raise ValueError(
                "ode_flow is exact only for a single Gaussian; this mixture has "
                f"{self.num_components} components"
            )
        x = jnp.asarray(x)
        mean, eigvals, eigvecs = self.means[0], self.eigvals[0], self.eigvecs[0]
        alpha_t, sigma_t = process.alpha(t), process.sigma(t)
        alpha_s, sigma_s = process.alpha(s), process.sigma(s)
        coords = (x - alpha_t * mean) @ eigvecs
        gain = jnp.sqrt((alpha_s**2 * eigvals + sigma_s**2) / (alpha_t**2 * eigvals + sigma_t**2))
        return alpha_s * mean + (gain * coords) @ eigvecs.T


_sample = jax.jit(GaussianMixture._sample_uncompiled, static_argnums=2)


@dataclasses.dataclass(frozen=True)
class _OracleEps:
    """``apply_fn`` of an oracle's denoiser: params is the GaussianMixture, the time input is t."""

    process: Process

    def __call__(self, oracle: GaussianMixture, x: Array, t: Array) -> Array:
        return oracle.eps(self.process, x, t)


def _eig(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cov = np.asarray(cov, dtype=np.float64)
    if cov.ndim == 1:  # diagonal covariance given by its diagonal
        if np.any(cov <= 0):
            raise ValueError(f"diagonal covariance entries must be > 0, got {cov}")
        return cov, np.eye(cov.shape[0])
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1] or not np.allclose(cov, cov.T):
        raise ValueError(f"covariance must be a symmetric (D, D) matrix, got shape {cov.shape}")
    eigvals, eigvecs = np.linalg.eigh(cov)
    if eigvals.min() <= 0:
        raise ValueError(
            f"covariance must be positive definite; smallest eigenvalue {eigvals.min()}"
        )
    return eigvals, eigvecs


def gaussian_mixture(
    weights: ArrayLike, means: ArrayLike, covariances: ArrayLike | list
) -> GaussianMixture:
    """A Gaussian mixture from weights (K,), means (K, D) and covariances, each (D, D) or diagonal (D,)."""
    weights = np.asarray(weights, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    if means.ndim != 2:
        raise ValueError(f"means must have shape (K, D), got {means.shape}")
    num_components, dim = means.shape
    if weights.shape != (num_components,) or np.any(weights <= 0):
        raise ValueError(
            f"weights must be {num_components} positive numbers, got shape {weights.shape}"
        )
    if len(covariances) != num_components:
        raise ValueError(f"need {num_components} covariances, got {len(covariances)}")
    eigs = [_eig(c) for c in covariances]
    if any(vals.shape != (dim,) for vals, _ in eigs):
        raise ValueError(f"every covariance must be of dimension {dim}")
    return GaussianMixture(
        weights=jnp.asarray(weights / weights.sum()),
        means=jnp.asarray(means),
        eigvals=jnp.asarray(np.stack([vals for vals, _ in eigs])),
        eigvecs=jnp.asarray(np.stack([vecs for _, vecs in eigs])),
    )


def gaussian(mean: ArrayLike, covariance: ArrayLike) -> GaussianMixture:
    """A single Gaussian N(mean, covariance) (covariance (D, D) or its diagonal (D,))."""
    mean = np.asarray(mean, dtype=np.float64)
    return gaussian_mixture(np.ones(1), mean[None], [covariance])


# ================================================================================ presets
def _ring8_2d() -> GaussianMixture:
    """8 equal modes on a circle of radius 2, each isotropic with std 0.05."""
    angles = 2 * np.pi * np.arange(8) / 8
    means = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return gaussian_mixture(np.ones(8), means, [np.full(2, 0.05**2)] * 8)


def _gaussian_2d() -> GaussianMixture:
    """A correlated 2-D Gaussian (correlation 0.8, stds 1 and 0.5) with mean (0.5, -0.25)."""
    std = np.array([1.0, 0.5])
    correlation = np.array([[1.0, 0.8], [0.8, 1.0]])
    return gaussian(np.array([0.5, -0.25]), correlation * np.outer(std, std))


def _gmm_64d() -> GaussianMixture:
    """16 components in 64-D with full covariances, drawn once from numpy seed 0.

    Means ~ U[-1, 1]^64; covariance A A^T / 64 + 0.01 I with A ~ N(0, 0.3^2); Dirichlet(2) weights.
    """
    rng = np.random.default_rng(0)
    num_components, dim = 16, 64
    weights = rng.dirichlet(np.full(num_components, 2.0))
    means = rng.uniform(-1.0, 1.0, (num_components, dim))
    factors = rng.normal(0.0, 0.3, (num_components, dim, dim))
    covariances = [f @ f.T / dim + 0.01 * np.eye(dim) for f in factors]
    return gaussian_mixture(weights, means, covariances)


PRESETS = {"ring8_2d": _ring8_2d, "gmm_64d": _gmm_64d, "gaussian_2d": _gaussian_2d}


@functools.cache
def _preset_cached(name: str, dtype: str) -> GaussianMixture:
    oracle = PRESETS[name]()
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=dtype), oracle)


def preset(name: str) -> GaussianMixture:
    """A named oracle distribution: 'ring8_2d', 'gmm_64d' or 'gaussian_2d' (in the default float dtype)."""
    if name not in PRESETS:
        raise ValueError(f"unknown oracle preset {name!r}; accepted: {', '.join(PRESETS)}")
    return _preset_cached(name, jnp.dtype(jnp.result_type(float)).name)
