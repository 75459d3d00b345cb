"""The experiments layer: every config builds, trains two steps and samples; the CLI end to end."""

from __future__ import annotations

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import run_cli, write_mnist_like_idx

from diffusion import data, oracle, processes, samplers
from diffusion.metric_writers import read_scalars
from experiments import run
from experiments.build import ConfigError, build
from experiments.configs import base
from experiments.evaluate import evaluate
from experiments.sample import sample
from experiments.sweep import reference_trajectory, sweep, sweep_markdown
from experiments.train import train
from experiments.workdir import restore_ema_params

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


def test_sampler_options_without_a_default_take_values_of_their_type():
    """Options whose default is None (the adaptive solver's max_nfe, annealed Langevin's step_lr,
    DPM-Solver-fast's orders) are typed placeholders in the config, so that a command-line value
    (--config.sampling.options.adaptive.max_nfe=40) reaches the sampler as what it accepts."""
    config = load_config("toy_vp")
    settings = {
        ("adaptive", "max_nfe"): 40,
        ("annealed_langevin", "step_lr"): 1e-4,
        ("dpm_solver_fast", "orders"): (3, 2, 1),
    }
    for (method, option), value in settings.items():
        config.sampling.options[method][option] = value
    experiment = build(config)
    for (method, option), value in settings.items():
        options = experiment.sampling.options_of(method)
        assert options[option] == value and type(options[option]) is type(value), (method, option)
        samplers.get_sampler(method).check_options(options)  # raises for a value it refuses


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


def test_remat_and_compute_dtype_keys_reach_the_unet():
    """training.remat and training.compute_dtype configure the U-Net (the models' own tests check
    that remat leaves the gradient unchanged and that bfloat16 computes in bfloat16)."""
    config = load_config("vp_digits")
    assert build(config).model.remat == "none" and build(config).model.dtype is None
    config.training.remat, config.training.compute_dtype = "convs", "bfloat16"
    model = build(config).model
    assert model.remat == "convs" and model.dtype == jnp.bfloat16


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
        ("vp_mnist", {"training.remat": "all"}, "config.training.remat"),
        ("vp_mnist", {"training.compute_dtype": "float16"}, "config.training.compute_dtype"),
        ("toy_vp", {"training.compute_dtype": "bfloat16"}, "config.training.remat"),
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
    # The other reference: runs and the reference end at sampling.t_end (no final step).
    config.eval.sweep_denoise_final = False
    config.eval.sweep_trajectory_nfe = 4
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
    with open(os.path.join(workdir, "sweep", "sweep.json")) as file:
        content = json.load(file)
    assert "at t_end" in content["reference"]
    assert all(r["denoise_order"] is None for r in content["records"])
    for entry in content["error_vs_time"]:  # ends at the grid's last time, no sigma = 0 state
        assert entry["nfe"] == 4 and entry["times"][-1] == pytest.approx(1e-3)
        assert len(entry["error_rmse"]) == entry["num_steps"] + 1
        assert entry["error_rmse"][0] == 0.0 and np.all(np.isfinite(entry["error_rmse"]))
    assert os.path.exists(os.path.join(workdir, "sweep", "error_vs_time.png"))


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


@pytest.mark.slow
def test_sweep_uses_the_exact_oracle_without_a_checkpoint(tmp_path):
    """The default sweep ends at sigma = 0 (final step of order 2) and is measured against the ODE's
    end at sigma = 0; the error against time ends with the sweep's own error at that NFE."""
    config = load_config("toy_vp")
    config.eval.sweep_num_samples = 32
    config.eval.sweep_solvers = ("ddim", "unipc")
    config.eval.sweep_nfes = (5, 20)
    config.eval.sweep_grids = ("uniform_log_snr",)
    config.eval.sweep_trajectory_nfe = 5
    assert config.eval.sweep_denoise_final and config.eval.sweep_denoise_order == 2
    table = sweep(build(config), str(tmp_path))
    assert "end at sigma = 0" in table
    with open(os.path.join(tmp_path, "sweep", "sweep.json")) as file:
        content = json.load(file)
    records = {(r["solver"], r["nfe"]): r for r in content["records"]}
    assert set(records) == {(s, n) for s in ("ddim", "unipc") for n in (5, 20)}
    assert all(r["denoise_order"] == 2 and np.isfinite(r["error_rmse"]) for r in records.values())
    assert records["ddim", 20]["error_rmse"] < records["ddim", 5]["error_rmse"]
    # Measured: 4.2e-3 (UniPC) and 1.9e-2 (DDIM) at NFE 20, 0.19 and 0.13 at NFE 5.
    assert min(records[s, 20]["error_rmse"] for s in ("ddim", "unipc")) < 1e-2
    entries = content["error_vs_time"]
    assert [entry["solver"] for entry in entries] == ["ddim", "unipc"]
    for entry in entries:
        errors = entry["error_rmse"]
        assert entry["nfe"] == 5 and len(errors) == entry["num_steps"] + 2
        assert entry["times"][-1] is None and entry["sigma_hat"][-1] == 0.0  # the final state
        assert np.all(np.diff(entry["sigma_hat"]) < 0)
        assert errors[0] == 0.0 and np.all(np.isfinite(errors)) and max(errors) > 0
        # The same program up to record=True: the sweep's error at that NFE.
        assert errors[-1] == pytest.approx(records[entry["solver"], 5]["error_rmse"], rel=1e-4)
    for name in ("error_vs_time.png", "error_vs_time.csv", "sweep.png"):
        assert os.path.exists(os.path.join(tmp_path, "sweep", name))


