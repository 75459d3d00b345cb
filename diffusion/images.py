"""Turning samples into pictures: uint8 conversion, image grids, PNG files and 2-D scatter plots.

Scatter plots frame the data they are given: by default the axes hold the target (reference points)
and the central 99% of the samples, and samples outside the frame are drawn pinned to its border and
counted in the title, so a plot is never an empty frame.

Files are written atomically: into a temporary file in the destination directory, then moved over
the destination with ``os.replace``, so a reader never sees a half-written PNG.
"""

from __future__ import annotations

import contextlib
import math
import os
import uuid
from collections.abc import Callable, Sequence
from typing import BinaryIO

import numpy as np
from jax.typing import ArrayLike
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from diffusion.data import check_data_range

__all__ = [
    "make_grid",
    "save_figure_png",
    "save_image_grid",
    "save_png",
    "save_scatter_png",
    "scatter_limits",
    "to_uint8",
    "write_atomically",
]


def to_uint8(images: ArrayLike, data_range: Sequence[float] = (-1.0, 1.0)) -> np.ndarray:
    """Map floats in data_range = (lo, hi) to uint8: round(255 (x - lo) / (hi - lo)), clipped to
    [0, 255].

    The exact inverse of ``diffusion.data.uint8_to_float`` without dequantisation; a dequantised
    pixel x maps back to x - 1, x or x + 1 (255 (x + u) / 256 is within 1/2 + x/256 of x).
    """
    lo, hi = check_data_range(data_range)
    unit = (np.asarray(images, dtype=np.float32) - lo) / (hi - lo)
    return np.clip(np.rint(unit * 255), 0, 255).astype(np.uint8)


def make_grid(
    images: np.ndarray,
    *,
    num_columns: int | None = None,
    padding: int = 2,
    pad_value: int = 0,
) -> np.ndarray:
    """Tile uint8 images (N, H, W, C), C = 1 or 3, into one (rows (H + p) + p, cols (W + p) + p, C)
    uint8 image.

    Image k sits in row k // num_columns, column k % num_columns, with its top-left pixel at
    (p + row (H + p), p + column (W + p)) for padding p; slots after the last image in the last row,
    and the padding, hold ``pad_value``. ``num_columns`` defaults to ceil(sqrt(N)).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"images must be (N, H, W, C) uint8 with C = 1 or 3, got {images.shape} {images.dtype}"
        )
    num_images, height, width, channels = images.shape
    if num_images == 0:
        raise ValueError("images is empty: need at least one image for a grid")
    if num_columns is None:
        num_columns = math.ceil(math.sqrt(num_images))
    if num_columns < 1 or padding < 0 or not 0 <= pad_value <= 255:
        raise ValueError(
            f"need num_columns >= 1, padding >= 0 and 0 <= pad_value <= 255, got {num_columns}, "
            f"{padding} and {pad_value}"
        )
    num_rows = math.ceil(num_images / num_columns)
    grid = np.full(
        (
            num_rows * (height + padding) + padding,
            num_columns * (width + padding) + padding,
            channels,
        ),
        pad_value,
        dtype=np.uint8,
    )
    for index, image in enumerate(images):
        row, column = divmod(index, num_columns)
        top = padding + row * (height + padding)
        left = padding + column * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Create the parent directories, ``write`` a temporary file next to ``path``, move it there."""
    path = os.fspath(path)
    directory, filename = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary_path = os.path.join(directory, f".{filename}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary_path, "xb") as file:
            write(file)
        os.replace(temporary_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary_path)
        raise


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write one uint8 image, (H, W), (H, W, 1) (grayscale) or (H, W, 3) (RGB), as a PNG file."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3))
    ):
        raise ValueError(
            f"image must be (H, W), (H, W, 1) or (H, W, 3) uint8, got {image.shape} {image.dtype}"
        )
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    picture = Image.fromarray(image)
    write_atomically(path, lambda file: picture.save(file, format="PNG"))


