"""Train, sample, evaluate and sweep solvers from one command line.

    python -m experiments.run --list
    python -m experiments.run --config=vp_mnist --workdir=runs/vp_mnist [--mode=train]
    python -m experiments.run --config=vp_mnist --workdir=runs/vp_mnist --mode=sample \\
        --config.sampling.method=dpm_solver_pp_2m --config.sampling.num_steps=20

``--config=NAME`` resolves to experiments/configs/NAME.py (a path to a config file works too);
``--config.section.key=value`` overrides any key. Everything a user can get wrong (an unknown key or
config, a bad value, an impossible combination, missing data, an unusable workdir, a workdir that
records another experiment) ends the run with one or two lines and a non-zero status before anything
is created in the workdir. SIGTERM / SIGINT during training checkpoint and exit with 143 / 130
(experiments/train.py). Several hosts: the same command on every host with ``--distributed``
(coordinator, process count and index from the flags or detected by JAX from SLURM, Open MPI or a
Cloud TPU), see the README.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion import parallel
from diffusion.checkpoints import CheckpointMismatchError
from diffusion.data import DatasetNotFoundError
from diffusion.training import NonFiniteTrainingError
from experiments.build import ConfigError, build
from experiments.evaluate import evaluate
from experiments.sample import sample
from experiments.sweep import sweep
from experiments.train import Preempted, train
from experiments.workdir import ResumeMismatchError, WorkdirError, check_resume, check_workdir

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
MODES = ("train", "sample", "eval", "sweep")
MODE_FUNCTIONS = {"sample": sample, "eval": evaluate, "sweep": sweep}
# Errors that are the user's to fix: one line, no traceback.
USER_ERRORS = (
    ConfigError,
    DatasetNotFoundError,
    WorkdirError,
    ResumeMismatchError,
    CheckpointMismatchError,
    NonFiniteTrainingError,
    FileNotFoundError,
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config name or path.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Working directory (checkpoints, logs, samples).")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do.")
_LIST = flags.DEFINE_bool("list", False, "List the configs with one line each, and exit.")
_CHECKPOINT_STEP = flags.DEFINE_integer(
    "checkpoint_step", None, "Checkpoint step to sample or evaluate (default: the latest)."
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Continue a workdir whose config.json differs from --config in keys that change what its "
    "checkpoints are (the change is recorded in config_changes.jsonl).",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Run as one of several processes (jax.distributed); see the README."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (default: detected from the cluster)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (default: detected)."
)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (default: detected).")


def available_configs() -> list[str]:
    return sorted(
        name[:-3]
        for name in os.listdir(CONFIG_DIR)
        if name.endswith(".py") and name not in ("__init__.py", "base.py")
    )


def _load_config_module(path: str):
    spec = importlib.util.spec_from_file_location("_config_for_checks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_descriptions() -> dict[str, str]:
    """The first line of each config file's docstring, by config name."""
    descriptions = {}
    for name in available_configs():
        module = _load_config_module(os.path.join(CONFIG_DIR, name + ".py"))
        descriptions[name] = (
            (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
        )
    return descriptions


def _did_you_mean(value: str, accepted: list[str]) -> str:
    close = difflib.get_close_matches(value, accepted, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _config_value(argv: list[str]) -> tuple[int, str] | None:
    for index, argument in enumerate(argv):
        if argument == "--config" and index + 1 < len(argv):
            return index + 1, argv[index + 1]
        if argument.startswith("--config="):
            return index, argument.split("=", 1)[1]
    return None


def resolve_config_argument(argv: list[str]) -> list[str]:
    """Rewrite ``--config=NAME`` (or ``--config NAME``) to the path of experiments/configs/NAME.py."""
    argv = list(argv)
    found = _config_value(argv)
    if found is None:
        return argv
    index, value = found
    if os.path.exists(value.split(":")[0]):
        return argv
    path = os.path.join(CONFIG_DIR, value + ".py")
    if not os.path.exists(path):
        configs = available_configs()
        raise SystemExit(
            f"error: --config={value!r} is neither a file nor a known config"
            f"{_did_you_mean(value, configs)}; `python -m experiments.run --list` lists them"
        )
    argv[index] = path if argv[index] == value else f"--config={path}"
    return argv


def check_config_overrides(argv: list[str]) -> None:
    """SystemExit with one line for a ``--config.KEY=...`` whose key the config does not have,
    naming the keys its section accepts (ml_collections would end in a traceback)."""
    found = _config_value(argv)
    overrides = [a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if found is None or not overrides:
        return
    config = _load_config_module(found[1].split(":")[0]).get_config()
    for override in overrides:
        node, walked = config, []
        for part in override.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                section = ".".join(["config", *walked])
                hint = _did_you_mean(part, keys)
                accepted = ", ".join(sorted(keys)) or "none (not a section)"
                raise SystemExit(
                    f"error: --config.{override}: {section} has no key {part!r}{hint}; "
                    f"accepted: {accepted}"
                )
            node, walked = node[part], [*walked, part]


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with every error as one line (no usage dump, no traceback)."""
    argv = resolve_config_argument(argv)
    check_config_overrides(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        raise SystemExit(f"error: {error}") from None
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        message = str(error).strip("'\"").replace("\\n", " ").replace("\n", " ")
        raise SystemExit(f"error: bad --config override: {message}") from None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(
            f"error: unexpected arguments {argv[1:]}; flags take the form --name=value"
        )
    if _LIST.value:
        for name, description in config_descriptions().items():
            print(f"{name:28s} {description}")
        return
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise SystemExit("error: --config and --workdir are required (--list shows the configs)")
    logging.set_verbosity(logging.ERROR)  # orbax and tfds log routine events; errors are ours
    if _DISTRIBUTED.value:
        index, count = parallel.initialize_distributed(
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
        )
        print(f"process {index} of {count}")
    workdir = _WORKDIR.value
    try:
        check_workdir(workdir)
        experiment = build(_CONFIG.value)
        if _MODE.value == "train":
            train(experiment, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
        else:
            check_resume(experiment.record, workdir, allow_change=_ALLOW_CONFIG_CHANGE.value)
            MODE_FUNCTIONS[_MODE.value](experiment, workdir, checkpoint_step=_CHECKPOINT_STEP.value)
    except DatasetNotFoundError as error:
        idx = " or --config.data.idx_dir=DIR with its original IDX files" if error.has_idx else ""
        sys.exit(
            f"error: dataset {error.name!r} is not prepared in {error.searched_dir} (nothing is "
            "downloaded)\nremedy: --config.data.data_dir=DIR holding a copy prepared with `tfds build "
            f"{error.name} --data_dir=DIR --file_format=array_record` on a connected machine{idx}"
        )
    except WorkdirError as error:
        sys.exit(f"error: --workdir: {error}")
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
    except Preempted as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_status)


if __name__ == "__main__":
    app.run(main, argv=sys.argv, flags_parser=parse_flags)