def test_sweep_table_has_a_metric_column_only_when_there_is_a_metric():
    record = dict(solver="ddim", grid="uniform_t", nfe_target=10, nfe=10, num_steps=10)
    record.update(error_rmse=0.125, metric=None, seconds=1.0, skipped=None)
    header = sweep_markdown([record]).splitlines()[0]
    assert header == (
        "| solver | grid | nfe_target | nfe | num_steps | denoise_order | error_rmse | seconds |"
    )
    with_metric = sweep_markdown([{**record, "metric": 0.5}], "sliced_w2").splitlines()
    assert "| error_rmse | sliced_w2 | seconds |" in with_metric[0]
    assert with_metric[2].endswith("| 10 |  | 0.125 | 0.5 | 1 |")  # no final step: no order


def test_digits_dataset_is_what_vp_digits_trains_on():
    experiment = build(load_config("vp_digits"))
    assert experiment.data_shape == (8, 8, 1)
    assert experiment.load_split("train").num_examples == 1497
    assert data.load_dataset("digits", "test").num_examples == 300


# ------------------------------------------------------------------------------ conditional + VLB
def set_keys(config, overrides: dict):
    """``config`` with dotted keys set (e.g. {'sampling.labels': '3'})."""
    for key, value in overrides.items():
        section, field = key.rsplit(".", 1)
        node = config
        for part in section.split("."):
            node = node[part]
        node[field] = value
    return config


