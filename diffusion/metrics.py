"""Sample-quality metrics on feature vectors and labels (host-side NumPy/SciPy, float64).

Every function is pure. Features are (num_points, dim) arrays produced by a feature extractor
(``diffusion.models.inception`` for FID/KID on natural images, ``diffusion.models.classifier`` for
MNIST-like data); images passed to the sliced Wasserstein distance are flattened per example.

- Feature statistics: mean and unbiased covariance, accumulated batch by batch with the pairwise
  update of Chan, Golub & LeVeque (1979), so a whole dataset's reference statistics never need to sit
  in memory at once.
- Fréchet distance between Gaussians (the FID of Heusel et al. 2017, eq. 6).
- Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel.
- Sliced Wasserstein-2 distance (Rabin et al. 2011; Bonneel et al. 2015) and its two-sample noise floor.
- Class histogram of predicted labels and Pearson's chi-square distance to the uniform distribution,
  to judge mode coverage of generated digits (Higham, Higham & Grindrod 2023, Fig. 4).

Randomness (subset draws, projection directions) comes from an integer ``seed`` through
``numpy.random.default_rng``, so every metric is reproducible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import scipy.stats
from numpy.typing import ArrayLike

# Relative asymmetry |A - A^T| / |A| above which a "symmetric" matrix argument is rejected.
_SYMMETRY_RTOL = 1e-6


def _as_feature_matrix(features: ArrayLike, name: str) -> np.ndarray:
    """Return ``features`` as a float64 (num_points, dim) array, or raise ValueError."""
    matrix = np.asarray(features, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a (num_points, dim) array; got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return matrix


def _as_point_matrix(points: ArrayLike, name: str) -> np.ndarray:
    """Flatten (num_points, ...) points to a float64 (num_points, dim) matrix, or raise ValueError."""
    point_array = np.asarray(points, dtype=np.float64)
    if point_array.ndim < 1:
        raise ValueError(f"{name} must have a leading num_points axis; got a scalar")
    return _as_feature_matrix(point_array.reshape(point_array.shape[0], -1), name)


def _as_symmetric_matrix(matrix: ArrayLike, name: str) -> np.ndarray:
    """Return a float64 square matrix symmetrised as (A + A^T)/2; raise if it is far from symmetric."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name} must be a square (dim, dim) matrix; got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"{name} contains NaN or infinite values")
    asymmetry = np.linalg.norm(matrix - matrix.T)
    if asymmetry > _SYMMETRY_RTOL * max(np.linalg.norm(matrix), np.finfo(np.float64).tiny):
        raise ValueError(f"{name} must be symmetric; |A - A^T| = {asymmetry:.3g}")
    return 0.5 * (matrix + matrix.T)


# ---------------------------------------------------------------------------------------------
# Feature statistics
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeatureStatistics:
    """Mean and unbiased (ddof=1) covariance of ``count`` feature vectors, in float64."""

    mean: np.ndarray
    covariance: np.ndarray
    count: int


@dataclasses.dataclass(frozen=True)
class FeatureMoments:
    """Running moments of a stream of feature vectors: count, mean, and the centred scatter matrix.

    ``scatter`` is sum_i (x_i - mean)(x_i - mean)^T. Start from ``FeatureMoments.empty(dim)``, add
    batches with ``update_moments`` and turn the result into ``FeatureStatistics`` with
    ``finalize_moments``.
    """

    count: int
    mean: np.ndarray
    scatter: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> FeatureMoments:
        """Moments of zero vectors of dimension ``dim``."""
        if dim < 1:
            raise ValueError(f"dim must be a positive integer; got {dim}")
        return cls(count=0, mean=np.zeros(dim), scatter=np.zeros((dim, dim)))


def update_moments(moments: FeatureMoments, features: ArrayLike) -> FeatureMoments:
    """Add a (batch, dim) batch of features to running moments.

    Pairwise combination of (count, mean, scatter) of Chan, Golub & LeVeque (1979): with
    delta = mean_b - mean_a, the merged scatter is S_a + S_b + delta delta^T n_a n_b / (n_a + n_b).
    This avoids the cancellation of the sum-of-squares form E[x x^T] - mean mean^T.
    """
    batch = _as_feature_matrix(features, "features")
    dim = moments.mean.shape[0]
    if batch.shape[1] != dim:
        raise ValueError(f"features must have dim {dim} like the moments; got {batch.shape[1]}")
    batch_count = batch.shape[0]
    if batch_count == 0:
        return moments
    batch_mean = batch.mean(axis=0)
    batch_centred = batch - batch_mean
    batch_scatter = batch_centred.T @ batch_centred
    total = moments.count + batch_count
    delta = batch_mean - moments.mean
    mean = moments.mean + delta * (batch_count / total)
    # Chan, Golub & LeVeque (1979), pairwise update of the centred second moment.
    scatter = (
        moments.scatter
        + batch_scatter
        + np.outer(delta, delta) * (moments.count * batch_count / total)
    )
    return FeatureMoments(count=total, mean=mean, scatter=scatter)


