"""The experiments layer: every config builds, trains two steps and samples; the CLI end to end."""

from __future__ import annotations

import importlib
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import write_mnist_like_idx

from diffusion import data
from diffusion.metric_writers import read_scalars
from experiments import run
from experiments.build import ConfigError, build
from experiments.configs import base
from experiments.evaluate import evaluate
from experiments.sample import sample
from experiments.sweep import sweep, sweep_markdown
from experiments.train import train

CONFIGS = run.available_configs()


def load_config(name: str):
    return importlib.import_module(f"experiments.configs.{name}").get_config()


def shrink(config, image_size: int | None = None):
    """Two training steps of a tiny network and a three-step sampler: the config's own process,
    parameterization, loss and sampler, at a cost a test can pay."""
    config.training.n_iters = 2
    config.training.batch_size = 8  # divisible by the 4 simulated devices
    config.training.log_freq = 1
    config.training.checkpoint_freq = 2
    config.training.snapshot_freq = 2
    config.training.snapshot_num_samples = 2
    config.sampling.num_steps = min(int(config.sampling.num_steps), 3)  # 3: multistep order 3
    config.sampling.num_samples = 2
    config.sampling.batch_size = 2
    config.sampling.options.annealed_langevin.n_steps_each = 2
    if config.model.name == "unet":
        config.model.nf = 8
        config.model.ch_mult = (1,)
        config.model.num_res_blocks = 1
        config.model.attn_resolutions = ()
    else:
        config.model.width = 16
        config.model.num_blocks = 1
    return config


def test_there_are_the_promised_configs():
    views = ("vp", "subvp", "ve", "ddpm", "smld", "edm", "flow")
    expected = {f"{v}_{d}" for v in views for d in ("mnist", "fashion_mnist", "fashion_mnist_idx")}
    expected |= {"vp_cifar10", "ve_cifar10", "vp_digits", "ddpm_digits", "flow_digits"}
    expected |= {"toy_vp", "toy_ve", "toy_subvp", "toy_flow"}
    assert expected <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_validates(name):
    experiment = build(load_config(name))
    assert experiment.param_count() > 0


