"""Where a training run's numbers and pictures go: JSONL, TensorBoard event files, PNG + .npz.

A ``MetricWriter`` owns one log directory:

    logdir/metrics.jsonl           one JSON object per line: {"step", "wall_time", name: value, ...}
    logdir/tensorboard/events.*    TensorBoard event files (tensorboardX; no TensorFlow needed)
    logdir/samples/NAME_STEP.png   image grids or 2-D scatter plots (written atomically)
    logdir/samples/NAME_STEP.npz   the raw samples behind each picture (written atomically)
    logdir/hparams.json            the run's hyperparameters (written atomically)

Kill tolerance. Each JSONL line is appended and flushed at once, so a kill loses at most the line
being written; ``read_scalars`` skips a truncated last line, and a new writer drops it before
appending. A run resumed from a checkpoint at step s passes ``purge_step=s + 1``: the JSONL lines of
the killed run from that step on are removed and TensorBoard is told to hide its events from that
step on (a SessionLog.START at ``purge_step``), so the logs read as one uninterrupted run.

In a multi-process run only one process (e.g. ``jax.process_index() == 0``) should write.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jax.typing import ArrayLike
from tensorboardX import SummaryWriter

from diffusion.images import save_image_grid, save_scatter_png, write_atomically

__all__ = ["METRICS_FILENAME", "MetricWriter", "read_scalars"]

# tensorboardX warns on every non-finite scalar; the JSONL record already flags them.
logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)

METRICS_FILENAME = "metrics.jsonl"
_TENSORBOARD_DIR = "tensorboard"
_SAMPLES_DIR = "samples"
_HPARAMS_FILENAME = "hparams.json"


def _parse_lines(text: str, path: str) -> list[dict[str, Any]]:
    """JSON records of a JSONL text; a last line without its newline that does not parse is a
    write cut short and is skipped; any other bad line raises ValueError."""
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # the text does not end in a newline: a truncated write
                break
            raise ValueError(f"{path}: line {number} is not valid JSON: {line[:80]!r}") from None
    return records


def read_scalars(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file in order, skipping a truncated last line.

    ``path`` is the file or the writer's log directory.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILENAME)
    with open(path, encoding="utf-8") as file:
        return _parse_lines(file.read(), path)


def _to_float(name: str, value: ArrayLike) -> float:
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"scalar {name!r} must have one element, got shape {array.shape}")
    return float(array.reshape(()))


class MetricWriter:
    """Writes scalars, image grids, point clouds and hyperparameters of one run under ``logdir``.

    ``purge_step``: when resuming at checkpoint step s, s + 1 (see the module docstring).
    ``tensorboard=False`` writes no event files.
    """

    def __init__(
        self,
        logdir: str | os.PathLike,
        *,
        purge_step: int | None = None,
        tensorboard: bool = True,
    ) -> None:
        if purge_step is not None and purge_step < 0:
            raise ValueError(f"purge_step must be >= 0 or None, got {purge_step!r}")
        self.logdir = os.path.abspath(os.fspath(logdir))
        os.makedirs(self.logdir, exist_ok=True)
        self.metrics_path = os.path.join(self.logdir, METRICS_FILENAME)
        self._clean_metrics_file(purge_step)
        self._metrics_file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        self._tensorboard = (
            SummaryWriter(os.path.join(self.logdir, _TENSORBOARD_DIR), purge_step=purge_step)
            if tensorboard
            else None
        )

    def _clean_metrics_file(self, purge_step: int | None) -> None:
        """Drop a truncated last line and, with ``purge_step``, the records from that step on."""
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path, encoding="utf-8") as file:
            text = file.read()
        records = _parse_lines(text, self.metrics_path)
        kept = [r for r in records if purge_step is None or r["step"] < purge_step]
        if len(kept) == len(records) and (not text or text.endswith("\n")):
            return
        content = "".join(json.dumps(record) + "\n" for record in kept).encode()
        write_atomically(self.metrics_path, lambda file: file.write(content))

    def write_scalars(self, step: int, scalars: Mapping[str, ArrayLike]) -> None:
        """Append {"step", "wall_time", **scalars} to the JSONL file (flushed) and add each scalar
        to TensorBoard under its name. Values are one-element arrays or numbers.

        The file stays strict JSON: a NaN or infinite value is written as ``null`` and its name
        listed under ``"nonfinite"`` (TensorBoard gets the value itself).
        """
        values = {name: _to_float(name, value) for name, value in scalars.items()}
        reserved = {"step", "wall_time", "nonfinite"} & values.keys()
        if reserved:
            raise ValueError(f"scalar names {sorted(reserved)} are reserved for the record")
        wall_time = time.time()
        nonfinite = sorted(name for name, value in values.items() if not math.isfinite(value))
        record = {
            "step": int(step),
            "wall_time": wall_time,
            **{name: None if name in nonfinite else value for name, value in values.items()},
        }
        if nonfinite:
            record["nonfinite"] = nonfinite
        self._metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
        self._metrics_file.flush()
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(name, value, int(step), walltime=wall_time)
            self._tensorboard.flush()

    def _sample_path(self, name: str, step: int, extension: str) -> str:
        return os.path.join(self.logdir, _SAMPLES_DIR, f"{name}_{int(step):08d}.{extension}")

    def _save_raw(self, name: str, step: int, samples: np.ndarray) -> str:
        path = self._sample_path(name, step, "npz")
        write_atomically(path, lambda file: np.savez(file, samples=samples))
        return path

    def write_images(
        self,
        step: int,
        name: str,
        images: ArrayLike,
        *,
        data_range: Sequence[float] = (-1.0, 1.0),
        num_columns: int | None = None,
    ) -> tuple[str, str]:
        """Write float images (N, H, W, C) in ``data_range`` as a PNG grid (also to TensorBoard)
        and as raw ``samples`` in an .npz; return the two paths."""
        samples = np.asarray(images)
        png_path = self._sample_path(name, step, "png")
        grid = save_image_grid(png_path, samples, data_range, num_columns=num_columns)
        npz_path = self._save_raw(name, step, samples)
        if self._tensorboard is not None:
            self._tensorboard.add_image(name, grid, int(step), dataformats="HWC")
            self._tensorboard.flush()
        return png_path, npz_path

    def write_points(
        self,
        step: int,
        name: str,
        points: ArrayLike,
        *,
        reference_points: ArrayLike | None = None,
        limits: tuple[float, float] | str | None = "auto",
    ) -> tuple[str, str]:
        """Write 2-D points (N, 2) as a scatter PNG (over ``reference_points`` in grey; axes as
        ``diffusion.images.save_scatter_png``'s ``limits``) and as raw ``samples`` in an .npz;
        return the two paths."""
        samples = np.asarray(points)
        png_path = self._sample_path(name, step, "png")
        save_scatter_png(
            png_path,
            samples,
            reference_points=reference_points,
            limits=limits,
            title=f"{name}, step {int(step)}",
        )
        return png_path, self._save_raw(name, step, samples)

    def write_hparams(self, hparams: Mapping[str, Any]) -> str:
        """Write the hyperparameters as ``hparams.json`` (values that are not JSON types as their
        ``str``) and as a TensorBoard text summary; return the JSON path."""
        text = json.dumps(dict(hparams), indent=2, sort_keys=True, default=str)
        path = os.path.join(self.logdir, _HPARAMS_FILENAME)
        write_atomically(path, lambda file: file.write(text.encode()))
        if self._tensorboard is not None:
            # Four-space indentation makes TensorBoard's markdown show the JSON as code.
            self._tensorboard.add_text("hparams", "    " + text.replace("\n", "\n    "), 0)
            self._tensorboard.flush()
        return path

    def flush(self) -> None:
        """Push everything written so far to the files."""
        self._metrics_file.flush()
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        """Flush and close the files."""
        self._metrics_file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