@pytest.mark.parametrize(
    ("name", "overrides", "fragments"),
    [
        # Labels, guidance and inpainting (issue: conditional generation).
        ("toy_vp", {"model.num_classes": 10}, ("config.model.num_classes", "has no labels")),
        ("vp_digits_cond", {"sampling.labels": "12"}, ("config.sampling.labels", "label 12")),
        ("vp_digits_cond", {"sampling.labels": "three"}, ("config.sampling.labels", "'all'")),
        ("vp_digits_cond", {"model.num_classes": 5}, ("config.model.num_classes", "10 classes")),
        ("vp_digits", {"sampling.labels": "3"}, ("config.sampling.labels", "conditional model")),
        ("vp_digits", {"sampling.guidance_scale": 3.0}, ("config.sampling.guidance_scale",)),
        ("vp_digits", {"training.label_dropout": 0.1}, ("config.training.label_dropout",)),
        ("vp_digits", {"eval.guidance_scales": (1.0, 3.0)}, ("config.eval.guidance_scales",)),
        (
            "vp_digits_cond",
            {"sampling.guidance_interval": (2.0, 1.0)},
            ("config.sampling.guidance_interval", "low < high"),
        ),
        (
            "vp_digits",
            {"sampling.inpaint_mask": "donut"},
            ("config.sampling.inpaint_mask", "donut"),
        ),
        ("vp_digits", {"sampling.inpaint_jump_length": 3}, ("inpaint_jump_length", "divide")),
        ("toy_vp", {"sampling.classifier_scale": 1.0}, ("config.sampling.classifier_scale",)),
        # Reverse variances, the hybrid and VDM losses, the bound (issue: the variational view).
        ("ddpm_digits", {"model.variance": "wide"}, ("config.model.variance", "fixed_small")),
        ("ddpm_digits", {"model.variance": "learned"}, ("config.model.variance", "hybrid")),
        ("ddpm_digits", {"training.weighting": "hybrid"}, ("config.training.weighting", "learned")),
        (
            "vp_digits",
            {"training.weighting": "hybrid", "model.variance": "learned"},
            ("config.training", "continuous"),
        ),
        ("toy_vp", {"model.variance": "learned"}, ("config.model.variance", "MLP")),
        (
            "ddpm_digits",
            {"sampling.reverse_variance": "learned"},
            ("config.sampling.reverse_variance", "learned-variance"),
        ),
        ("vp_digits", {"process.name": "learned"}, ("config.process.name", "'vlb'")),
        ("vp_digits", {"eval.vlb": True}, ("config.eval.vlb_num_terms", "discrete chain")),
        ("smld_mnist", {"eval.vlb": True}, ("config.data.centered", "[-1, 1]")),
        (
            "ddpm_digits_vlb",
            {"model.num_classes": 10},
            ("config.sampling.options.ancestral.variance", "model.num_classes"),
        ),
        (
            "ddpm_digits_vlb",
            {"training.label_dropout": 0.1, "training.weighting": "hybrid"},
            ("config.training.label_dropout",),
        ),
    ],
)
def test_conditional_and_variational_mistakes_name_the_key(name, overrides, fragments):
    with pytest.raises(ConfigError) as info:
        build(set_keys(load_config(name), overrides))
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_guidance_doubles_the_network_evaluations_and_labels_are_grouped_by_class():
    conditional = build(load_config("vp_digits_cond"))
    assert conditional.evaluations_per_call() == 2  # conditional + unconditional per call
    assert build(load_config("vp_digits")).evaluations_per_call() == 1
    np.testing.assert_array_equal(conditional.sampling_labels(5), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(conditional.sampling_labels(20), np.repeat(np.arange(10), 2))
    chosen = build(set_keys(load_config("vp_digits_cond"), {"sampling.labels": "0,4,7"}))
    np.testing.assert_array_equal(chosen.sampling_labels(7), [0, 0, 0, 4, 4, 7, 7])
    assert build(load_config("vp_digits")).sampling_labels(4) is None


@pytest.mark.slow
def test_label_out_of_range_is_a_one_line_error_before_anything_is_built(tmp_path):
    workdir = tmp_path / "never_created"
    result = run_cli(
        "--config=vp_digits_cond", f"--workdir={workdir}", "--config.sampling.labels=3,12"
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "config.sampling.labels" in lines[0] and "label 12 is out of range" in lines[0]
    assert not workdir.exists()


def png_size(path: str) -> tuple[int, int]:
    """(width, height) of a PNG, from its IHDR chunk (PNG spec: bytes 16-24, big-endian)."""
    with open(path, "rb") as file:
        header = file.read(24)
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    """vp_digits_cond shrunk and trained for two steps: (config, workdir)."""
    config = shrink(load_config("vp_digits_cond"))
    config.sampling.num_samples = 20
    config.sampling.batch_size = 20
    workdir = str(tmp_path_factory.mktemp("conditional"))
    train(build(config), workdir)
    return config, workdir


@pytest.mark.slow
def test_conditional_sample_mode_writes_labels_and_one_row_per_class(conditional_run):
    config, workdir = conditional_run
    with np.load(sample(build(config), workdir)) as archive:
        np.testing.assert_array_equal(archive["labels"], np.repeat(np.arange(10), 2))
        assert archive["samples"].shape == (20, 8, 8, 1)
        assert float(archive["guidance_scale"]) == config.sampling.guidance_scale
        assert int(archive["network_evaluations"]) == 2 * int(archive["nfe"])
    # 8x8 digits drawn 64 pixels wide with 2 pixels of padding: 10 rows of 2.
    png = os.path.join(workdir, "sample", "dpm_solver_pp_2m_step2.png")
    assert png_size(png) == (2 + 2 * 66, 2 + 10 * 66)


@pytest.mark.slow
def test_inpainting_with_resampling_keeps_the_known_pixels(conditional_run):
    config, workdir = conditional_run
    config = set_keys(
        config.copy_and_resolve_references(),
        {"sampling.inpaint_mask": "left_half", "sampling.inpaint_resamplings": 2},
    )
    with np.load(sample(build(config), workdir)) as archive:
        mask, known, samples = archive["mask"], archive["known"], archive["samples"]
        assert mask.shape == (8, 8, 1) and mask[:, 4:].all() and not mask[:, :4].any()
        np.testing.assert_array_equal(np.where(mask, samples, 0), np.where(mask, known, 0))
        # The known images are test digits of the requested classes.
        test = data.load_dataset("digits", "test")
        firsts = [test.images[test.labels == label][0] for label in range(10)]
        np.testing.assert_allclose(
            known[::2], data.uint8_to_float(np.stack(firsts), (-1.0, 1.0)), atol=1e-6
        )
    assert os.path.exists(
        os.path.join(workdir, "sample", "dpm_solver_pp_2m_step2_left_half_known.png")
    )


@pytest.mark.slow
def test_classifier_guidance_trains_and_caches_a_noisy_classifier(conditional_run):
    config, workdir = conditional_run
    config = set_keys(
        config.copy_and_resolve_references(),
        {"sampling.classifier_scale": 1.0, "sampling.noisy_classifier_steps": 3},
    )
    with np.load(sample(build(config), workdir)) as archive:
        assert float(archive["classifier_scale"]) == 1.0
        assert np.all(np.isfinite(archive["samples"]))
    info = os.path.join(workdir, "classifiers", "noisy_classifier_digits.json")
    with open(info) as file:
        record = json.load(file)
    assert record["settings"]["steps"] == 3 and len(record["test_accuracy_by_t"]) == 4
    first_write = os.stat(info).st_mtime_ns
    sample(build(config), workdir)
    assert os.stat(info).st_mtime_ns == first_write  # reused, not retrained


@pytest.mark.slow
def test_conditional_eval_reports_accuracy_and_fd_per_guidance_scale(conditional_run):
    config, workdir = conditional_run
    config = set_keys(
        config.copy_and_resolve_references(),
        {
            "eval.num_samples": 20,
            "eval.bpd": False,
            "eval.classifier_steps": 30,
            "eval.guidance_scales": (1.0, 3.0),
        },
    )
    record = evaluate(build(config), workdir)
    for suffix in ("", "_w1", "_w3"):
        assert 0.0 <= record[f"conditioning_accuracy{suffix}"] <= 1.0
    for key in ("fd_classifier", "fd_classifier_w1", "fd_classifier_w3"):
        assert np.isfinite(record[key]) and record[key] >= 0
    assert record["network_evaluations"] == 2 * record["nfe"]
    assert record["guidance_scale"] == config.sampling.guidance_scale


@pytest.mark.slow
def test_variational_eval_writes_the_vlb_of_every_variance(tmp_path):
    """ddpm_digits_vlb on a 20-step chain: the hybrid loss trains, the learned and analytic
    variances sample, eval writes bits/dim from the bound for each rule beside the ODE's."""
    config = shrink(load_config("ddpm_digits_vlb"))
    config.process.num_steps = 20
    config.sampling.num_steps = 5
    config.eval.update(num_samples=8, batch_size=4, bpd_num_examples=4, classifier_steps=10)
    config.eval.update(vlb_num_examples=6, analytic_num_batches=1)
    experiment = build(config)
    workdir = str(tmp_path)
    train(experiment, workdir)
    records = read_scalars(os.path.join(workdir, "metrics.jsonl"))
    assert all(np.isfinite(r["vlb_bpd"]) for r in records)  # the hybrid loss's L_vlb
    with np.load(sample(experiment, workdir)) as archive:
        assert np.all(np.isfinite(archive["samples"]))
    analytic = set_keys(
        config.copy_and_resolve_references(), {"sampling.reverse_variance": "analytic"}
    )
    with np.load(sample(build(analytic), workdir)) as archive:
        assert np.all(np.isfinite(archive["samples"]))
    assert os.path.exists(os.path.join(workdir, "analytic", "eps_sq_norm_step2.json"))
    record = evaluate(experiment, workdir)
    for rule in ("fixed_small", "fixed_large", "learned", "analytic"):
        assert np.isfinite(record[f"bpd_vlb_{rule}"]) and record[f"bpd_vlb_{rule}"] > 0, rule
    assert record["bpd_vlb"] == record["bpd_vlb_learned"] and record["bpd_vlb_rule"] == "learned"
    assert record["vlb_num_terms"] == 20 and record["vlb_num_examples"] == 6
    assert np.isfinite(record["bits_per_dim"])
    # The decoder term and the prior are parts of the total.
    assert 0 < record["bpd_vlb_prior"] < record["bpd_vlb"]
    assert 0 < record["bpd_vlb_decoder"] < record["bpd_vlb"]
    # An importance-sampled estimate: 5 terms per example (the other metrics left out).
    config.eval.update(vlb_num_terms=5, bpd=False, feature_extractor="none")
    assert evaluate(build(config), workdir)["vlb_num_terms"] == 5


@pytest.mark.slow
def test_learned_schedule_trains_with_the_vdm_loss_and_samples(tmp_path):
    """process.name='learned': the schedule's parameters live beside the network's, and sampling
    and the continuous bound rebuild the process from the checkpoint's EMA parameters."""
    config = base.digits_config("vp")
    base.use_learned_schedule(config, num_hidden=8)
    config = shrink(config)
    config.eval.update(num_samples=8, batch_size=4, bpd=False, feature_extractor="none")
    config.eval.update(vlb=True, vlb_num_examples=4, vlb_num_terms=2, analytic_num_batches=1)
    config.eval.analytic_num_times = 5
    experiment = build(config)
    workdir = str(tmp_path)
    train(experiment, workdir)
    _, ema = restore_ema_params(experiment, workdir)
    assert set(ema) == {"denoiser", "schedule"}
    process = experiment.denoiser_for(ema).process
    assert process != experiment.process  # trained, not the linear template
    np.testing.assert_allclose(process.gamma(np.array([0.0, 1.0])), [-13.3, 5.0], rtol=1e-5)
    with np.load(sample(experiment, workdir)) as archive:
        assert np.all(np.isfinite(archive["samples"]))
    record = evaluate(experiment, workdir)
    assert np.isfinite(record["bpd_vlb_fixed_large"]) and np.isfinite(record["bpd_vlb_analytic"])
    assert record["bpd_vlb_rule"] == "fixed_large" and record["vlb_num_terms"] == 3


def test_sweep_reference_trajectory_is_the_exact_gaussian_flow():
    """The chained adaptive solves against the closed-form probability-flow solution of Gaussian
    data (GaussianMixture.ode_flow) at every time of a grid: float32 at rtol = atol = 1e-6."""
    exact = oracle.preset("gaussian_2d")
    process = processes.VPSDE()
    denoiser = exact.denoiser(process)
    x_init = process.prior_sample(jax.random.PRNGKey(0), (64, 2))
    times = samplers.time_grid(process, "uniform_log_snr", 6)
    trajectory = reference_trajectory(denoiser, x_init, times)
    expected = np.stack([exact.ode_flow(process, x_init, process.T, t) for t in times])
    assert trajectory.shape == (7, 64, 2)
    np.testing.assert_allclose(trajectory, expected, atol=2e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {"sampling.denoise_order": 4},
        {"sampling.denoise_order": 0},
        # Extrapolating the x0 predictions needs a deterministic sampler's.
        {"sampling.method": "euler_maruyama", "sampling.denoise_order": 2},
        {"sampling.inpaint_mask": "left_half", "sampling.inpaint_resamplings": 2},
    ],
)
def test_denoise_order_is_validated_naming_the_key(overrides):
    config = load_config("toy_vp")
    config.sampling.method = "dpm_solver_pp_2m"
    config.sampling.denoise_order = 2
    for key, value in overrides.items():
        config.sampling[key.split(".")[1]] = value
    with pytest.raises(ConfigError) as info:
        build(config)
    assert "config.sampling.denoise_order" in str(info.value)


@pytest.mark.slow
def test_denoise_order_reaches_the_sampler():
    config = load_config("toy_vp")
    # t_end = 0.3: the x0 predictions still move, so orders 1 and 2 differ.
    config.sampling.update(method="dpm_solver_pp_2m", num_steps=4, denoise_order=2, t_end=0.3)
    experiment = build(config)
    # The output layer starts at zero (eps = 0: constant x0 predictions); perturb every weight.
    params = experiment.init_params(jax.random.PRNGKey(0))
    leaves, treedef = jax.tree.flatten(params)
    noise_keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    leaves = [
        w + 0.3 * jax.random.normal(k, w.shape) for w, k in zip(leaves, noise_keys, strict=True)
    ]
    params = jax.tree.unflatten(treedef, leaves)
    key = jax.random.PRNGKey(1)
    drawn = experiment.sample(params, key, 8).samples

    def direct(order):
        return samplers.sample(
            "dpm_solver_pp_2m",
            experiment.predictor(params),
            key,
            (8, 2),
            grid=config.sampling.grid,
            num_steps=4,
            t_end=0.3,
            denoise_final=True,
            denoise_order=order,
        ).samples

    np.testing.assert_allclose(drawn, direct(2), rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(drawn - direct(1))) > 1e-4


@pytest.mark.parametrize("key, value", [("sweep_denoise_order", 4), ("sweep_trajectory_nfe", -1)])
def test_sweep_settings_are_validated_naming_the_key(tmp_path, key, value):
    config = load_config("toy_vp")
    config.eval[key] = value
    with pytest.raises(ConfigError) as info:
        sweep(build(config), str(tmp_path))
    assert f"config.eval.{key}" in str(info.value)
    assert not os.path.exists(os.path.join(tmp_path, "sweep"))
