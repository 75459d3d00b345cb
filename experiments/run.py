"""Train, sample, evaluate and sweep solvers from one command line.

    python -m experiments.run --config=vp_mnist --workdir=runs/vp_mnist [--mode=train]
    python -m experiments.run --config=vp_mnist --workdir=runs/vp_mnist --mode=sample \
        --config.sampling.method=dpm_solver_pp --config.sampling.num_steps=20

``--config=NAME`` resolves to experiments/configs/NAME.py (a path to a config file works too);
``--config.section.key=value`` overrides any key (unknown keys are rejected by ml_collections).
The config is validated as a whole before anything is built (experiments/build.py); a bad key or an
impossible combination, and a dataset that is not on disk, end the run with one clear message.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion.data import DatasetNotFoundError
from experiments.build import ConfigError, build
from experiments.evaluate import evaluate
from experiments.sample import sample
from experiments.sweep import sweep
from experiments.train import train

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
MODES = ("train", "sample", "eval", "sweep")
MODE_FUNCTIONS = {"sample": sample, "eval": evaluate, "sweep": sweep}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config name or path.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Working directory (checkpoints, logs, samples).")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do.")
_CHECKPOINT_STEP = flags.DEFINE_integer(
    "checkpoint_step", None, "Checkpoint step to sample or evaluate (default: the latest)."
)
flags.mark_flags_as_required(["config", "workdir"])


def available_configs() -> list[str]:
    return sorted(
        name[:-3]
        for name in os.listdir(CONFIG_DIR)
        if name.endswith(".py") and name not in ("__init__.py", "base.py")
    )


def resolve_config_argument(argv: list[str]) -> list[str]:
    """Rewrite ``--config=NAME`` (or ``--config NAME``) to the path of experiments/configs/NAME.py."""
    argv = list(argv)
    for index, argument in enumerate(argv):
        if argument == "--config" and index + 1 < len(argv):
            value_index, value = index + 1, argv[index + 1]
        elif argument.startswith("--config="):
            value_index, value = index, argument.split("=", 1)[1]
        else:
            continue
        if os.path.exists(value.split(":")[0]):
            return argv
        path = os.path.join(CONFIG_DIR, value + ".py")
        if not os.path.exists(path):
            raise SystemExit(
                f"error: --config={value!r} is neither a file nor a known config; known configs: "
                + ", ".join(available_configs())
            )
        argv[value_index] = path if value_index != index else f"--config={path}"
        return argv
    return argv


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax reports every save at INFO
    workdir = _WORKDIR.value
    try:
        experiment = build(_CONFIG.value)
        os.makedirs(workdir, exist_ok=True)
        if _MODE.value == "train":
            train(experiment, workdir)
        else:
            MODE_FUNCTIONS[_MODE.value](experiment, workdir, checkpoint_step=_CHECKPOINT_STEP.value)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    except DatasetNotFoundError as error:
        sys.exit(
            f"error: {error}\nOn this command line: --config.data.data_dir=DIR for (1), "
            "--config.data.idx_dir=DIR for (2)."
        )
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main, argv=resolve_config_argument(sys.argv))