def configs_to_train() -> list[str]:
    """Every config, except that of the cross product view x 28x28 data source
    ({vp,subvp,ve,ddpm,smld,edm}_{mnist,fashion_mnist,fashion_mnist_idx}) only what each view and
    each data source adds is trained: every view on MNIST and the vp view on every source."""
    views, sources = base.VIEWS, ("mnist", "fashion_mnist", "fashion_mnist_idx")
    cross = {f"{view}_{source}" for view in views for source in sources}
    kept = {f"{view}_mnist" for view in views} | {f"vp_{source}" for source in sources}
    return [name for name in CONFIGS if name not in cross or name in kept]


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=() if name == "toy_vp" else pytest.mark.slow)  # toy_vp: fast tier
        for name in configs_to_train()
    ],
)
def test_every_config_trains_two_steps_and_samples(name, tmp_path):
    config = shrink(load_config(name))
    if config.data.idx_dir is not None:
        config.data.idx_dir = write_mnist_like_idx(tmp_path)
    experiment = build(config)
    workdir = str(tmp_path / "run")
    with tfds.testing.mock_data(num_examples=16):
        state = train(experiment, workdir)
    assert int(state.step) == 2
    records = read_scalars(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert os.path.exists(os.path.join(workdir, "samples", "samples_00000002.png"))
    npz_path = sample(experiment, workdir)
    with np.load(npz_path) as archive:
        assert archive["samples"].shape == (2, *experiment.data_shape)
        assert np.all(np.isfinite(archive["samples"]))


# ------------------------------------------------------------------------------ bad configs
@pytest.mark.parametrize(
    ("name", "overrides", "fragment"),
    [
        ("ddpm_mnist", {"training.weighting": "likelihood"}, "config.training"),
        ("vp_mnist", {"training.time_sampling": "discrete"}, "VPSDE"),
        ("vp_mnist", {"model.time_input": "index"}, "config.model"),
        ("vp_mnist", {"model.attn_resolutions": (16,)}, "config.model.attn_resolutions"),
        ("vp_mnist", {"sampling.method": "rk4"}, "config.sampling.method"),
        ("vp_mnist", {"sampling.grid": "trailing"}, "config.sampling"),
        ("vp_mnist", {"process.beta_max": 0.01}, "config.process"),
        ("vp_mnist", {"data.dataset": "imagenet"}, "config.data.dataset"),
        ("vp_mnist", {"model.scale_by_sigma": True}, "config.model.scale_by_sigma"),
        ("toy_vp", {"model.name": "unet"}, "config.model.name"),
        ("vp_mnist", {"training.batch_size": 6}, "config.training.batch_size"),
        ("vp_mnist", {"sampling.options.ddim.eta": 2.0}, "config.sampling.options.ddim"),
    ],
)
def test_impossible_configs_are_rejected_naming_the_key(name, overrides, fragment):
    config = load_config(name)
    for key, value in overrides.items():
        section, field = key.rsplit(".", 1)
        node = config
        for part in section.split("."):
            node = node[part]
        node[field] = value
    if "sampling.options.ddim.eta" in overrides:
        config.sampling.method = "ddim"
    with pytest.raises(ConfigError) as info:
        build(config)
    assert fragment in str(info.value)


@pytest.mark.slow
def test_eval_and_sweep_on_a_toy_run(tmp_path):
    config = shrink(load_config("toy_vp"))
    config.training.n_iters = 4
    config.training.checkpoint_freq = 4
    config.training.snapshot_freq = 4
    config.eval.num_samples = 64
    config.eval.sweep_num_samples = 32
    config.eval.sweep_solvers = ("ddim", "dpm_solver_pp_2m")
    config.eval.sweep_nfes = (4, 8)
    config.eval.sweep_grids = ("uniform_t", "uniform_log_snr")
    experiment = build(config)
    workdir = str(tmp_path)
    train(experiment, workdir)
    record = evaluate(experiment, workdir)
    for key in ("test_loss", "sliced_w2", "sliced_w2_noise_floor", "nfe", "ode_log_prob_per_dim"):
        assert np.isfinite(record[key])
    with open(os.path.join(workdir, "eval", "eval.json")) as file:
        assert json.load(file)["step"] == 4
    table = sweep(experiment, workdir)
    assert "dpm_solver_pp_2m" in table and "uniform_log_snr" in table
    for extension in ("csv", "md", "png", "json"):
        assert os.path.exists(os.path.join(workdir, "sweep", f"sweep.{extension}"))


@pytest.mark.slow
def test_eval_on_images_writes_every_metric_and_caches_the_classifier(tmp_path):
    config = shrink(load_config("vp_digits"))
    config.eval.num_samples = 40
    config.eval.batch_size = 8
    config.eval.bpd_num_examples = 4
    config.eval.classifier_steps = 30
    experiment = build(config)
    workdir = str(tmp_path)
    train(experiment, workdir)
    record = evaluate(experiment, workdir)
    for key in ("test_loss", "bits_per_dim", "fd_classifier", "fd_classifier_train_data"):
        assert np.isfinite(record[key]) and record[key] > 0, key
    assert record["bits_per_dim_num_examples"] == 4
    assert sum(record["class_histogram"]) == 40 and len(record["class_histogram"]) == 10
    assert 0.0 <= record["class_chi_square_p_value"] <= 1.0
    assert 0.0 <= record["classifier_test_accuracy"] <= 1.0
    # A second evaluation reuses the cached classifier; other settings train a new one.
    config.eval.bpd = False
    info = os.path.join(workdir, "eval", "classifier_digits.json")
    first_write = os.stat(info).st_mtime_ns
    assert evaluate(build(config), workdir)["classifier_test_accuracy"] == pytest.approx(
        record["classifier_test_accuracy"]
    )
    assert os.stat(info).st_mtime_ns == first_write
    config.eval.classifier_steps = 31
    evaluate(build(config), workdir)
    with open(info) as file:
        assert json.load(file)["settings"]["steps"] == 31


def test_sweep_uses_the_exact_oracle_without_a_checkpoint(tmp_path):
    config = load_config("toy_vp")
    config.eval.sweep_num_samples = 32
    config.eval.sweep_solvers = ("ddim",)
    config.eval.sweep_nfes = (5, 10)
    config.eval.sweep_grids = ("uniform_t",)
    table = sweep(build(config), str(tmp_path))
    rows = [line for line in table.splitlines() if line.startswith("| ddim")]
    errors = [float(line.split("|")[6]) for line in rows]
    assert len(errors) == 2 and errors[1] < errors[0]  # more steps, smaller discretisation error


def test_sweep_table_has_a_metric_column_only_when_there_is_a_metric():
    record = dict(solver="ddim", grid="uniform_t", nfe_target=10, nfe=10, num_steps=10)
    record.update(error_rmse=0.125, metric=None, seconds=1.0, skipped=None)
    header = sweep_markdown([record]).splitlines()[0]
    assert header == "| solver | grid | nfe_target | nfe | num_steps | error_rmse | seconds |"
    with_metric = sweep_markdown([{**record, "metric": 0.5}], "sliced_w2").splitlines()
    assert "| error_rmse | sliced_w2 | seconds |" in with_metric[0]
    assert with_metric[2].endswith("| 0.125 | 0.5 | 1 |")


def test_digits_dataset_is_what_vp_digits_trains_on():
    experiment = build(load_config("vp_digits"))
    assert experiment.data_shape == (8, 8, 1)
    assert experiment.load_split("train").num_examples == 1497
    assert data.load_dataset("digits", "test").num_examples == 300
