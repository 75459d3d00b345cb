"""Exact oracles: data distributions whose noised marginals are known in closed form.

For Gaussian-mixture data p_0 = sum_k w_k N(mu_k, C_k) and any linear-Gaussian process,

    p_t = sum_k w_k N(alpha_t mu_k, alpha_t^2 C_k + sigma_t^2 I)

(Chan 2024, "Tutorial on diffusion models for imaging and vision", Sec. 3.2), so the
log-density, the score, the posterior mean E[x_0 | x_t] (the optimal x0 prediction; Tweedie) and the
optimal eps are exact. Each covariance is stored by its eigendecomposition C_k = U_k diag(c_k) U_k^T,
which makes every noised covariance U_k diag(alpha^2 c_k + sigma^2) U_k^T at no extra cost.

For a single Gaussian the probability-flow ODE is affine and solved exactly by ``ode_flow``: along the
flow, each eigen-coordinate of (x - alpha mu) / sqrt(alpha^2 c + sigma^2) is constant (the flow of
Song et al. 2021, eq. 13, is linear for Gaussian data).

Labelled mixtures (``with_labels``) give each component a class y. Since the forward kernel does not
see y, p_t(x | y) = sum_{k in y} w_k N(alpha_t mu_k, alpha_t^2 C_k + sigma_t^2 I) / W_y with
W_y = sum_{k in y} w_k: the class-conditional density, score and posterior mean are those of the
class's sub-mixture, exactly, under every process; Bayes' rule gives the exact noisy classifier
p_t(y | x) = W_y p_t(x | y) / p_t(x) (``class_log_prob``), so grad log p_t(x | y) = grad log p_t(x) +
grad log p_t(y | x) (Song et al. 2021, Sec. 5.3) holds with every term in closed form. Every
density method takes optional ``labels``; the label ``num_classes`` is the null label (unconditional),
as in the networks' label embedding (Ho & Salimans 2022).
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

from diffusion.guidance import Classifier, check_labels
from diffusion.parameterization import Denoiser
from diffusion.processes import Process

__all__ = ["PRESETS", "GaussianMixture", "gaussian", "gaussian_mixture", "preset"]


@struct.dataclass
class GaussianMixture:
    """p_0 = sum_k weights_k N(means_k, eigvecs_k diag(eigvals_k) eigvecs_k^T) in dimension D.

    Arrays: weights (K,), means (K, D), eigvals (K, D), eigvecs (K, D, D) (columns are eigenvectors).
    Build with ``gaussian`` or ``gaussian_mixture``. All methods take a batch x of shape (B, D) and t
    a scalar or (B,) array, and work for any ``Process``.

    ``component_labels`` (static, a tuple of K class indices covering 0..num_classes-1; see
    ``with_labels``) makes the mixture labelled. Then ``log_prob``, ``score``, ``x0``, ``eps`` and the
    denoiser accept ``labels``: a (B,) (or scalar) array of classes, the row's density becoming the
    class-conditional p_t(x | y) (the sub-mixture of class y's components, weights renormalised); the
    null label ``num_classes`` leaves a row unconditional.
    """

    weights: Array
    means: Array
    eigvals: Array
    eigvecs: Array
    component_labels: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def num_classes(self) -> int | None:
        """Number of classes of a labelled mixture (None if unlabelled)."""
        return None if self.component_labels is None else max(self.component_labels) + 1

    # ------------------------------------------------------------------ labels
    def with_labels(self, component_labels) -> GaussianMixture:
        """This mixture with class ``component_labels[k]`` for component k.

        Every class 0..num_classes-1 must own at least one component (so that p(y) > 0).
        """
        labels = tuple(int(label) for label in np.asarray(component_labels).reshape(-1))
        if len(labels) != self.num_components:
            raise ValueError(
                f"need one label per component ({self.num_components}), got {len(labels)}"
            )
        if min(labels) < 0 or set(labels) != set(range(max(labels) + 1)):
            raise ValueError(
                f"component labels must cover 0..C-1 with every class used, got {labels}"
            )
        return self.replace(component_labels=labels)

    def class_conditional(self, label: int) -> GaussianMixture:
        """p_0(x | y = label) as a mixture of its own: class ``label``'s components, renormalised."""
        self._require_labelled()
        if not (isinstance(label, int | np.integer) and 0 <= label < self.num_classes):
            raise ValueError(f"label must be an integer in [0, {self.num_classes}), got {label!r}")
        rows = np.flatnonzero(np.asarray(self.component_labels) == label)
        weights = self.weights[rows]
        return GaussianMixture(
            weights=weights / weights.sum(),
            means=self.means[rows],
            eigvals=self.eigvals[rows],
            eigvecs=self.eigvecs[rows],
        )

    def class_prior(self) -> Array:
        """p(y) = W_y, the total weight of each class's components, shape (num_classes,)."""
        self._require_labelled()
        return self._class_membership().T @ self.weights

    def _require_labelled(self) -> None:
        if self.component_labels is None:
            raise ValueError("this mixture has no class labels; build one with with_labels(...)")

    def _class_membership(self) -> Array:
        """(K, C) one-hot matrix: component k belongs to class c."""
        return jnp.asarray(np.eye(self.num_classes)[np.asarray(self.component_labels)], bool)

    def _log_weights(self, labels: ArrayLike | None, batch: int) -> Array:
        """log w_k, (1, K); with labels, (B, K) with -inf outside each row's class (null: none)."""
        log_weights = jnp.log(self.weights)[None]
        if labels is None:
            return log_weights
        self._require_labelled()
        labels = check_labels(labels, self.num_classes, allow_null=True)
        labels = jnp.broadcast_to(labels, (batch,))
        member = jnp.asarray(self.component_labels)[None, :] == labels[:, None]
        unconditional = (labels == self.num_classes)[:, None]
        return jnp.where(member | unconditional, log_weights, -jnp.inf)

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

    def _responsibilities(self, log_normal: Array, labels: ArrayLike | None) -> Array:
        log_weights = self._log_weights(labels, log_normal.shape[0])
        return jax.nn.softmax(log_weights + log_normal, axis=-1)  # (B, K)

    # ------------------------------------------------------------------ densities and scores
    def log_prob(
        self, process: Process, x: ArrayLike, t: ArrayLike, labels: ArrayLike | None = None
    ) -> Array:
        """log p_t(x) (or log p_t(x | y) with ``labels``) for each row of x (Chan 2024, Sec. 3.2).

        With labels: logsumexp over the class's components of log w_k N_k minus log W_y.
        """
        _, _, log_normal, _ = self._noised(process, x, t)
        log_weights = self._log_weights(labels, log_normal.shape[0])
        joint = jax.nn.logsumexp(log_weights + log_normal, axis=-1)
        return joint - jax.nn.logsumexp(log_weights, axis=-1)

    def score(
        self, process: Process, x: ArrayLike, t: ArrayLike, labels: ArrayLike | None = None
    ) -> Array:
        """grad_x log p_t(x) = sum_k r_k(x) (alpha^2 C_k + sigma^2 I)^{-1} (alpha mu_k - x).

        With ``labels`` the responsibilities r_k run over each row's class only: grad log p_t(x | y).
        """
        coords, variances, log_normal, _ = self._noised(process, x, t)
        resp = self._responsibilities(log_normal, labels)
        per_component = -jnp.einsum("kde,bke->bkd", self.eigvecs, coords / variances)
        return jnp.einsum("bk,bkd->bd", resp, per_component)

    def x0(
        self, process: Process, x: ArrayLike, t: ArrayLike, labels: ArrayLike | None = None
    ) -> Array:
        """E[x_0 | x_t = x] = sum_k r_k(x) [mu_k + alpha C_k (alpha^2 C_k + sigma^2 I)^{-1} (x - alpha mu_k)].

        The posterior mean computed component by component (Gaussian conditioning), not through
        Tweedie's formula, so that the two can be tested against each other. With ``labels``:
        E[x_0 | x_t = x, y].
        """
        coords, variances, log_normal, alpha = self._noised(process, x, t)
        resp = self._responsibilities(log_normal, labels)
        gain = alpha * self.eigvals[None] / variances  # (B, K, D)
        per_component = self.means[None] + jnp.einsum("kde,bke->bkd", self.eigvecs, gain * coords)
        return jnp.einsum("bk,bkd->bd", resp, per_component)

    def eps(
        self, process: Process, x: ArrayLike, t: ArrayLike, labels: ArrayLike | None = None
    ) -> Array:
        """E[eps | x_t = x] = (x - alpha E[x_0 | x_t]) / sigma, the optimal eps prediction."""
        x = jnp.asarray(x)
        t = jnp.broadcast_to(jnp.asarray(t, dtype=x.dtype), x.shape[:1])
        x0 = self.x0(process, x, t, labels)
        return (x - process.alpha(t)[:, None] * x0) / process.sigma(t)[:, None]

    def class_log_prob(self, process: Process, x: ArrayLike, t: ArrayLike) -> Array:
        """log p_t(y | x) for every class, shape (B, num_classes): the exact noisy classifier.

        Bayes' rule: p_t(y | x) = sum_{k in y} w_k N_k(x) / sum_k w_k N_k(x), with N_k the noised
        component densities (each row's log-probabilities sum to 1 in probability).
        """
        self._require_labelled()
        _, _, log_normal, _ = self._noised(process, x, t)
        joint = jnp.log(self.weights)[None] + log_normal  # (B, K)
        outside = jnp.where(self._class_membership(), 0.0, -jnp.inf)  # (K, C)
        per_class = jax.nn.logsumexp(joint[:, :, None] + outside[None], axis=1)  # (B, C)
        return per_class - jax.nn.logsumexp(joint, axis=-1, keepdims=True)

    def denoiser(self, process: Process) -> Denoiser:
        """The exact denoiser of this distribution under ``process`` (eps parameterization, input t).

        Like a class-conditional network, it takes labels as ``y`` (model keyword): ``denoiser.eps(x,
        t, y=labels)`` is the class-conditional eps; ``y`` None or the null label ``num_classes`` is
        unconditional.
        """
        return Denoiser(
            params=self,
            apply_fn=_OracleEps(process),
            process=process,
            parameterization="eps",
            time_input="t",
        )

    def classifier(self, process: Process) -> Classifier:
        """The exact noisy classifier p_t(y | x) of this labelled mixture as a ``Classifier``.

        Its logits are ``class_log_prob`` (log-probabilities are valid logits), time input t.
        """
        self._require_labelled()
        return Classifier(
            params=self,
            apply_fn=_OracleClassLogProb(process),
            process=process,
            num_classes=self.num_classes,
            time_input="t",
        )

    # ------------------------------------------------------------------ conditioning on coordinates
    def condition_on_coordinates(self, known: ArrayLike, values: ArrayLike) -> GaussianMixture:
        """p_0(x_unknown | x_known = values): a Gaussian mixture over the unknown coordinates.

        ``known`` is a (D,) boolean mask of known coordinates; ``values`` holds the known values
        (length D, entries outside the mask ignored; or of the number of known coordinates). Each
        component conditions as a Gaussian (mean mu_u + C_uk C_kk^{-1} (y - mu_k), covariance
        C_uu - C_uk C_kk^{-1} C_ku; Bishop 2006, eqs. 2.81-2.82) and its weight becomes
        w_k N(y; mu_k, C_kk) / sum_j w_j N(y; mu_j, C_jj) (Bayes' rule over the components, with
        each component's marginal of the known coordinates). Host (numpy, float64) computation for
        tests and references; labels are kept.
        """
        known = np.asarray(known, dtype=bool).reshape(-1)
        if known.shape != (self.dim,) or known.all() or not known.any():
            raise ValueError(
                f"known must be a (dim,) = ({self.dim},) mask with both known and unknown entries"
            )
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.shape == (self.dim,):
            values = values[known]
        if values.shape != (known.sum(),):
            raise ValueError(
                f"values must have {self.dim} or {known.sum()} entries, got {values.shape}"
            )
        means = np.asarray(self.means, np.float64)
        eigvecs = np.asarray(self.eigvecs, np.float64)
        covariances = np.einsum("kde,ke,kfe->kdf", eigvecs, np.asarray(self.eigvals), eigvecs)
        log_weights, cond_means, cond_covs = [], [], []
        for weight, mean, cov in zip(np.asarray(self.weights), means, covariances, strict=True):
            cov_kk = cov[np.ix_(known, known)]
            cov_uk = cov[np.ix_(~known, known)]
            gain = np.linalg.solve(cov_kk, cov_uk.T).T  # C_uk C_kk^{-1}
            residual = values - mean[known]
            _, log_det = np.linalg.slogdet(2 * math.pi * cov_kk)
            log_weights.append(
                math.log(weight) - 0.5 * (log_det + residual @ np.linalg.solve(cov_kk, residual))
            )
            cond_means.append(mean[~known] + gain @ residual)
            cond_cov = cov[np.ix_(~known, ~known)] - gain @ cov_uk.T
            cond_covs.append(0.5 * (cond_cov + cond_cov.T))
        log_weights = np.array(log_weights)
        weights = np.exp(log_weights - log_weights.max())
        conditional = gaussian_mixture(weights, np.stack(cond_means), cond_covs)
        if self.component_labels is None:
            return conditional
        return conditional.replace(component_labels=self.component_labels)

    # ------------------------------------------------------------------ sampling
    def sample(self, key: Array, num: int) -> Array:
        """Draw ``num`` samples of x_0."""
        return _sample(self, key, num)[0]

    def sample_with_labels(self, key: Array, num: int) -> tuple[Array, Array]:
        """Draw ``num`` samples of (x_0, y) from a labelled mixture (y: int32 classes).

        The same key gives the same x_0 as ``sample``.
        """
        self._require_labelled()
        x, component = _sample(self, key, num)
        return x, jnp.asarray(self.component_labels, jnp.int32)[component]

    def _sample_uncompiled(self, key: Array, num: int) -> tuple[Array, Array]:
        key_component, key_noise = jax.random.split(key)
        component = jax.random.choice(key_component, self.num_components, (num,), p=self.weights)
        noise = jax.random.normal(key_noise, (num, self.dim), self.means.dtype)
        scaled = noise * jnp.sqrt(self.eigvals[component])
        x = self.means[component] + jnp.einsum("nde,ne->nd", self.eigvecs[component], scaled)
        return x, component

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
    """``apply_fn`` of an oracle's denoiser: params is the GaussianMixture, the time input is t.

    ``y`` (optional labels, the null label ``num_classes`` meaning unconditional) as for a network.
    """

    process: Process

    def __call__(
        self, oracle: GaussianMixture, x: Array, t: Array, y: Array | None = None
    ) -> Array:
        return oracle.eps(self.process, x, t, labels=y)


@dataclasses.dataclass(frozen=True)
class _OracleClassLogProb:
    """``apply_fn`` of an oracle's classifier: log p_t(y | x) as logits, time input t."""

    process: Process

    def __call__(self, oracle: GaussianMixture, x: Array, t: Array) -> Array:
        return oracle.class_log_prob(self.process, x, t)


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
    weights: ArrayLike,
    means: ArrayLike,
    covariances: ArrayLike | list,
    labels: ArrayLike | None = None,
) -> GaussianMixture:
    """A Gaussian mixture from weights (K,), means (K, D) and covariances, each (D, D) or diagonal (D,).

    ``labels`` (optional, K class indices) makes it a labelled mixture (see ``with_labels``).
    """
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
    mixture = GaussianMixture(
        weights=jnp.asarray(weights / weights.sum()),
        means=jnp.asarray(means),
        eigvals=jnp.asarray(np.stack([vals for vals, _ in eigs])),
        eigvecs=jnp.asarray(np.stack([vecs for _, vecs in eigs])),
    )
    return mixture if labels is None else mixture.with_labels(labels)


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