def finalize_moments(moments: FeatureMoments) -> FeatureStatistics:
    """Mean and unbiased covariance scatter / (count - 1) from running moments (needs count >= 2)."""
    if moments.count < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance; got {moments.count}")
    covariance = moments.scatter / (moments.count - 1)
    return FeatureStatistics(
        mean=moments.mean.copy(), covariance=0.5 * (covariance + covariance.T), count=moments.count
    )


def feature_statistics(features: ArrayLike) -> FeatureStatistics:
    """Mean and unbiased covariance of a (num_points, dim) feature array (one-batch stream)."""
    matrix = _as_feature_matrix(features, "features")
    return finalize_moments(update_moments(FeatureMoments.empty(matrix.shape[1]), matrix))


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------


def _clipped_eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric PSD matrix with round-off negative eigenvalues set to 0."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return np.clip(eigenvalues, 0.0, None), eigenvectors


def psd_sqrtm(matrix: ArrayLike) -> np.ndarray:
    """Principal square root of a symmetric positive semi-definite matrix.

    A = V diag(w) V^T (``eigh``) gives A^{1/2} = V diag(sqrt(w)) V^T, symmetric PSD; eigenvalues
    that round-off made slightly negative are clipped to 0, so singular (rank-deficient) matrices
    are handled without the complex parts ``scipy.linalg.sqrtm`` may return.
    """
    symmetric = _as_symmetric_matrix(matrix, "matrix")
    eigenvalues, eigenvectors = _clipped_eigh(symmetric)
    root = (eigenvectors * np.sqrt(eigenvalues)) @ eigenvectors.T
    return 0.5 * (root + root.T)


def frechet_distance(
    mean_a: ArrayLike, covariance_a: ArrayLike, mean_b: ArrayLike, covariance_b: ArrayLike
) -> float:
    """Fréchet (Wasserstein-2 squared) distance between N(mean_a, cov_a) and N(mean_b, cov_b).

    Heusel et al. 2017, eq. 6 (FID): |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2}).
    S_a S_b is similar to the symmetric PSD matrix S_a^{1/2} S_b S_a^{1/2}, so
    tr (S_a S_b)^{1/2} = sum_i sqrt(lambda_i(S_a^{1/2} S_b S_a^{1/2})), computed with ``eigh`` and
    clipping of round-off negative eigenvalues. This stays real for singular covariances (fewer
    samples than dimensions), where ``scipy.linalg.sqrtm(S_a S_b)`` may turn complex or warn; the
    square root of a zero eigenvalue carries round-off ~sqrt(machine eps) * |S|, so expect
    absolute errors ~1e-8 * |S| there (1e-10 relative for well-conditioned covariances).
    """
    mean_a = np.asarray(mean_a, dtype=np.float64)
    mean_b = np.asarray(mean_b, dtype=np.float64)
    covariance_a = _as_symmetric_matrix(covariance_a, "covariance_a")
    covariance_b = _as_symmetric_matrix(covariance_b, "covariance_b")
    dim = covariance_a.shape[0]
    for name, array, shape in (
        ("mean_a", mean_a, (dim,)),
        ("mean_b", mean_b, (dim,)),
        ("covariance_b", covariance_b, (dim, dim)),
    ):
        if array.shape != shape:
            raise ValueError(
                f"{name} must have shape {shape} to match covariance_a; got {array.shape}"
            )
    sqrt_covariance_a = psd_sqrtm(covariance_a)
    product = sqrt_covariance_a @ covariance_b @ sqrt_covariance_a
    product_eigenvalues, _ = _clipped_eigh(0.5 * (product + product.T))
    trace_sqrt_product = np.sum(np.sqrt(product_eigenvalues))
    mean_term = np.sum((mean_a - mean_b) ** 2)
    distance = mean_term + np.trace(covariance_a) + np.trace(covariance_b) - 2 * trace_sqrt_product
    # The exact value is >= 0; round-off can make identical statistics give -1e-12.
    return float(max(distance, 0.0))


