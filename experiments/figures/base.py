"""What every figure shares: the registry, the context a figure runs in, and its outputs.

A figure is a function ``fn(context) -> record`` registered under a name with a one-line description.
It computes its numbers with the library (``diffusion.*``), draws them with matplotlib's Agg backend
(the object API, no pyplot state) and returns a JSON-able record:

    {"settings": {...}, "checks": [{"quantity", "measured", "exact", "tolerance", "passed"}, ...],
     "measurements": [{"quantity", "value"}, ...], "data": {...the numbers behind the plot...}}

Checks compare a number with its exact counterpart; measurements (a trained model's class
histogram, say) have none and are reported as they are.

``run_figure`` writes ``DIR/<name>.png`` and ``DIR/<name>.json`` (both atomically).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure

from diffusion.images import save_figure_png, write_atomically

__all__ = [
    "FIGURES",
    "Check",
    "Figure",
    "FigureContext",
    "bound_check",
    "check",
    "measurement",
    "new_figure",
    "register",
    "run_figure",
    "to_jsonable",
    "write_thumbnail",
]


@dataclasses.dataclass(frozen=True)
class FigureContext:
    """Where a figure writes and how big it is.

    ``quick`` shrinks every sample size and grid (a render test, or a first look); ``seed`` is the
    root of every PRNG key the figure draws; ``checkpoint_dir`` is a trained run's working directory
    (figures that need a trained model use it; without one they say what they use instead).
    """

    workdir: str
    quick: bool = False
    seed: int = 0
    checkpoint_dir: str | None = None

    def size(self, full: int, quick: int) -> int:
        """``quick`` in quick mode, else ``full``."""
        return quick if self.quick else full

    def key(self, purpose: int) -> jax.Array:
        """An independent PRNG key for one purpose of the figure (fold_in of the root key)."""
        return jax.random.fold_in(jax.random.PRNGKey(self.seed), purpose)

    def path(self, filename: str) -> str:
        return os.path.join(self.workdir, filename)


@dataclasses.dataclass(frozen=True)
class Figure:
    """A registered figure: ``fn(context) -> record``, a one-line description, and whether it runs
    in float64 (exact identities and convergence orders need it)."""

    name: str
    fn: Callable[[FigureContext], dict[str, Any]]
    description: str
    x64: bool = True


FIGURES: dict[str, Figure] = {}


def register(name: str, description: str, *, x64: bool = True):
    """Decorator: add ``fn`` to FIGURES under ``name`` (unique) with its one-line description."""

    def decorate(fn: Callable[[FigureContext], dict[str, Any]]):
        if name in FIGURES:
            raise ValueError(f"a figure named {name!r} is already registered")
        FIGURES[name] = Figure(name=name, fn=fn, description=description, x64=x64)
        return fn

    return decorate


# ------------------------------------------------------------------------------ checks
Check = dict[str, Any]


def check(
    quantity: str,
    measured: float,
    exact: float,
    tolerance: float,
    *,
    relative: bool = False,
    note: str = "",
) -> Check:
    """A measured number against its exact counterpart: passed if |measured - exact| <= tolerance
    (times |exact| when ``relative``). The tolerance is stated with the number, never hidden."""
    measured, exact = float(measured), float(exact)
    bound = tolerance * abs(exact) if relative else tolerance
    record = {
        "quantity": quantity,
        "measured": measured,
        "exact": exact,
        "tolerance": float(tolerance),
        "relative": relative,
        "passed": bool(abs(measured - exact) <= bound),
    }
    if note:
        record["note"] = note
    return record


def measurement(quantity: str, value: Any, *, note: str = "") -> dict[str, Any]:
    """A measured number with no exact counterpart (e.g. a trained model's class histogram)."""
    record = {"quantity": quantity, "value": value}
    if note:
        record["note"] = note
    return record


def bound_check(quantity: str, measured: float, upper: float, *, note: str = "") -> Check:
    """A measured number that must not exceed ``upper`` (a statistic against its critical value)."""
    record = {
        "quantity": quantity,
        "measured": float(measured),
        "upper": float(upper),
        "passed": bool(float(measured) <= float(upper)),
    }
    if note:
        record["note"] = note
    return record


# ------------------------------------------------------------------------------ output
def new_figure(num_columns: int, num_rows: int = 1, *, panel_inches: float = 3.2) -> MplFigure:
    """A matplotlib Figure (object API, Agg canvas) of num_rows x num_columns panels."""
    figure = MplFigure(
        figsize=(panel_inches * num_columns, 0.85 * panel_inches * num_rows), layout="constrained"
    )
    FigureCanvasAgg(figure)
    return figure


def to_jsonable(value: Any) -> Any:
    """Arrays and numpy scalars as lists and floats; NaN/inf as strings (JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, jax.Array | np.ndarray):
        return to_jsonable(np.asarray(value).tolist())
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer | int):
        return int(value)
    if isinstance(value, np.floating | float):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    return value


def iter_checks(record: dict[str, Any]) -> Iterator[Check]:
    yield from record.get("checks", [])


def run_figure(figure: Figure, context: FigureContext) -> dict[str, Any]:
    """Run one figure: DIR/<name>.png (written by the figure) and DIR/<name>.json; return the record."""
    os.makedirs(context.workdir, exist_ok=True)
    start = time.perf_counter()
    with jax.enable_x64(figure.x64):
        record = figure.fn(context)
    record = {
        "figure": figure.name,
        "description": figure.description,
        "quick": context.quick,
        "seed": context.seed,
        **record,
        "seconds": time.perf_counter() - start,
        "png": context.path(f"{figure.name}.png"),
    }
    text = json.dumps(to_jsonable(record), indent=2).encode()
    write_atomically(context.path(f"{figure.name}.json"), lambda file: file.write(text))
    return record


def write_thumbnail(
    png_path: str, thumbnail_path: str, width: int = 480, colours: int = 64
) -> None:
    """A small copy of a figure for a README grid: ``width`` pixels wide, a ``colours``-colour
    palette (a few tens of kB per figure)."""
    from PIL import Image

    with Image.open(png_path) as picture:
        picture = picture.convert("RGB")
        height = max(1, round(picture.height * width / picture.width))
        small = picture.resize((width, height), Image.Resampling.LANCZOS)
    small = small.quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
    write_atomically(thumbnail_path, lambda file: small.save(file, format="PNG", optimize=True))


def save(figure: MplFigure, context: FigureContext, name: str, dpi: int = 100) -> str:
    """Write the matplotlib figure as DIR/<name>.png; return the path."""
    path = context.path(f"{name}.png")
    save_figure_png(path, figure, dpi=dpi)
    return path
