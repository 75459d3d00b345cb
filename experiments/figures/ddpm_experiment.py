"""Higham, Higham & Grindrod 2023's DDPM experiment (their Sec. 5, Figs. 2-6) from a trained run."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import metrics, samplers
from diffusion.images import make_grid, to_uint8
from diffusion.models import classifier
from diffusion.processes import DDPM
from experiments.evaluate import load_or_train_classifier
from experiments.figures import common, runs
from experiments.figures.base import (
    FigureContext,
    check,
    measurement,
    new_figure,
    register,
    save,
)

STRIP_STEPS = (0, 50, 100, 150, 200, 250, 300, 350, 400, 450, 500)
SNAPSHOT_STEPS = (500, 400, 300, 200, 100, 1)  # chain states shown for each reverse run
NOISED_STEP = 150  # t* of the memorisation probe (Higham et al. Fig. 6; our choice of t*)
DEFAULT_RUN = "ddpm_digits_run"
QUICK_TRAINING = {
    "training.n_iters": 20,
    "training.log_freq": 10,
    "training.checkpoint_freq": 20,
    "training.snapshot_freq": 20,
    "training.snapshot_sampling": False,
    "model.nf": 8,
    "model.ch_mult": (1,),
    "model.attn_resolutions": (),
}


def _train_default_run(context: FigureContext) -> str:
    """Train (or resume) ddpm_digits in DIR/ddpm_digits_run (quick: a 20-step toy in
    DIR/ddpm_digits_quick_run, enough to draw the figure) and return its directory."""
    import importlib

    from experiments.build import build
    from experiments.train import train

    config = importlib.import_module("experiments.configs.ddpm_digits").get_config()
    run_dir = context.path("ddpm_digits_quick_run" if context.quick else DEFAULT_RUN)
    if context.quick:
        for dotted_key, value in QUICK_TRAINING.items():
            section, key = dotted_key.split(".")
            config[section][key] = value
    experiment = build(config)
    os.makedirs(run_dir, exist_ok=True)
    print(f"no --checkpoint_dir: training ddpm_digits in {run_dir} (resumes if interrupted)")
    train(experiment, run_dir)
    return run_dir


def _nearest(images: np.ndarray, training: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2 distance from each image to its nearest training image, and that image's index
    (blocks of 100 images, so 60,000 MNIST training images fit in memory)."""
    flat_training = training.reshape(len(training), -1).astype(np.float64)
    training_norms = np.sum(flat_training**2, axis=1)
    distances, indices = [], []
    for start in range(0, len(images), 100):
        block = images[start : start + 100].reshape(-1, flat_training.shape[1]).astype(np.float64)
        squared = np.sum(block**2, axis=1)[:, None] - 2.0 * block @ flat_training.T + training_norms
        index = np.argmin(squared, axis=1)
        distances.append(np.sqrt(np.maximum(squared[np.arange(len(block)), index], 0.0)))
        indices.append(index)
    return np.concatenate(distances), np.concatenate(indices)


def _grid(images: np.ndarray, data_range, num_columns: int) -> np.ndarray:
    """A uint8 grid image (H, W) or (H, W, 3) of float images for imshow."""
    grid = make_grid(
        to_uint8(images, data_range), num_columns=num_columns, padding=1, pad_value=128
    )
    return grid[..., 0] if grid.shape[-1] == 1 else grid


