"""--mode=sample: samples from a checkpoint's EMA parameters with the configured sampler.

A conditional model (or classifier guidance) samples sampling.labels, grouped by class: the .npz
holds ``labels`` beside ``samples`` and the PNG draws one row per class. With sampling.inpaint_mask
the known part comes from the test split (images of the requested classes when there are labels;
toy data: fresh points) and the .npz holds ``known``, ``mask`` and the inpainted ``samples`` (known
values pasted in); a second PNG shows the known part.

Also here, because sampling and evaluation both need them: the noise-conditional classifier of
classifier guidance (trained once, cached in DIR/classifiers/) and the analytic variance's table
Gamma_t (estimated once per checkpoint, cached in DIR/analytic/).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import data, guidance, variational
from diffusion.images import save_image_grid, save_scatter_png, write_atomically
from experiments.build import EpsSqNormTable, Experiment, Stream
from experiments.caching import cached
from experiments.workdir import restore_ema_params

__all__ = [
    "Draw",
    "class_rows",
    "draw_samples",
    "known_values",
    "load_or_estimate_eps_sq_norm",
    "load_or_train_noisy_classifier",
    "sample",
    "sampling_inputs",
    "save_grid",
]


@dataclasses.dataclass(frozen=True)
class Draw:
    """What ``draw_samples`` returns."""

    samples: np.ndarray
    labels: np.ndarray | None  # the requested class of each sample (None: unconditional)
    nfe: int  # sampler calls per sample (as the samplers count)
    network_evaluations: int  # nfe x network evaluations per call (2 with classifier-free guidance)
    seconds: float


def draw_samples(
    experiment: Experiment,
    params,
    key: jax.Array,
    num: int,
    batch_size: int,
    *,
    labels: np.ndarray | None = None,
    known: np.ndarray | None = None,
    **overrides,
) -> Draw:
    """``num`` samples drawn in batches of ``batch_size`` (batch i with fold_in(key, i)).

    ``labels`` default to ``experiment.sampling_labels(num)``; ``known`` ((num, *data_shape))
    inpaints; ``overrides`` go to ``Experiment.sample`` (guidance_scale, classifier, eps_sq_norm,
    method, ...). Every batch has the same shape (the last one is filled up with the first rows and
    cut), so the sampler compiles once; the same key gives bitwise the same samples.
    """
    if labels is None:
        labels = experiment.sampling_labels(num)
    outputs, nfe = [], 0
    start = time.perf_counter()
    for index in range(math.ceil(num / batch_size)):
        rows = np.arange(index * batch_size, (index + 1) * batch_size) % num
        result = experiment.sample(
            params,
            jax.random.fold_in(key, index),
            batch_size,
            labels=None if labels is None else labels[rows],
            known=None if known is None else known[rows],
            **overrides,
        )
        outputs.append(np.asarray(result.samples))
        nfe = int(result.nfe)
    seconds = time.perf_counter() - start
    return Draw(
        samples=np.concatenate(outputs)[:num],
        labels=labels,
        nfe=nfe,
        network_evaluations=nfe * experiment.evaluations_per_call(),
        seconds=seconds,
    )


# ----------------------------------------------------------------------------- cached inputs
def load_or_train_noisy_classifier(experiment: Experiment, workdir: str) -> guidance.Classifier:
    """The noise-conditional classifier p(y | x_t, t) of classifier guidance (Dhariwal & Nichol 2021,
    Sec. 4), trained on the noised training split (diffusion.guidance.train_noisy_classifier) and
    cached in DIR/classifiers/ keyed by its settings; its test accuracy at a few times is recorded
    in the .json beside it."""
    sampling = experiment.sampling
    train_split = experiment.load_split("train")
    images = data.uint8_to_float(train_split.images, experiment.data_range)
    template = guidance.init_classifier(
        experiment.classifier_module,
        experiment.key(Stream.CLASSIFIER),
        experiment.process,
        images[:1],
        num_classes=experiment.label_classes,
        time_input=experiment.denoiser.time_input,
    )
    settings = dict(
        steps=sampling.noisy_classifier_steps,
        batch_size=sampling.noisy_classifier_batch_size,
        learning_rate=float(sampling.noisy_classifier_learning_rate),
        channels=list(sampling.noisy_classifier_channels),
        num_blocks=sampling.noisy_classifier_num_blocks,
        process=experiment.record["process"],
        time_input=experiment.denoiser.time_input,
        embedding_type=experiment.classifier_module.embedding_type,
        data_range=list(experiment.data_range),
        seed=experiment.seed,
    )

    def train():
        trained = guidance.train_noisy_classifier(
            template,
            jax.random.fold_in(experiment.key(Stream.CLASSIFIER), 1),
            images,
            train_split.labels,
            steps=sampling.noisy_classifier_steps,
            batch_size=sampling.noisy_classifier_batch_size,
            learning_rate=float(sampling.noisy_classifier_learning_rate),
        )
        test = experiment.load_split("test")
        test_images = jnp.asarray(data.uint8_to_float(test.images, experiment.data_range))
        process = experiment.process
        accuracy = {}
        logits_fn = jax.jit(lambda classifier, x, t: classifier.logits(x, t))
        for fraction in (0.0, 0.25, 0.5, 0.75):
            t = process.t_min + fraction * (process.T - process.t_min)
            t_batch = jnp.full(test_images.shape[:1], t, jnp.float32)
            noise_key = jax.random.fold_in(experiment.key(Stream.CLASSIFIER), 2)
            x_t, _ = process.sample_marginal(noise_key, test_images, t_batch)
            predicted = np.asarray(logits_fn(trained, x_t, t_batch)).argmax(axis=1)
            accuracy[f"{t:.4g}"] = float(np.mean(predicted == test.labels))
        print(f"trained the noise-conditional classifier: test accuracy by t {accuracy}")
        return trained.params, {"test_accuracy_by_t": accuracy}

    directory = os.path.join(workdir, "classifiers")
    params, _ = cached(directory, f"noisy_classifier_{experiment.data.dataset}", settings, train)
    return template.replace(params=params)


def load_or_estimate_eps_sq_norm(
    experiment: Experiment, workdir: str, params, step: int
) -> EpsSqNormTable:
    """(times, Gamma_t) of the analytic variance (Bao et al. 2022, eq. 8: Gamma_t = E||eps_pred||^2 / d
    by Monte Carlo over training data), at ``experiment.analytic_times()``, for the checkpoint of
    ``step``: eval.analytic_num_batches training batches, each one network evaluation per time
    (diffusion.variational.estimate_eps_sq_norm); cached in DIR/analytic/ beside the checkpoints."""
    times = experiment.analytic_times()
    num_batches = experiment.eval.analytic_num_batches
    settings = dict(
        step=step,
        num_batches=num_batches,
        batch_size=experiment.training.batch_size,
        num_times=len(times),
        seed=experiment.seed,
    )

    def estimate():
        predictor = experiment.predictor(params)
        batch_fn = experiment.data_source()
        estimate_fn = jax.jit(
            lambda denoiser, x0, key: variational.estimate_eps_sq_norm(
                denoiser, x0, key, jnp.asarray(times, jnp.float32)
            )
        )
        values = []
        for index in range(num_batches):
            batch = batch_fn(index)
            x0 = batch["image"] if "image" in batch else batch["x"]
            key = jax.random.fold_in(experiment.key(Stream.ANALYTIC), index)
            values.append(np.asarray(estimate_fn(predictor, jnp.asarray(x0), key)))
        gamma = np.mean(values, axis=0)
        return {"times": np.asarray(times), "eps_sq_norm": gamma}, {
            "examples_per_time": num_batches * experiment.training.batch_size
        }

    directory = os.path.join(workdir, "analytic")
    table, _ = cached(directory, f"eps_sq_norm_step{step}", settings, estimate)
    return np.asarray(table["times"]), np.asarray(table["eps_sq_norm"])


def sampling_inputs(
    experiment: Experiment,
    workdir: str,
    params,
    step: int,
    *,
    method: str | None = None,
    options: dict | None = None,
) -> dict[str, Any]:
    """The cached keyword arguments ``Experiment.sample`` needs beside labels: the classifier of
    classifier guidance, the analytic variance's table (for ``method`` with ``options``)."""
    inputs: dict[str, Any] = {}
    if experiment.classifier_module is not None:
        inputs["classifier"] = load_or_train_noisy_classifier(experiment, workdir)
    if experiment.needs_eps_sq_norm(method, options):
        inputs["eps_sq_norm"] = load_or_estimate_eps_sq_norm(experiment, workdir, params, step)
    return inputs


