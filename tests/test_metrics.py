"""Tests of diffusion.metrics against closed forms, SciPy and direct (loop) computations."""

import collections

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from diffusion import metrics


def _random_psd(rng: np.random.Generator, dim: int, rank: int) -> np.ndarray:
    """A random symmetric PSD matrix of the given rank (B B^T with B of shape (dim, rank))."""
    factor = rng.standard_normal((dim, rank))
    return factor @ factor.T


def _random_rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A random orthogonal matrix (Q of the QR decomposition of a Gaussian matrix)."""
    orthogonal, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return orthogonal


def _frechet_distance_scipy(mean_a, covariance_a, mean_b, covariance_b) -> float:
    """FID as written in Heusel et al. 2017, with scipy.linalg.sqrtm of the product S_a S_b."""
    product_sqrt = np.real(scipy.linalg.sqrtm(covariance_a @ covariance_b))
    return float(
        np.sum((mean_a - mean_b) ** 2)
        + np.trace(covariance_a)
        + np.trace(covariance_b)
        - 2 * np.trace(product_sqrt)
    )


# --- matrix square root --------------------------------------------------------------------------


@pytest.mark.parametrize(("dim", "rank"), [(6, 6), (8, 3), (5, 1)])
def test_psd_sqrtm_is_the_symmetric_psd_root_of_its_closed_form(dim, rank):
    """M = Q diag(w) Q^T with known eigenvalues w (dim - rank of them zero): its PSD square root
    is Q diag(sqrt w) Q^T, the unique symmetric PSD R with R R = M. A singular M has other roots
    (scipy.linalg.sqrtm may return a non-symmetric one), so the definition is what is checked."""
    rng = np.random.default_rng(dim * 10 + rank)
    eigenvalues = np.concatenate([rng.uniform(0.5, 3.0, rank), np.zeros(dim - rank)])
    rotation = _random_rotation(rng, dim)
    matrix = rotation @ np.diag(eigenvalues) @ rotation.T
    matrix = 0.5 * (matrix + matrix.T)
    root = metrics.psd_sqrtm(matrix)
    scale = np.linalg.norm(matrix)
    np.testing.assert_allclose(root @ root, matrix, atol=1e-10 * scale)
    np.testing.assert_array_equal(root, root.T)
    assert np.linalg.eigvalsh(root).min() > -1e-7 * np.sqrt(scale)
    expected = rotation @ np.diag(np.sqrt(eigenvalues)) @ rotation.T
    # A zero eigenvalue perturbed by round-off eps has a root ~ sqrt(eps): hence the looser tol.
    np.testing.assert_allclose(
        root, expected, atol=(1e-12 if rank == dim else 1e-7) * np.sqrt(scale)
    )


def test_psd_sqrtm_agrees_with_scipy_where_the_root_is_unique():
    """A positive definite matrix has one principal square root: scipy's Schur method finds it."""
    matrix = _random_psd(np.random.default_rng(7), 6, 6) + 0.1 * np.eye(6)
    np.testing.assert_allclose(
        metrics.psd_sqrtm(matrix),
        np.real(scipy.linalg.sqrtm(matrix)),
        atol=1e-10 * np.linalg.norm(matrix),
    )


