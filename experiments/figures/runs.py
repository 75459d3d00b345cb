"""A trained run (a working directory of experiments.run) as the figures need it.

``load_run`` rebuilds the run's experiment from DIR/config.json and restores its EMA parameters;
``Run`` exposes the few things the figures use (the denoiser with those parameters, the data, the
configured sampler's options), so that this file alone knows how ``experiments.build.Experiment``
is laid out.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from diffusion import data
from diffusion.parameterization import Denoiser
from diffusion.processes import Process
from experiments.build import Experiment, build
from experiments.configs import base
from experiments.workdir import restore_ema_params

__all__ = ["Run", "load_run"]


@dataclasses.dataclass(frozen=True)
class Run:
    """A restored run: its experiment, checkpoint step and EMA parameters."""

    directory: str
    experiment: Experiment
    step: int
    params: Any

    @property
    def process(self) -> Process:
        return self.experiment.process

    @property
    def denoiser(self) -> Denoiser:
        """The network with the EMA parameters, as a denoiser of the run's process."""
        return self.experiment.denoiser.replace(params=self.params)

    @property
    def dataset(self) -> str:
        return self.experiment.data.dataset

    @property
    def is_toy(self) -> bool:
        return bool(self.experiment.is_toy)

    @property
    def data_range(self) -> tuple[float, float]:
        return tuple(self.experiment.data_range)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.experiment.data_shape)

    def sampler_options(self, method: str) -> dict[str, Any]:
        """The run's configured options of sampler ``method``."""
        return self.experiment.sampling.options_of(method)

    def images(self, split: str) -> tuple[np.ndarray, np.ndarray, int]:
        """(images as floats in the run's data range, labels, number of classes) of a split."""
        dataset = self.experiment.load_split(split)
        return (
            data.uint8_to_float(dataset.images, self.data_range),
            dataset.labels,
            dataset.num_classes,
        )

    def sample(self, key: jax.Array, num: int) -> np.ndarray:
        """``num`` samples with the run's configured sampler."""
        return np.asarray(self.experiment.sample(self.params, key, num).samples)


def _merge(config: ml_collections.ConfigDict, recorded: dict[str, Any]) -> None:
    """Write the recorded values into ``config``, section by section (tuples stay tuples)."""
    for key, value in recorded.items():
        if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
            _merge(config[key], value)
        elif isinstance(value, list) and isinstance(config.get(key), tuple):
            config[key] = tuple(value)
        else:
            config[key] = value


def load_run(run_dir: str, step: int | None = None, overrides: dict[str, Any] | None = None) -> Run:
    """The run in ``run_dir``: its config.json (with ``overrides``, dotted keys such as
    'eval.classifier_steps', applied) rebuilt with experiments.build, and its latest (or given)
    checkpoint. FileNotFoundError naming what is missing otherwise."""
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(
            f"{config_path} does not exist: --checkpoint_dir must be the --workdir of a training "
            "run (python -m experiments.run --config=NAME --workdir=DIR)"
        )
    with open(config_path) as file:
        recorded = json.load(file)
    # The recorded values over today's base config: keys added since the run keep their defaults.
    config = base.get_base_config()
    _merge(config, recorded)
    for dotted_key, value in (overrides or {}).items():
        section, _, key = dotted_key.rpartition(".")
        (config[section] if section else config)[key] = value
    experiment = build(config)
    step, params = restore_ema_params(experiment, run_dir, step)
    return Run(directory=run_dir, experiment=experiment, step=step, params=params)
