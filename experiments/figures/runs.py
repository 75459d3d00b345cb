"""Loading a trained run (a working directory of experiments.run) for the figures that use one."""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from experiments.build import Experiment, build
from experiments.workdir import restore_ema_params

__all__ = ["load_run"]


def load_run(
    run_dir: str, step: int | None = None, overrides: dict[str, Any] | None = None
) -> tuple[Experiment, int, Any]:
    """(experiment, step, EMA params) of the run in ``run_dir``: its config.json (with
    ``overrides``, dotted keys such as 'eval.classifier_steps', applied) rebuilt with
    experiments.build and its latest (or given) checkpoint. FileNotFoundError naming what is
    missing otherwise."""
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(
            f"{config_path} does not exist: --checkpoint_dir must be the --workdir of a training "
            "run (python -m experiments.run --config=NAME --workdir=DIR)"
        )
    with open(config_path) as file:
        config = ml_collections.ConfigDict(json.load(file))
    for dotted_key, value in (overrides or {}).items():
        section, _, key = dotted_key.rpartition(".")
        (config[section] if section else config)[key] = value
    experiment = build(config)
    step, params = restore_ema_params(experiment, run_dir, step)
    return experiment, step, params