def known_values(experiment: Experiment, num: int, labels: np.ndarray | None) -> np.ndarray:
    """(num, *data_shape) known values for inpainting: test images in the data range (with
    ``labels``, the k-th image of each requested class in turn), or fresh toy points."""
    if experiment.is_toy:
        return data.toy_batch(
            experiment.data.dataset, step=0, batch_size=num, seed=experiment.seed + 2
        )
    test = experiment.load_split("test")
    if labels is None:
        rows = np.arange(num) % test.num_examples
    else:
        rows = np.empty(num, int)
        for label in np.unique(labels):
            where = np.flatnonzero(labels == label)
            of_class = np.flatnonzero(test.labels == label)
            rows[where] = of_class[np.arange(len(where)) % len(of_class)]
    return data.uint8_to_float(test.images[rows], experiment.data_range)


def class_rows(images: np.ndarray, labels: np.ndarray, fill: float) -> tuple[np.ndarray, int]:
    """(images, num_columns) for an image grid with one row per class, in order of first
    appearance; shorter rows are padded with images of constant ``fill``."""
    classes = list(dict.fromkeys(labels.tolist()))
    groups = [images[labels == label] for label in classes]
    columns = max(len(group) for group in groups)
    blank = np.full(images.shape[1:], fill, images.dtype)
    padded = [
        np.concatenate([group, np.repeat(blank[None], columns - len(group), axis=0)])
        for group in groups
    ]
    return np.concatenate(padded), columns


