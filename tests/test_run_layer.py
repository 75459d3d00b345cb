"""The run layer as a user on a cluster meets it: kills, pre-emption, divergence, mistakes, two hosts.

Every test drives ``python -m experiments.run`` in subprocesses on the toy MLP (ring8_2d), so what is
checked is what a command line does: exit status, the one-line message, and the files in the workdir.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, cli_env, run_cli

from diffusion.checkpoints import CheckpointManager
from experiments import run
from experiments.build import build
from experiments.configs import toy_vp
from experiments.workdir import WorkdirError, check_workdir, config_changes, initial_state

N_ITERS = 300
TOY = [
    "--config=toy_vp",
    f"--config.training.n_iters={N_ITERS}",
    "--config.training.checkpoint_freq=20",
    "--config.training.log_freq=10",
    "--config.training.snapshot_freq=100",
    "--config.training.snapshot_num_samples=64",
    "--config.training.batch_size=64",
    "--config.model.width=128",
    "--config.sampling.num_samples=64",
    "--config.sampling.batch_size=64",
    "--config.sampling.num_steps=10",
]
TMP_MARK = ".orbax-checkpoint-tmp"


def toy_experiment(*overrides: str):
    """The experiment the TOY command line (plus ``overrides``) builds, built in this process."""
    config = toy_vp.get_config()
    for argument in [*TOY[1:], *overrides]:
        key, value = argument[len("--config.") :].split("=")
        section, name = key.split(".")
        config[section][name] = type(config[section][name])(value)
    return build(config)


def final_state(workdir: str, step: int = N_ITERS):
    """The whole train state saved at ``step`` in ``workdir``, on the host."""
    experiment = toy_experiment()
    target = jax.eval_shape(lambda: initial_state(experiment))
    with CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=1) as manager:
        state = manager.restore(target, step=step)
    return jax.device_get(state.replace(key=jax.random.key_data(state.key)))


def assert_states_bitwise_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()


def strict_json_lines(path: str) -> list[dict]:
    """Every line of a JSONL file parsed as strict JSON (NaN or Infinity would fail)."""

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant} in {path}")

    with open(path, encoding="utf-8") as file:
        text = file.read()
    assert text.endswith("\n")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def start(workdir: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.run", f"--workdir={workdir}", *TOY, *extra],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finalised_steps(workdir: str) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def wait_for(condition, process: subprocess.Popen, timeout: float, poll: float = 0.002) -> bool:
    """Poll ``condition()`` until true (True) or the process ends or time runs out (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(poll)
    return False


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    result = run_cli(f"--workdir={workdir}", *TOY)
    assert result.returncode == 0, result.stderr[-2000:]
    return workdir


@pytest.mark.slow
def test_five_kills_then_resume_end_bitwise_like_an_uninterrupted_run(tmp_path, uninterrupted):
    """SIGKILL at five random moments, one of them while a checkpoint is being written; each time
    the same command resumes. The end state equals the uninterrupted run's bitwise, every metrics
    line is strict JSON, no step is logged twice, and the latest checkpoint is readable."""
    workdir = str(tmp_path / "killed")
    rng = np.random.default_rng(0)
    kills = []
    for attempt in range(5):
        reached = max(finalised_steps(workdir), default=0)
        process = start(workdir)
        try:
            if attempt == 2:  # during a save: as soon as orbax's temporary step directory exists
                directory = os.path.join(workdir, "checkpoints")

                def saving(directory=directory):
                    return os.path.isdir(directory) and any(
                        TMP_MARK in name for name in os.listdir(directory)
                    )

                assert wait_for(saving, process, 300), "no save in progress was caught"
            else:  # a random moment after the run has gone past the step it resumed from
                assert wait_for(
                    lambda r=reached: max(finalised_steps(workdir), default=0) > r,
                    process,
                    300,
                    0.05,
                )
                time.sleep(rng.uniform(0.0, 0.5))
            process.kill()
            process.wait()
        finally:
            if process.poll() is None:
                process.kill()
        kills.append(max(finalised_steps(workdir), default=0))
    assert kills[-1] < N_ITERS, f"the run ended before the fifth kill: {kills}"
    result = run_cli(f"--workdir={workdir}", *TOY)
    assert result.returncode == 0, result.stderr[-2000:]

    assert_states_bitwise_equal(final_state(workdir), final_state(uninterrupted))
    steps = [record["step"] for record in strict_json_lines(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == sorted(set(steps)) and steps[-1] == N_ITERS
    checkpoints = os.listdir(os.path.join(workdir, "checkpoints"))
    assert not [name for name in checkpoints if TMP_MARK in name]
    assert max(finalised_steps(workdir)) == N_ITERS


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_reached_and_the_resume_is_bitwise(tmp_path, uninterrupted):
    workdir = str(tmp_path / "preempted")
    process = start(workdir)
    try:
        assert wait_for(lambda: finalised_steps(workdir), process, 300, 0.05)
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM  # 143, documented in experiments/train.py
    stopped_at = int(stderr.split("stopped by SIGTERM at step ")[1].split(":")[0])
    assert 20 <= stopped_at < N_ITERS
    assert stopped_at in finalised_steps(workdir)  # the step reached, even between save steps
    assert "Traceback" not in stderr
    resumed = run_cli(f"--workdir={workdir}", *TOY)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from the checkpoint at step {stopped_at}" in resumed.stdout
    assert_states_bitwise_equal(final_state(workdir), final_state(uninterrupted))


@pytest.mark.slow
def test_samples_are_bitwise_reproducible_and_the_resumed_run_samples_alike(
    tmp_path, uninterrupted
):
    outputs = []
    for _ in range(2):
        result = run_cli(f"--workdir={uninterrupted}", "--mode=sample", *TOY)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "NFE" in result.stdout
        path = os.path.join(uninterrupted, "sample", f"dpm_solver_multistep_step{N_ITERS}.npz")
        with np.load(path) as archive:
            outputs.append(archive["samples"])
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert os.path.exists(path.replace(".npz", ".png"))


@pytest.mark.slow
def test_a_huge_learning_rate_stops_the_run_with_every_checkpoint_finite(tmp_path):
    workdir = str(tmp_path / "diverged")
    result = run_cli(
        f"--workdir={workdir}",
        *TOY,
        "--config.optim.lr=1e6",
        "--config.optim.warmup=0",
        "--config.training.max_nonfinite_steps=3",
        "--config.training.log_freq=1",
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last_line = result.stderr.strip().splitlines()[-1]  # after the progress bar's redraws
    assert last_line.startswith("error: training stopped at step") and "non-finite" in last_line
    records = strict_json_lines(os.path.join(workdir, "metrics.jsonl"))
    skipped = [record for record in records if record["nonfinite_steps"] > 0]
    assert skipped and skipped[-1]["loss"] is None and "loss" in skipped[-1]["nonfinite"]
    for step in finalised_steps(workdir):
        state = final_state(workdir, step)
        for leaf in jax.tree.leaves((state.params, state.ema_params, state.opt_state)):
            assert np.all(np.isfinite(leaf))


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def test_config_mistakes_are_caught_before_flag_parsing(tmp_path):
    """In process, what the CLI does first: an unknown key names its section's keys with a
    did-you-mean, an unknown config its closest name, a file as workdir is refused."""
    argv = run.resolve_config_argument(["run", "--config=toy_vp", "--config.trainin.n_iters=3"])
    with pytest.raises(SystemExit, match="did you mean 'training'"):
        run.check_config_overrides(argv)
    argv = run.resolve_config_argument(["run", "--config=toy_vp", "--config.training.no_such=1"])
    with pytest.raises(SystemExit, match=r"config\.training has no key 'no_such'.*n_iters"):
        run.check_config_overrides(argv)
    run.check_config_overrides(
        run.resolve_config_argument(["run", "--config=toy_vp", "--config.training.n_iters=3"])
    )
    with pytest.raises(SystemExit, match="did you mean 'toy_vp'"):
        run.resolve_config_argument(["run", "--config=toy_vpp"])
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(WorkdirError, match="is a file"):
        check_workdir(str(a_file))
    with pytest.raises(WorkdirError, match="cannot be created"):
        check_workdir(str(a_file / "run"))
    check_workdir(str(tmp_path / "new" / "run"))
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arguments", "fragments"),
    [
        (["--config.training.no_such=1"], ["config.training has no key 'no_such'", "n_iters"]),
        (["--config.trainin.n_iters=3"], ["did you mean 'training'"]),
        (["--config.training.n_iters=abc"], ["n_iters", "abc"]),
        (["--config.process.beta_max=0.01"], ["config.process", "beta_max"]),
        (["--config.model.num_classes=3"], ["config.model.num_classes", "labels"]),
        (["--config=toy_vpp"], ["did you mean 'toy_vp'"]),
    ],
)
def test_user_errors_are_one_line_and_leave_no_workdir(tmp_path, arguments, fragments):
    workdir = tmp_path / "never_created"
    config = [
        a
        for a in TOY
        if not (a.startswith("--config=") and any(x.startswith("--config=") for x in arguments))
    ]
    result = run_cli(f"--workdir={workdir}", *config, *arguments, timeout=120)
    assert_one_line_error(result, *fragments)
    assert not workdir.exists()


@pytest.mark.slow
def test_workdir_and_data_errors_name_the_workdir_and_the_remedy(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert_one_line_error(run_cli(f"--workdir={a_file}", *TOY, timeout=120), "workdir", "is a file")
    under_file = a_file / "run"
    assert_one_line_error(
        run_cli(f"--workdir={under_file}", *TOY, timeout=120), "workdir", "cannot be created"
    )
    workdir = tmp_path / "mnist"
    missing = run_cli(
        "--config=vp_mnist", f"--workdir={workdir}", f"--config.data.data_dir={tmp_path}/tfds"
    )
    assert_one_line_error(missing, "data_dir", "idx_dir")
    assert not workdir.exists()
    for name in ("--mode=sample", "--mode=eval"):
        no_checkpoint = run_cli(f"--workdir={workdir}", *TOY, name, timeout=120)
        assert_one_line_error(no_checkpoint, "no checkpoint")
        assert not workdir.exists()


@pytest.mark.slow
def test_resume_refuses_another_experiment_and_records_allowed_changes(tmp_path):
    workdir = str(tmp_path / "run")
    short = ["--config.training.n_iters=40"]
    assert run_cli(f"--workdir={workdir}", *TOY, *short).returncode == 0
    record_path = os.path.join(workdir, "config.json")
    with open(record_path, "rb") as file:
        record = file.read()
    metrics_before = read_text(os.path.join(workdir, "metrics.jsonl"))
    other = [a.replace("toy_vp", "toy_subvp") for a in TOY]
    refused = run_cli(f"--workdir={workdir}", *other, *short, "--config.training.batch_size=32")
    assert_one_line_error(
        refused,
        "process.name: 'vp' -> 'subvp'",
        "training.batch_size: 64 -> 32",
        "--allow_config_change",
    )
    with open(record_path, "rb") as file:
        assert file.read() == record  # the record still describes the checkpoints
    assert read_text(os.path.join(workdir, "metrics.jsonl")) == metrics_before

    # A wider network with the override: refused at the checkpoint, naming parameter and shapes.
    wider = run_cli(
        f"--workdir={workdir}", *TOY, *short, "--config.model.width=64", "--allow_config_change"
    )
    assert_one_line_error(wider, "does not fit the model", "checkpoint (", "model (")
    with open(record_path, "rb") as file:
        assert file.read() == record

    # Training longer is a safe change: allowed, and recorded with the step it applies from.
    longer = run_cli(f"--workdir={workdir}", *TOY, "--config.training.n_iters=60")
    assert longer.returncode == 0, longer.stderr[-2000:]
    with open(os.path.join(workdir, "config_changes.jsonl")) as file:
        (change,) = [json.loads(line) for line in file]
    assert change["step"] == 40
    assert change["changes"] == {"training.n_iters": {"from": 40, "to": 60}}
    with open(record_path) as file:
        assert json.load(file)["training"]["n_iters"] == 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_key_added_after_the_workdir_was_made_is_accepted_only_at_its_default():
    """A workdir recorded before a config key existed resumes when the key has its base default
    (what the workdir ran with) and is refused when it has another value."""
    record = toy_experiment().record
    older = json.loads(json.dumps(record))
    del older["training"]["compute_dtype"]
    safe, unsafe = config_changes(older, record)
    assert unsafe == {} and safe == {"training.compute_dtype": (None, "float32")}
    changed = json.loads(json.dumps(record))
    changed["training"]["compute_dtype"] = "bfloat16"
    _, unsafe = config_changes(older, changed)
    assert unsafe == {"training.compute_dtype": (None, "bfloat16")}


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    """Two processes on 127.0.0.1 (one CPU device each) train 10 steps: the parameters equal those
    of one process with the same global batch (float32 tolerance), and only process 0 logs."""
    steps = [
        "--config.training.n_iters=10",
        "--config.training.checkpoint_freq=10",
        "--config.training.log_freq=5",
        "--config.training.snapshot_freq=10",
        "--config.optim.warmup=0",  # full learning rate, so ten updates move the parameters
    ]
    single = str(tmp_path / "one_process")
    result = run_cli(f"--workdir={single}", *TOY, *steps, num_devices=1)
    assert result.returncode == 0, result.stderr[-2000:]

    pair = str(tmp_path / "two_processes")
    port = free_port()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.run",
                f"--workdir={pair}",
                *TOY,
                *steps,
                "--distributed",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={index}",
            ],
            cwd=REPO,
            env=cli_env(num_devices=1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=600) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    assert_trees_close = lambda a, b: jax.tree.map(  # noqa: E731
        lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6), a, b
    )
    one, two = final_state(single, 10), final_state(pair, 10)
    assert_trees_close(two.params, one.params)
    assert_trees_close(two.ema_params, one.ema_params)
    initial = jax.device_get(initial_state(toy_experiment("--config.optim.warmup=0")).params)
    moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), one.params, initial)
    assert max(jax.tree.leaves(moved)) > 1e-3  # ten updates moved the parameters
    records = strict_json_lines(os.path.join(pair, "metrics.jsonl"))
    assert [record["step"] for record in records] == [5, 10]  # written once, by process 0
    assert len(os.listdir(os.path.join(pair, "tensorboard"))) == 1
    assert sorted(os.listdir(os.path.join(pair, "samples"))) == [
        "samples_00000010.npz",
        "samples_00000010.png",
    ]