# ---------------------------------------------------------------------------------------------
# Kernel Inception Distance
# ---------------------------------------------------------------------------------------------


def polynomial_kernel(features_a: ArrayLike, features_b: ArrayLike) -> np.ndarray:
    """Cubic polynomial kernel matrix k(x, y) = (x.y / dim + 1)^3 (Bińkowski et al. 2018, KID)."""
    matrix_a = _as_feature_matrix(features_a, "features_a")
    matrix_b = _as_feature_matrix(features_b, "features_b")
    if matrix_a.shape[1] != matrix_b.shape[1]:
        raise ValueError(
            f"features_a and features_b must have the same dim; got {matrix_a.shape[1]} "
            f"and {matrix_b.shape[1]}"
        )
    return (matrix_a @ matrix_b.T / matrix_a.shape[1] + 1.0) ** 3


def mmd2_unbiased(features_a: ArrayLike, features_b: ArrayLike) -> float:
    """Unbiased estimator of MMD^2 with the cubic polynomial kernel (Gretton et al. 2012, eq. 3).

    MMD_u^2 = sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (n (n-1))
              - 2 sum_{i, j} k(x_i, y_j) / (m n).
    """
    matrix_a = _as_feature_matrix(features_a, "features_a")
    matrix_b = _as_feature_matrix(features_b, "features_b")
    count_a, count_b = matrix_a.shape[0], matrix_b.shape[0]
    if count_a < 2 or count_b < 2:
        raise ValueError(f"need at least 2 points on each side; got {count_a} and {count_b}")
    kernel_aa = polynomial_kernel(matrix_a, matrix_a)
    kernel_bb = polynomial_kernel(matrix_b, matrix_b)
    kernel_ab = polynomial_kernel(matrix_a, matrix_b)
    within_a = (kernel_aa.sum() - np.trace(kernel_aa)) / (count_a * (count_a - 1))
    within_b = (kernel_bb.sum() - np.trace(kernel_bb)) / (count_b * (count_b - 1))
    return float(within_a + within_b - 2 * kernel_ab.mean())