def test_psd_sqrtm_rejects_non_symmetric_and_non_square():
    with pytest.raises(ValueError, match="symmetric"):
        metrics.psd_sqrtm(np.array([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        metrics.psd_sqrtm(np.ones((2, 3)))


# --- Fréchet distance ----------------------------------------------------------------------------


@pytest.mark.parametrize("rotate", [False, True])
def test_frechet_distance_commuting_covariances_closed_form(rotate):
    # Covariances Q diag(a) Q^T and Q diag(b) Q^T commute: FD = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    # Zeros in a and b make both covariances singular.
    rng = np.random.default_rng(1)
    dim = 6
    variances_a = np.array([1.0, 0.0, 0.0, 2.0, 0.3, 5.0])
    variances_b = np.array([0.0, 0.0, 3.0, 2.0, 1.7, 0.2])
    rotation = _random_rotation(rng, dim) if rotate else np.eye(dim)
    covariance_a = rotation @ np.diag(variances_a) @ rotation.T
    covariance_b = rotation @ np.diag(variances_b) @ rotation.T
    mean_a, mean_b = rng.standard_normal(dim), rng.standard_normal(dim)
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum(
        (np.sqrt(variances_a) - np.sqrt(variances_b)) ** 2
    )
    distance = metrics.frechet_distance(mean_a, covariance_a, mean_b, covariance_b)
    # Round-off eps in a zero eigenvalue becomes sqrt(eps) ~ 1e-8 in its square root.
    np.testing.assert_allclose(distance, expected, rtol=1e-10, atol=1e-7 if rotate else 0.0)


def test_frechet_distance_matches_scipy_formula_and_is_symmetric():
    rng = np.random.default_rng(2)
    dim = 12
    covariance_a = _random_psd(rng, dim, dim) + 0.1 * np.eye(dim)
    covariance_b = _random_psd(rng, dim, dim) + 0.1 * np.eye(dim)
    mean_a, mean_b = rng.standard_normal(dim), rng.standard_normal(dim)
    distance = metrics.frechet_distance(mean_a, covariance_a, mean_b, covariance_b)
    expected = _frechet_distance_scipy(mean_a, covariance_a, mean_b, covariance_b)
    np.testing.assert_allclose(distance, expected, rtol=1e-9)
    swapped = metrics.frechet_distance(mean_b, covariance_b, mean_a, covariance_a)
    np.testing.assert_allclose(swapped, distance, rtol=1e-10)


def test_frechet_distance_zero_for_identical_singular_statistics():
    # 10 samples in 32 dimensions: a rank-9 covariance; sqrtm(S S) of SciPy is unreliable here.
    features = np.random.default_rng(3).standard_normal((10, 32))
    stats = metrics.feature_statistics(features)
    distance = metrics.frechet_distance(stats.mean, stats.covariance, stats.mean, stats.covariance)
    assert 0.0 <= distance < 1e-9 * np.trace(stats.covariance)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mean_b"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3))
    with pytest.raises(ValueError, match="covariance_b"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


# --- streaming statistics ------------------------------------------------------------------------


def test_streaming_statistics_match_numpy_on_concatenated_batches():
    rng = np.random.default_rng(4)
    # A large common offset would ruin the naive E[x x^T] - mu mu^T form.
    batches = [1e4 + rng.standard_normal((size, 5)) * [1, 2, 3, 4, 5] for size in (7, 1, 50, 0, 13)]
    moments = metrics.FeatureMoments.empty(5)
    for batch in batches:
        moments = metrics.update_moments(moments, batch)
    stats = metrics.finalize_moments(moments)
    everything = np.concatenate(batches)
    assert stats.count == everything.shape[0]
    np.testing.assert_allclose(stats.mean, everything.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(stats.covariance, np.cov(everything, rowvar=False), rtol=1e-9)
    one_shot = metrics.feature_statistics(everything)
    np.testing.assert_allclose(one_shot.covariance, stats.covariance, rtol=1e-9)


def test_streaming_statistics_reject_bad_input():
    moments = metrics.FeatureMoments.empty(3)
    with pytest.raises(ValueError, match="dim 3"):
        metrics.update_moments(moments, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.finalize_moments(metrics.update_moments(moments, np.zeros((1, 3))))


# --- KID -----------------------------------------------------------------------------------------


def test_mmd2_unbiased_matches_double_loop():
    rng = np.random.default_rng(5)
    points_x, points_y = rng.standard_normal((5, 3)), 0.5 + rng.standard_normal((4, 3))

    def kernel(u, v):  # Bińkowski et al. 2018: (u.v / d + 1)^3
        return (sum(ui * vi for ui, vi in zip(u, v, strict=True)) / 3 + 1) ** 3

    m, n = len(points_x), len(points_y)
    within_x = sum(kernel(points_x[i], points_x[j]) for i in range(m) for j in range(m) if i != j)
    within_y = sum(kernel(points_y[i], points_y[j]) for i in range(n) for j in range(n) if i != j)
    cross = sum(kernel(points_x[i], points_y[j]) for i in range(m) for j in range(n))
    expected = within_x / (m * (m - 1)) + within_y / (n * (n - 1)) - 2 * cross / (m * n)
    np.testing.assert_allclose(metrics.mmd2_unbiased(points_x, points_y), expected, rtol=1e-12)


def test_kid_near_zero_for_same_distribution_and_positive_for_shifted():
    rng = np.random.default_rng(6)
    reference = rng.standard_normal((1000, 16))
    same = rng.standard_normal((1000, 16))
    shifted = 0.3 + rng.standard_normal((1000, 16))
    kid_same, std_same = metrics.kernel_inception_distance(
        reference, same, subset_size=200, num_subsets=20, seed=0
    )
    kid_shifted, std_shifted = metrics.kernel_inception_distance(
        reference, shifted, subset_size=200, num_subsets=20, seed=0
    )
    assert abs(kid_same) < std_same
    assert kid_shifted > 3 * std_shifted
    assert kid_shifted > 10 * abs(kid_same)


def test_kid_rejects_subset_larger_than_data():
    with pytest.raises(ValueError, match="subset_size"):
        metrics.kernel_inception_distance(np.zeros((10, 2)), np.zeros((20, 2)), subset_size=11)


# --- sliced Wasserstein --------------------------------------------------------------------------


def test_sliced_w2_of_translated_gaussians_matches_closed_form():
    # N(0, I) vs N(m, I) in d = 2: each projection is a 1-D translation by theta.m, so
    # SW_2^2 = E_theta[(theta.m)^2] = |m|^2 / d. The samples are re-centred to their exact means so
    # that what is left is the Monte-Carlo error over directions (std ~1%, measured over 30 seeds)
    # plus the small positive two-sample bias (~0.3%).
    rng = np.random.default_rng(7)
    shift = 2.0 * np.array([np.cos(0.5), np.sin(0.5)])
    noise_a, noise_b = rng.standard_normal((2, 2000, 2))
    points_a = noise_a - noise_a.mean(axis=0)
    points_b = shift + noise_b - noise_b.mean(axis=0)
    distance = metrics.sliced_wasserstein_distance(points_a, points_b, num_projections=4000, seed=0)
    np.testing.assert_allclose(distance**2, np.sum(shift**2) / 2, rtol=0.04)


def test_sliced_w2_flattens_images_and_rejects_unequal_sizes():
    images = np.random.default_rng(8).standard_normal((6, 2, 2, 1))
    assert metrics.sliced_wasserstein_distance(images, images) == 0.0
    with pytest.raises(ValueError, match="same number of points"):
        metrics.sliced_wasserstein_distance(np.zeros((5, 2)), np.zeros((6, 2)))


def test_sliced_w2_noise_floor_shrinks_with_sample_size():
    def gaussian_sampler(seed: int, num_points: int) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal((num_points, 4))

    floor_small = metrics.sliced_wasserstein_noise_floor(gaussian_sampler, 100, num_repeats=4)
    floor_large = metrics.sliced_wasserstein_noise_floor(gaussian_sampler, 1600, num_repeats=4)
    # The two-sample SW_2 decays roughly like n^{-1/2}: a factor ~4 from 100 to 1600 points.
    assert 0.0 < floor_large < 0.5 * floor_small


# --- class coverage ------------------------------------------------------------------------------


def test_class_histogram_and_chi_square_match_counter_and_scipy():
    labels = np.random.default_rng(9).choice(10, size=500, p=np.linspace(1, 2, 10) / 15)
    counts = metrics.class_histogram(labels, 10)
    counter = collections.Counter(labels.tolist())
    np.testing.assert_array_equal(counts, [counter[k] for k in range(10)])
    result = metrics.chi_square_to_uniform(counts)
    reference = scipy.stats.chisquare(counts)
    np.testing.assert_allclose(result.statistic, reference.statistic, rtol=1e-12)
    np.testing.assert_allclose(result.p_value, reference.pvalue, rtol=1e-10)


def test_chi_square_is_zero_for_perfectly_uniform_counts():
    result = metrics.chi_square_to_uniform(np.full(10, 50))
    assert result.statistic == 0.0
    assert result.p_value == 1.0


def test_class_histogram_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        metrics.class_histogram(np.array([0, 3, 10]), 10)
