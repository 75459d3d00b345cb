"""Tests for diffusion.images: uint8 conversion, grid layout and atomic PNG writing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffusion import data, images


@pytest.mark.parametrize("data_range", [(-1.0, 1.0), (0.0, 1.0)])
def test_to_uint8_inverts_the_scaling_exactly(data_range):
    pixels = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
    np.testing.assert_array_equal(
        images.to_uint8(data.uint8_to_float(pixels, data_range), data_range), pixels
    )
    # Out-of-range samples are clipped to the end points.
    lo, hi = data_range
    clipped = images.to_uint8(np.array([lo - 5.0, hi + 0.3, np.float32(hi)]), data_range)
    np.testing.assert_array_equal(clipped, [0, 255, 255])


def test_to_uint8_maps_dequantized_pixels_within_one_level():
    pixels = np.repeat(np.arange(256, dtype=np.uint8), 16).reshape(16, 16, 16, 1)
    noise = np.random.default_rng(0).random(pixels.shape, dtype=np.float32)
    restored = images.to_uint8(data.uint8_to_float(pixels, (-1.0, 1.0), noise)).astype(int)
    assert np.abs(restored - pixels.astype(int)).max() == 1


@pytest.mark.parametrize("channels", [1, 3])
def test_make_grid_places_image_k_at_its_offset(channels):
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 200, size=(7, 5, 4, channels), dtype=np.uint8)
    grid = images.make_grid(tiles, num_columns=3, padding=2, pad_value=255)
    # 3 rows of (5 + 2) plus 2, 3 columns of (4 + 2) plus 2.
    assert grid.shape == (23, 20, channels) and grid.dtype == np.uint8
    covered = np.zeros(grid.shape[:2], dtype=bool)
    for index in range(7):
        row, column = index // 3, index % 3
        top, left = 2 + 7 * row, 2 + 6 * column
        np.testing.assert_array_equal(grid[top : top + 5, left : left + 4], tiles[index])
        covered[top : top + 5, left : left + 4] = True
    # Everything else (padding and the two empty slots of the last row) holds pad_value.
    assert np.all(grid[~covered] == 255)


def test_make_grid_defaults_to_a_near_square_layout():
    tiles = np.zeros((10, 3, 3, 1), dtype=np.uint8)
    # ceil(sqrt(10)) = 4 columns, so 3 rows.
    assert images.make_grid(tiles, padding=1).shape == (3 * 4 + 1, 4 * 4 + 1, 1)
    assert images.make_grid(tiles[:1], padding=0).shape == (3, 3, 1)


def test_make_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        images.make_grid(np.zeros((2, 3, 3, 1), dtype=np.float32))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        images.make_grid(np.zeros((2, 3, 3, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="pad_value"):
        images.make_grid(np.zeros((2, 3, 3, 1), dtype=np.uint8), pad_value=300)


@pytest.mark.parametrize(("channels", "mode"), [(1, "L"), (3, "RGB")])
def test_save_image_grid_writes_a_readable_png(tmp_path, channels, mode):
    samples = np.random.default_rng(1).uniform(-1.0, 1.0, size=(6, 8, 7, channels))
    path = tmp_path / "nested" / "dir" / "grid.png"
    grid = images.save_image_grid(path, samples, (-1.0, 1.0), num_columns=3, padding=1, scale=1)
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.mode == mode
        assert picture.size == (3 * (7 + 1) + 1, 2 * (8 + 1) + 1)  # (width, height)
        pixels = np.asarray(picture)
    np.testing.assert_array_equal(pixels.reshape(grid.shape), grid)
    np.testing.assert_array_equal(grid[1:9, 1:8], images.to_uint8(samples[0]))
    assert sorted(entry.name for entry in path.parent.iterdir()) == ["grid.png"]


def test_small_images_are_enlarged_pixel_by_pixel(tmp_path):
    samples = np.random.default_rng(2).uniform(-1.0, 1.0, size=(4, 8, 8, 1))
    grid = images.save_image_grid(tmp_path / "g.png", samples, num_columns=2, padding=0)
    assert grid.shape == (2 * 64, 2 * 64, 1)  # 8 pixels -> 64 by default
    np.testing.assert_array_equal(
        grid[:8, :8, 0], np.full((8, 8), images.to_uint8(samples[0])[0, 0, 0])
    )
    np.testing.assert_array_equal(grid[::8, ::8][:8, :8], images.to_uint8(samples[0]))
    big = images.save_image_grid(tmp_path / "b.png", samples, num_columns=2, padding=0, scale=3)
    assert big.shape == (48, 48, 1)
    with pytest.raises(ValueError, match="scale"):
        images.save_image_grid(tmp_path / "c.png", samples, scale=0)


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "picture.png"
    first = np.full((4, 4, 3), 10, dtype=np.uint8)
    images.save_png(path, first)

    def fail_midway(file):
        file.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        images.write_atomically(path, fail_midway)
    with Image.open(path) as picture:
        np.testing.assert_array_equal(np.asarray(picture), first)
    assert [entry.name for entry in tmp_path.iterdir()] == ["picture.png"]


def test_save_scatter_png_draws_the_points(tmp_path):
    points = data.toy_batch("two_moons", step=0, batch_size=500, seed=0)
    path = tmp_path / "plots" / "samples.png"
    images.save_scatter_png(path, points, size_inches=3.0, dpi=50, marker_size=4.0)
    with Image.open(path) as picture:
        assert picture.size == (150, 150)
        pixels = np.asarray(picture.convert("RGB")).astype(int)
    # Markers are matplotlib's tab:blue (31, 119, 180); nothing else in the plot is that colour.
    is_blue = np.all(np.abs(pixels - [31, 119, 180]) < 30, axis=-1)
    assert is_blue.sum() > 100
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        images.save_scatter_png(path, np.zeros((5, 3)))


def _pixels(path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB")).astype(int)


def _count_colour(pixels: np.ndarray, rgb, tolerance: int = 30) -> int:
    return int(np.all(np.abs(pixels - list(rgb)) < tolerance, axis=-1).sum())


BLUE, GREY, RED = (31, 119, 180), (178, 178, 178), (214, 39, 40)


def test_an_early_snapshot_far_from_the_target_is_framed_with_the_target(tmp_path):
    # An untrained model's samples: a cloud of std 30 around a ring of radius 2 (the target).
    rng = np.random.default_rng(0)
    samples = 30.0 * rng.normal(size=(2000, 2))
    angles = rng.uniform(0, 2 * np.pi, 500)
    target = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    # The old fixed frame [-4, 4]^2 holds almost none of them: now counted and pinned in red.
    fixed = tmp_path / "fixed.png"
    outside = images.save_scatter_png(
        fixed, samples, reference_points=target, limits=(-4.0, 4.0), marker_size=4.0
    )
    assert outside == int(np.sum(np.any(np.abs(samples) > 4.0, axis=1))) > 1900
    assert _count_colour(_pixels(fixed), RED) > 100
    # The default frame scales to the data: every sample drawn in blue, the target in grey.
    auto = tmp_path / "auto.png"
    assert images.save_scatter_png(auto, samples, reference_points=target, marker_size=4.0) == 0
    pixels = _pixels(auto)
    assert _count_colour(pixels, BLUE) > 1000
    assert _count_colour(pixels, GREY, tolerance=12) > 20
    assert _count_colour(pixels, RED) == 0


def test_scatter_limits_hold_the_target_and_ignore_a_lone_outlier():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(1000, 2))
    lo, hi = images.scatter_limits(points)
    assert lo <= points.min() and hi >= points.max()  # a compact cloud is framed whole
    with_outlier = np.concatenate([points, [[1e4, -1e4]]])
    lo, hi = images.scatter_limits(with_outlier)
    assert -10 < lo < -2 and 2 < hi < 10  # the outlier does not shrink the cloud to a dot
    reference = np.array([[50.0, 0.0], [0.0, -60.0]])
    lo, hi = images.scatter_limits(with_outlier, reference)
    assert lo < -60 and hi > 50


def test_save_scatter_png_rejects_bad_limits(tmp_path):
    with pytest.raises(ValueError, match="limits"):
        images.save_scatter_png(tmp_path / "a.png", np.zeros((3, 2)), limits="tight")
    with pytest.raises(ValueError, match="lo < hi"):
        images.save_scatter_png(tmp_path / "a.png", np.zeros((3, 2)), limits=(1.0, -1.0))


def test_save_figure_png_writes_a_matplotlib_figure(tmp_path):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2, 1))
    figure.add_subplot().plot([0, 1], [0, 1])
    path = tmp_path / "sub" / "line.png"
    images.save_figure_png(path, figure, dpi=50)
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size == (100, 50)
    assert [entry.name for entry in path.parent.iterdir()] == ["line.png"]