def kernel_inception_distance(
    features_a: ArrayLike,
    features_b: ArrayLike,
    *,
    subset_size: int = 1000,
    num_subsets: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018, §4): mean and std of the unbiased MMD^2 over random subsets.

    Each of ``num_subsets`` rounds draws ``subset_size`` points without replacement from each set
    and evaluates ``mmd2_unbiased``; the mean is the KID estimate and the std its spread across
    subsets. Being unbiased, the estimate can be slightly negative when the distributions match.
    """
    matrix_a = _as_feature_matrix(features_a, "features_a")
    matrix_b = _as_feature_matrix(features_b, "features_b")
    smallest = min(matrix_a.shape[0], matrix_b.shape[0])
    if not 2 <= subset_size <= smallest:
        raise ValueError(
            f"subset_size must be in [2, {smallest}] (the smaller feature set); got {subset_size}"
        )
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be a positive integer; got {num_subsets}")
    rng = np.random.default_rng(seed)
    estimates = np.empty(num_subsets)
    for subset in range(num_subsets):
        rows_a = rng.choice(matrix_a.shape[0], subset_size, replace=False)
        rows_b = rng.choice(matrix_b.shape[0], subset_size, replace=False)
        estimates[subset] = mmd2_unbiased(matrix_a[rows_a], matrix_b[rows_b])
    return float(estimates.mean()), float(estimates.std())


# ---------------------------------------------------------------------------------------------
# Sliced Wasserstein-2 distance
# ---------------------------------------------------------------------------------------------


def random_unit_directions(num_directions: int, dim: int, seed: int) -> np.ndarray:
    """(num_directions, dim) directions uniform on the unit sphere (normalised Gaussian vectors)."""
    if num_directions < 1 or dim < 1:
        raise ValueError(f"num_directions and dim must be positive; got {num_directions} and {dim}")
    gaussian = np.random.default_rng(seed).standard_normal((num_directions, dim))
    return gaussian / np.linalg.norm(gaussian, axis=1, keepdims=True)


def sliced_wasserstein_distance(
    points_a: ArrayLike, points_b: ArrayLike, *, num_projections: int = 256, seed: int = 0
) -> float:
    """Sliced Wasserstein-2 distance between two equal-size point clouds (Bonneel et al. 2015).

    SW_2(a, b) = (E_theta W_2^2(theta#a, theta#b))^{1/2} with theta uniform on the unit sphere,
    estimated with ``num_projections`` directions drawn from ``seed``. For equal-size empirical
    measures the 1-D W_2^2 is the mean squared difference of the sorted projections. Points of any
    shape (num_points, ...) are flattened per point; the same seed gives the same directions, so
    distances computed with one seed are comparable.
    """
    matrix_a = _as_point_matrix(points_a, "points_a")
    matrix_b = _as_point_matrix(points_b, "points_b")
    if matrix_a.shape != matrix_b.shape:
        raise ValueError(
            "points_a and points_b must have the same number of points and dimension; "
            f"got {matrix_a.shape} and {matrix_b.shape}"
        )
    directions = random_unit_directions(num_projections, matrix_a.shape[1], seed)
    projected_a = np.sort(matrix_a @ directions.T, axis=0)
    projected_b = np.sort(matrix_b @ directions.T, axis=0)
    # 1-D W_2^2 between equal-size empirical measures: match order statistics.
    squared_w2_per_direction = np.mean((projected_a - projected_b) ** 2, axis=0)
    return float(np.sqrt(squared_w2_per_direction.mean()))


def sliced_wasserstein_noise_floor(
    sampler: Callable[[int, int], ArrayLike],
    num_points: int,
    *,
    num_projections: int = 256,
    num_repeats: int = 1,
    seed: int = 0,
) -> float:
    """Sliced W_2 between two independent samples of one distribution, averaged over repeats.

    ``sampler(sample_seed, num_points)`` must return ``num_points`` points drawn with that seed.
    A model whose samples lie at a sliced W_2 from the data close to this floor (at the same
    ``num_points`` and ``seed``-derived directions) is indistinguishable from the data at that size.
    Per repeat, two sampler seeds and one projection seed are drawn from ``SeedSequence(seed)``.
    """
    if num_points < 2:
        raise ValueError(f"num_points must be at least 2; got {num_points}")
    if num_repeats < 1:
        raise ValueError(f"num_repeats must be a positive integer; got {num_repeats}")
    seeds = np.random.SeedSequence(seed).generate_state(3 * num_repeats).reshape(num_repeats, 3)
    distances = [
        sliced_wasserstein_distance(
            sampler(int(seed_a), num_points),
            sampler(int(seed_b), num_points),
            num_projections=num_projections,
            seed=int(projection_seed),
        )
        for seed_a, seed_b, projection_seed in seeds
    ]
    return float(np.mean(distances))


# ---------------------------------------------------------------------------------------------
# Class coverage
# ---------------------------------------------------------------------------------------------


class ChiSquareResult(NamedTuple):
    """Pearson chi-square statistic and its p-value under the null hypothesis."""

    statistic: float
    p_value: float


def class_histogram(labels: ArrayLike, num_classes: int) -> np.ndarray:
    """Counts of each class in ``labels`` (integers in [0, num_classes)), shape (num_classes,)."""
    label_array = np.asarray(labels)
    if num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes}")
    if label_array.ndim != 1 or not np.issubdtype(label_array.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D integer array; got shape {label_array.shape}, "
            f"dtype {label_array.dtype}"
        )
    if label_array.size and (label_array.min() < 0 or label_array.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}); got range "
            f"[{label_array.min()}, {label_array.max()}]"
        )
    return np.bincount(label_array, minlength=num_classes)


def chi_square_to_uniform(counts: ArrayLike) -> ChiSquareResult:
    """Pearson chi-square of class counts against the uniform distribution, with its p-value.

    statistic = sum_k (O_k - E)^2 / E with E = n / K (Pearson 1900); under uniformity it follows
    chi^2 with K - 1 degrees of freedom, and the p-value is its survival function. Used to judge
    mode coverage of generated digits (Higham, Higham & Grindrod 2023, Fig. 4).
    """
    observed = np.asarray(counts, dtype=np.float64)
    if observed.ndim != 1 or observed.size < 2:
        raise ValueError(f"counts must be a 1-D array of >= 2 classes; got shape {observed.shape}")
    if np.any(observed < 0) or observed.sum() <= 0:
        raise ValueError(f"counts must be non-negative with a positive total; got {observed}")
    expected = observed.sum() / observed.size
    statistic = float(np.sum((observed - expected) ** 2) / expected)
    p_value = float(scipy.stats.chi2.sf(statistic, df=observed.size - 1))
    return ChiSquareResult(statistic=statistic, p_value=p_value)