@register(
    "ddpm_experiment",
    "Higham et al.'s DDPM experiment (Figs 2-6): forward strip, reverse snapshots, class "
    "histogram of 500 samples, 9 runs from one x_T, memorisation probe; digits or --checkpoint_dir",
    x64=False,
)
def ddpm_experiment(context: FigureContext) -> dict:
    """Higham, Higham & Grindrod 2023, Sec. 5 (Figs. 2-6), on a trained DDPM run.

    The run is --checkpoint_dir (a working directory of experiments.run, e.g. --config=ddpm_digits,
    ddpm_mnist or ddpm_fashion_mnist*); without it, ddpm_digits is trained into
    DIR/ddpm_digits_run first (a few CPU minutes; quick: a 20-step toy network, for rendering only).
    Sampling is the run's ancestral sampler (beta-tilde, no noise at the last step) down the whole
    chain. Panels: the forward strip of one training image at steps 0, 50, ..., 500 (Fig. 2); nine
    samples with reverse-process snapshots at steps 500, 400, ..., 100, 1 and the result (Fig. 3),
    composed by running the registered ancestral sampler over consecutive sub-grids (exact for a
    one-step sampler; the samplers return only their final state); 500 samples (quick: 50) sorted
    into classes by the in-project classifier, with the chi-square to uniform (Fig. 4); nine
    reverse runs from one x_T (Fig. 5); one training image noised to t* = 150 and nine reverse runs
    from there, with each result's distance to its nearest training image (Fig. 6), and the
    nearest-training-image distances of the 500 samples against those of test images (a
    memorisation probe: samples much closer to the training set than test images are copies).
    Checks: the chain's alpha_bar_T against prod(1 - beta_i) (T = 500: sqrt(alpha_bar_T) = 0.0797,
    the signal Higham et al.'s x_T still carries). Everything about the trained model is a
    measurement, not a check.
    """
    run_dir = context.checkpoint_dir or _train_default_run(context)
    overrides = {"eval.classifier_steps": 100} if context.quick else {}
    run = runs.load_run(run_dir, overrides=overrides)
    process, step = run.process, run.step
    if not isinstance(process, DDPM) or run.is_toy:
        raise ValueError(
            f"--checkpoint_dir={run_dir!r} is a {type(process).__name__} run on {run.dataset!r}; "
            "this figure needs a DDPM image run (ddpm_digits, ddpm_mnist, ddpm_fashion_mnist*)"
        )
    denoiser = run.denoiser
    data_range = run.data_range
    training, _, num_classes = run.images("train")
    test_images, _, _ = run.images("test")
    num_steps = process.num_steps
    checks, measurements = [], []

    # Fig. 2: the forward strip of one training image (one-shot q(x_t | x_0) at each step).
    image = jnp.asarray(training[:1])
    strip = [np.asarray(image[0])]
    for index, chain_step in enumerate(STRIP_STEPS[1:]):
        t = process.chain_times[chain_step - 1]
        x_t, _ = process.sample_marginal(jax.random.fold_in(context.key(0), index), image, t)
        strip.append(np.asarray(x_t[0]))
    alpha_bar_exact = float(np.prod(1.0 - process.betas))
    checks.append(
        check(
            f"sqrt(alpha_bar_T), T = {num_steps}",
            float(process.alpha(1.0)),
            float(np.sqrt(alpha_bar_exact)),
            1e-6,
            relative=True,
            note="sqrt(prod(1 - beta_i)): the fraction of the image left in x_T",
        )
    )

    # Fig. 3: nine samples with reverse snapshots (ancestral sampler composed over sub-grids).
    options = run.sampler_options("ancestral")
    times = samplers.time_grid(process, "linspace", num_steps - 1)  # t_N .. t_1, the whole chain
    chain_step_of = np.rint(np.asarray(times) * num_steps).astype(int)
    snapshot_indices = [int(np.flatnonzero(chain_step_of == s)[0]) for s in SNAPSHOT_STEPS]
    shape = (9, *run.data_shape)
    x_init = process.prior_sample(context.key(1), shape, jnp.float32)
    states = common.sample_with_snapshots(
        "ancestral",
        denoiser,
        context.key(2),
        x_init,
        times.astype(jnp.float32),
        snapshot_indices,
        **options,
    )
    final = np.asarray(denoiser.x0(jnp.asarray(states[-1]), times[-1]))  # no noise at t = 1
    snapshots = np.stack([*states, final], axis=1)  # (9, snapshots + 1, H, W, C)

    # Fig. 4: many samples sorted into classes by the in-project classifier.
    num_samples = context.size(500, 50)
    batch = min(num_samples, 250)
    samples = np.concatenate(
        [
            run.sample(jax.random.fold_in(context.key(3), k), batch)
            for k in range(-(-num_samples // batch))
        ]
    )[:num_samples]
    classifier_params, accuracy = load_or_train_classifier(
        run.experiment, context.path("classifier")
    )
    centered = samples if data_range == (-1.0, 1.0) else 2.0 * samples - 1.0
    logits, _ = classifier.classifier_logits_and_features(classifier_params, centered)
    counts = metrics.class_histogram(np.argmax(logits, axis=1), num_classes)
    chi_square = metrics.chi_square_to_uniform(counts)
    measurements += [
        measurement("training step of the checkpoint", step),
        measurement("classifier test accuracy", float(accuracy)),
        measurement(f"class histogram of {num_samples} samples", counts.tolist()),
        measurement("chi-square to uniform (statistic)", float(chi_square.statistic)),
        measurement("chi-square to uniform (p-value)", float(chi_square.p_value)),
    ]

    # Fig. 5: nine reverse runs from one x_T.
    one_start = jnp.broadcast_to(x_init[:1], shape)
    run_chain = samplers.sampler_program("ancestral", denoise_final=True, **options)
    from_one = np.asarray(
        run_chain(denoiser, context.key(4), one_start, times.astype(jnp.float32)).samples
    )

    # Fig. 6: a training image noised to t* and nine reverse runs from there.
    probe_index = 1
    t_star = process.chain_times[NOISED_STEP - 1]
    probe_image = jnp.asarray(training[probe_index : probe_index + 1])
    noised, _ = process.sample_marginal(context.key(5), probe_image, t_star)
    start_index = int(np.flatnonzero(chain_step_of == NOISED_STEP)[0])
    from_noised = np.asarray(
        run_chain(
            denoiser,
            context.key(6),
            jnp.broadcast_to(noised, shape),
            times[start_index:].astype(jnp.float32),
        ).samples
    )
    probe_distance, probe_nearest = _nearest(from_noised, training)
    original_distance = np.sqrt(
        np.sum((from_noised - np.asarray(probe_image)).reshape(9, -1) ** 2, axis=1)
    )
    sample_distance, _ = _nearest(samples, training)
    test_distance, _ = _nearest(test_images[: len(samples)], training)
    measurements += [
        measurement(
            f"runs from training image {probe_index} noised to t* = {NOISED_STEP} that return to it",
            int(np.sum(probe_nearest == probe_index)),
            note="nearest training image is the original",
        ),
        measurement(
            "median distance of those runs to the original training image",
            float(np.median(original_distance)),
        ),
        measurement("median nearest-training distance, samples", float(np.median(sample_distance))),
        measurement(
            "median nearest-training distance, test images", float(np.median(test_distance))
        ),
    ]

    # --- drawing
    gray = dict(cmap="gray", vmin=0, vmax=255)
    figure = new_figure(4, 4, panel_inches=3.4)
    axes = figure.add_subplot(4, 4, (1, 4))
    axes.imshow(_grid(np.stack(strip), data_range, len(strip)), **gray)
    strip_steps = ", ".join(map(str, STRIP_STEPS))
    axes.set_title(f"forward process of one training image, t = {strip_steps}", fontsize=9)
    axes.set_axis_off()
    axes = figure.add_subplot(4, 4, (5, 10))
    by_time = snapshots.transpose(1, 0, *range(2, snapshots.ndim))  # rows: t, columns: samples
    axes.imshow(_grid(by_time.reshape(-1, *snapshots.shape[2:]), data_range, 9), **gray)
    labels = ", ".join(map(str, SNAPSHOT_STEPS))
    axes.set_title(f"reverse process of 9 samples; rows t = {labels}, 0", fontsize=9)
    axes.set_axis_off()
    axes = figure.add_subplot(4, 4, 7)
    axes.bar(range(len(counts)), counts, color="tab:blue")
    axes.axhline(num_samples / len(counts), color="k", ls="--", lw=1)
    axes.set_xticks(range(len(counts)))
    axes.set_title(
        f"{num_samples} samples by class (chi2 p = {chi_square.p_value:.2g})", fontsize=9
    )
    axes = figure.add_subplot(4, 4, 8)
    axes.hist(test_distance, bins=30, alpha=0.5, density=True, label="test images")
    axes.hist(sample_distance, bins=30, alpha=0.5, density=True, label="samples")
    axes.set_xlabel("distance to nearest training image")
    axes.set_title("memorisation probe", fontsize=9)
    axes.legend(fontsize=7, loc="upper right")
    axes = figure.add_subplot(4, 4, 11)
    axes.imshow(_grid(from_one, data_range, 3), **gray)
    axes.set_title("9 reverse runs from one x_T", fontsize=9)
    axes.set_axis_off()
    axes = figure.add_subplot(4, 4, 12)
    run_index = np.arange(9)
    axes.bar(run_index - 0.2, original_distance, width=0.4, label="to the original")
    axes.bar(run_index + 0.2, probe_distance, width=0.4, label="to the nearest")
    axes.set_xticks(run_index)
    axes.set_xlabel("run from the noised training image")
    axes.set_title("distance to training images", fontsize=9)
    axes.legend(fontsize=7)
    axes = figure.add_subplot(4, 4, (13, 16))
    probe_row = np.concatenate([np.asarray(probe_image), np.asarray(noised), from_noised])
    axes.imshow(_grid(probe_row, data_range, len(probe_row)), **gray)
    axes.set_title(
        f"a training image, noised to t* = {NOISED_STEP}, and 9 reverse runs from there", fontsize=9
    )
    axes.set_axis_off()
    figure.suptitle(
        f"DDPM on {run.dataset} (Higham, Higham & Grindrod 2023, Figs. 2-6), checkpoint step {step}"
    )
    save(figure, context, "ddpm_experiment", dpi=90)
    return {
        "settings": {
            "run_dir": run_dir,
            "dataset": run.dataset,
            "process": repr(process),
            "sampler": {"method": "ancestral", **options, "denoise_final": True},
            "num_samples": num_samples,
            "noised_step": NOISED_STEP,
            "snapshots": "the ancestral sampler composed over consecutive sub-grids",
        },
        "checks": checks,
        "measurements": measurements,
        "data": {
            "class_counts": counts,
            "probe_distances": probe_distance,
            "probe_original_distances": original_distance,
            "probe_nearest": probe_nearest,
            "sample_nearest_distances": sample_distance,
            "test_nearest_distances": test_distance,
        },
    }