# ----------------------------------------------------------------------------- the mode
def sample(experiment: Experiment, workdir: str, *, checkpoint_step: int | None = None) -> str:
    """Write DIR/sample/<method>_step<step>.png and .npz; print NFE and time; return the .npz path."""
    sampling = experiment.sampling
    num = sampling.num_samples
    step, ema_params = restore_ema_params(experiment, workdir, checkpoint_step)
    labels = experiment.sampling_labels(num)
    known = None
    if sampling.inpaint_mask is not None:
        known = known_values(experiment, num, labels)
    draw = draw_samples(
        experiment,
        ema_params,
        experiment.key(Stream.SAMPLE),
        num,
        sampling.batch_size,
        labels=labels,
        known=known,
        **sampling_inputs(experiment, workdir, ema_params, step),
    )
    directory = os.path.join(workdir, "sample")
    name = f"{sampling.method}_step{step}"
    if known is not None:
        name += f"_{sampling.inpaint_mask}"
    npz_path = os.path.join(directory, name + ".npz")
    png_path = os.path.join(directory, name + ".png")
    payload = dict(
        samples=draw.samples,
        nfe=draw.nfe,
        network_evaluations=draw.network_evaluations,
        step=step,
    )
    if labels is not None:
        payload["labels"] = labels
        if experiment.num_classes is not None:
            payload["guidance_scale"] = sampling.guidance_scale
        if experiment.classifier_module is not None:
            payload["classifier_scale"] = sampling.classifier_scale
    if known is not None:
        payload.update(known=known, mask=experiment.inpaint_mask())
    write_atomically(npz_path, lambda file: np.savez(file, **payload))
    if experiment.is_toy:
        save_scatter_png(png_path, draw.samples[:, :2], title=f"{name} ({draw.nfe} NFE)")
    else:
        low = experiment.data_range[0]
        save_grid(png_path, draw.samples, labels, experiment.data_range)
        if known is not None:
            masked = np.where(experiment.inpaint_mask(), known, low)
            save_grid(
                os.path.join(directory, name + "_known.png"), masked, labels, experiment.data_range
            )
    evaluations = (
        f", {draw.network_evaluations} network evaluations"
        if draw.network_evaluations != draw.nfe
        else ""
    )
    print(
        f"{len(draw.samples)} samples from step {step} with {sampling.method} "
        f"({draw.nfe} NFE each{evaluations}) in {draw.seconds:.1f} s -> {png_path}"
    )
    return npz_path


def save_grid(path: str, images: np.ndarray, labels: np.ndarray | None, data_range) -> None:
    """A PNG grid of images in ``data_range``, one row per class when there are ``labels``."""
    if labels is None:
        save_image_grid(path, images, data_range)
        return
    grid, columns = class_rows(images, labels, data_range[0])
    save_image_grid(path, grid, data_range, num_columns=columns)