def save_image_grid(
    path: str | os.PathLike,
    images: ArrayLike,
    data_range: Sequence[float] = (-1.0, 1.0),
    *,
    num_columns: int | None = None,
    padding: int = 2,
    pad_value: int = 0,
    scale: int | None = None,
) -> np.ndarray:
    """Write float images (N, H, W, C) in ``data_range`` as one PNG grid; return the uint8 grid.

    ``to_uint8``, each pixel repeated ``scale`` times along both axes (nearest neighbour; None:
    ``max(1, 64 // max(H, W))``, so 8x8 digits are drawn 64 pixels wide and 28x28 ones 56), then
    ``make_grid`` (see both for the mapping and the layout) and ``save_png``.
    """
    pixels = to_uint8(images, data_range)
    if scale is None:
        scale = max(1, 64 // max(pixels.shape[1:3]))
    if not (isinstance(scale, int) and scale >= 1):
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    grid = make_grid(pixels, num_columns=num_columns, padding=padding, pad_value=pad_value)
    save_png(path, grid)
    return grid


def save_figure_png(path: str | os.PathLike, figure: Figure, *, dpi: int = 100) -> None:
    """Write a matplotlib ``Figure`` (object API; given an Agg canvas if it has none) as a PNG."""
    if not isinstance(figure.canvas, FigureCanvasAgg):
        FigureCanvasAgg(figure)
    write_atomically(path, lambda file: figure.savefig(file, format="png", dpi=dpi))


def scatter_limits(
    points: ArrayLike,
    reference_points: ArrayLike | None = None,
    *,
    coverage: float = 0.99,
    margin: float = 0.05,
) -> tuple[float, float]:
    """A square frame (lo, hi) for both axes of a scatter plot of ``points`` over a target.

    The frame holds every reference point and every point, unless a few far points would shrink the
    rest to a dot: when the points' full range is more than twice the range of their central
    ``coverage`` (quantiles (1 - coverage)/2 and (1 + coverage)/2 on each axis), only the central
    part is framed. The frame is widened by ``margin`` of its width on both sides.
    """
    samples = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    samples = samples[np.all(np.isfinite(samples), axis=1)]
    boxes = []
    if len(samples):
        tail = (1.0 - coverage) / 2.0
        central = np.quantile(samples, [tail, 1.0 - tail], axis=0)
        full = np.stack([samples.min(axis=0), samples.max(axis=0)])
        central_width = float(np.max(central[1] - central[0]))
        full_width = float(np.max(full[1] - full[0]))
        boxes.append(full if full_width <= 2.0 * central_width else central)
    if reference_points is not None and len(reference_points):
        reference = np.asarray(reference_points, dtype=np.float64).reshape(-1, 2)
        boxes.append(np.stack([reference.min(axis=0), reference.max(axis=0)]))
    if not boxes:
        return (-1.0, 1.0)
    lo = min(float(box[0].min()) for box in boxes)
    hi = max(float(box[1].max()) for box in boxes)
    half_width = max(0.5 * (hi - lo) * (1.0 + 2.0 * margin), 1e-6)
    center = 0.5 * (lo + hi)
    return (center - half_width, center + half_width)


def save_scatter_png(
    path: str | os.PathLike,
    points: ArrayLike,
    *,
    reference_points: ArrayLike | None = None,
    limits: tuple[float, float] | str | None = "auto",
    title: str | None = None,
    size_inches: float = 4.0,
    dpi: int = 100,
    marker_size: float = 1.0,
) -> int:
    """Write a scatter plot of 2-D points (N, 2) as a PNG of size_inches * dpi pixels square.

    ``reference_points`` (M, 2), the target (e.g. data samples), are drawn first in grey under
    ``points``. ``limits`` sets both axes: 'auto' (default) is ``scatter_limits`` (the target and
    the central 99% of the points), a (lo, hi) pair is fixed, None is matplotlib's automatic choice.
    Points outside a frame are drawn on its border in red and counted in the title. Returns that
    count.
    """
    point_sets = {"points": points, "reference_points": reference_points}
    for name, values in point_sets.items():
        if values is not None and (np.ndim(values) != 2 or np.shape(values)[1] != 2):
            raise ValueError(f"{name} must have shape (N, 2), got {np.shape(values)}")
    if isinstance(limits, str) and limits != "auto":
        raise ValueError(f"limits must be 'auto', None or a (lo, hi) pair, got {limits!r}")
    samples = np.asarray(points, dtype=np.float64)
    if limits == "auto":
        limits = scatter_limits(samples, reference_points)
    figure = Figure(figsize=(size_inches, size_inches), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if reference_points is not None:
        reference = np.asarray(reference_points)
        axes.scatter(
            reference[:, 0], reference[:, 1], s=marker_size, c="0.7", linewidths=0, label="target"
        )
    num_outside = 0
    if limits is not None:
        lo, hi = float(limits[0]), float(limits[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"limits must be a finite (lo, hi) pair with lo < hi, got {limits!r}")
        outside = np.any((samples < lo) | (samples > hi) | ~np.isfinite(samples), axis=1)
        num_outside = int(outside.sum())
        inside_points = samples[~outside]
        pinned = np.clip(np.nan_to_num(samples[outside], nan=lo, posinf=hi, neginf=lo), lo, hi)
        axes.scatter(
            inside_points[:, 0],
            inside_points[:, 1],
            s=marker_size,
            c="tab:blue",
            linewidths=0,
            label="samples",
        )
        if num_outside:
            axes.scatter(
                pinned[:, 0],
                pinned[:, 1],
                s=4 * marker_size,
                c="tab:red",
                marker="x",
                linewidths=0.5,
                clip_on=False,
                label="outside the frame",
            )
        axes.set_xlim(limits)
        axes.set_ylim(limits)
    else:
        axes.scatter(samples[:, 0], samples[:, 1], s=marker_size, c="tab:blue", linewidths=0)
    axes.set_aspect("equal")
    full_title = title or ""
    if num_outside:
        full_title += (
            f"{chr(10) if full_title else ''}{num_outside} of {len(samples)} outside the frame"
        )
    if full_title:
        axes.set_title(full_title, fontsize=9)
    if reference_points is not None:
        axes.legend(loc="upper right", fontsize=7, markerscale=3.0)
    write_atomically(path, lambda file: figure.savefig(file, format="png", dpi=dpi))
    return num_outside
