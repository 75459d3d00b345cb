"""--mode=eval: what researchers report, written to DIR/eval/eval.json (and pictures beside it).

For image data: the denoising loss on the test split, bits/dim of test images through the
probability-flow ODE, Fréchet distance and KID of generated samples against the test split in the
feature space of the named extractor (an in-project classifier trained on the training split, or
Inception-v3 with user-provided weights), and for labelled data the class histogram of generated
samples by the in-project classifier with its chi-square distance to uniform (Higham, Higham &
Grindrod 2023 sort 500 generated digits into classes this way, Fig. 4).

For toy data: the loss on fresh data, sliced Wasserstein-2 of samples to fresh data against the
two-sample noise floor at the same size, and for oracle presets the exact mean log-likelihood of the
samples under the data distribution and the ODE log-likelihood of fresh data against its exact value.

Cached in DIR/eval/: the trained classifier (classifier_<dataset>.msgpack, with its test accuracy in
classifier_<dataset>.json) and the reference features of the real data (features_<dataset>_<split>_
<extractor>.npz), so a second evaluation does not repeat them.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from diffusion import data, likelihood, metrics, oracle
from diffusion.images import save_image_grid, save_scatter_png, write_atomically
from diffusion.models import classifier
from experiments.build import Experiment, Stream
from experiments.sample import draw_samples
from experiments.workdir import restore_ema_params

__all__ = ["evaluate", "load_or_train_classifier"]


def _write_json(path: str, record: dict[str, Any]) -> None:
    text = json.dumps(record, indent=2, sort_keys=True).encode()
    write_atomically(path, lambda file: file.write(text))


# ----------------------------------------------------------------------------- the classifier
def load_or_train_classifier(experiment: Experiment, eval_dir: str) -> tuple[Any, float]:
    """(params, test accuracy) of the in-project classifier for the experiment's dataset.

    Trained once on the training split (in [-1, 1]) and cached in ``eval_dir`` (created if needed),
    keyed by its settings (``experiment.eval.classifier_*``, seed): other settings train a new one.
    """
    os.makedirs(eval_dir, exist_ok=True)
    dataset = experiment.data.dataset
    params_path = os.path.join(eval_dir, f"classifier_{dataset}.msgpack")
    info_path = os.path.join(eval_dir, f"classifier_{dataset}.json")
    train_split, test_split = experiment.load_split("train"), experiment.load_split("test")
    train_images = data.uint8_to_float(train_split.images, (-1.0, 1.0))
    test_images = data.uint8_to_float(test_split.images, (-1.0, 1.0))
    eval_settings = experiment.eval
    settings = dict(
        steps=eval_settings.classifier_steps,
        batch_size=eval_settings.classifier_batch_size,
        learning_rate=float(eval_settings.classifier_learning_rate),
        max_shift=eval_settings.classifier_max_shift,
        weight_decay=float(eval_settings.classifier_weight_decay),
        seed=experiment.seed,
    )
    if os.path.exists(params_path) and os.path.exists(info_path):
        with open(info_path) as file:
            info = json.load(file)
        if info.get("settings") == settings:
            with open(params_path, "rb") as file:
                params = flax.serialization.msgpack_restore(file.read())
            return params, float(info["test_accuracy"])
    start = time.perf_counter()
    params = classifier.train_classifier(
        train_images, train_split.labels, num_classes=train_split.num_classes, **settings
    )
    accuracy = classifier.classifier_accuracy(params, test_images, test_split.labels)
    payload = flax.serialization.to_bytes(params)
    write_atomically(params_path, lambda file: file.write(payload))
    record = {
        "dataset": dataset,
        "settings": settings,
        "test_accuracy": accuracy,
        "train_seconds": time.perf_counter() - start,
    }
    _write_json(info_path, record)
    print(f"trained the {dataset} classifier: test accuracy {accuracy:.4f}")
    return params, accuracy


def _centered(experiment: Experiment, images: np.ndarray) -> np.ndarray:
    """Images of the experiment's data range in [-1, 1], the feature extractors' input range."""
    lo, hi = experiment.data_range
    if (lo, hi) == (-1.0, 1.0):
        return images  # unchanged, bit for bit
    return (np.asarray(images) - lo) * (2.0 / (hi - lo)) - 1.0


def _features_fn(experiment: Experiment, eval_dir: str, record: dict[str, Any]):
    """features(images in the data range) -> (N, d) for the configured extractor, or None."""
    extractor = experiment.eval.feature_extractor
    if extractor == "classifier":
        params, accuracy = load_or_train_classifier(experiment, eval_dir)
        record["classifier_test_accuracy"] = accuracy
        return lambda images: classifier.classifier_logits_and_features(
            params, _centered(experiment, images)
        )[1]
    if extractor == "inception":
        from diffusion.models import inception

        path = experiment.eval.inception_weights
        if path is None:
            raise FileNotFoundError(
                "config.eval.inception_weights is not set: give the .npz converted from "
                "pytorch-fid's weights (see diffusion/models/inception.py), or use "
                "--config.eval.feature_extractor=classifier"
            )
        variables = inception.load_inception_params(path)

        def features(images):
            batches = [
                np.asarray(
                    inception.inception_pool3_features(variables, _centered(experiment, batch))
                )
                for batch in np.array_split(images, max(1, len(images) // 100))
            ]
            return np.concatenate(batches)

        return features
    return None


def _reference_features(experiment: Experiment, eval_dir: str, features_fn, split: str):
    dataset, extractor = experiment.data.dataset, experiment.eval.feature_extractor
    path = os.path.join(eval_dir, f"features_{dataset}_{split}_{extractor}.npz")
    if os.path.exists(path):
        with np.load(path) as archive:
            return archive["features"]
    images = data.uint8_to_float(experiment.load_split(split).images, experiment.data_range)
    features = np.asarray(features_fn(images))
    write_atomically(path, lambda file: np.savez(file, features=features))
    return features


# ----------------------------------------------------------------------------- pieces
def _test_loss(experiment: Experiment, params, key) -> float:
    loss_fn = jax.jit(lambda p, batch, k: experiment.loss(p, batch, k, train=False)[0])
    batch_size = experiment.eval.batch_size
    if experiment.is_toy:
        points = data.toy_batch(
            experiment.data.dataset, step=0, batch_size=4096, seed=experiment.seed + 1
        )
        batches = [{"x": chunk} for chunk in np.array_split(points, max(1, 4096 // batch_size))]
    else:
        test = experiment.load_split("test")
        images = data.uint8_to_float(test.images, experiment.data_range)
        usable = (len(images) // batch_size) * batch_size or len(images)
        batches = [
            {
                "image": images[start : start + batch_size],
                "label": test.labels[start : start + batch_size],
            }
            for start in range(0, usable, batch_size)
        ]
    values = [
        float(loss_fn(params, batch, jax.random.fold_in(key, i))) for i, batch in enumerate(batches)
    ]
    return float(np.mean(values))


def _bits_per_dim(experiment: Experiment, params, key) -> dict[str, float]:
    test = experiment.load_split("test")
    images = test.images[: experiment.eval.bpd_num_examples]
    denoiser = experiment.denoiser.replace(params=params)
    values, nfes = [], []
    batch_size = experiment.eval.batch_size
    for index, start in enumerate(range(0, len(images), batch_size)):
        bpd, nfe = likelihood.image_bits_per_dim(
            denoiser,
            images[start : start + batch_size],
            jax.random.fold_in(key, index),
            data_range=experiment.data_range,
            divergence="hutchinson",
            rtol=float(experiment.eval.bpd_rtol),
            atol=float(experiment.eval.bpd_rtol),
        )
        values.append(np.asarray(bpd))
        nfes.append(int(nfe))
    values = np.concatenate(values)
    return {
        "bits_per_dim": float(values.mean()),
        "bits_per_dim_stderr": float(values.std(ddof=1) / np.sqrt(len(values)))
        if len(values) > 1
        else 0.0,
        "bits_per_dim_num_examples": len(values),
        "bits_per_dim_mean_nfe": float(np.mean(nfes)),
    }


def _toy_metrics(experiment: Experiment, params, samples: np.ndarray, key) -> dict[str, Any]:
    name, num = experiment.data.dataset, len(samples)

    def fresh(seed: int, count: int) -> np.ndarray:
        return data.toy_batch(name, step=0, batch_size=count, seed=10_000 + seed)

    record = {
        "sliced_w2": metrics.sliced_wasserstein_distance(samples, fresh(0, num)),
        "sliced_w2_noise_floor": metrics.sliced_wasserstein_noise_floor(fresh, num, num_repeats=3),
    }
    record["sliced_w2_over_floor"] = record["sliced_w2"] / record["sliced_w2_noise_floor"]
    if name in data.ORACLE_PRESETS:
        truth = oracle.preset(name)
        t0 = experiment.process.t_min
        record["oracle_mean_log_prob_of_samples"] = float(
            jnp.mean(truth.log_prob(experiment.process, jnp.asarray(samples), t0))
        )
        record["oracle_mean_log_prob_of_data"] = float(
            jnp.mean(truth.log_prob(experiment.process, jnp.asarray(fresh(1, num)), t0))
        )
        points = jnp.asarray(fresh(2, 256))
        denoiser = experiment.denoiser.replace(params=params)
        result = likelihood.ode_log_likelihood(denoiser, points, key)
        record["ode_log_prob_per_dim"] = float(jnp.mean(result.log_prob)) / truth.dim
        record["exact_log_prob_per_dim"] = (
            float(jnp.mean(truth.log_prob(experiment.process, points, t0))) / truth.dim
        )
        record["ode_nfe"] = int(result.nfe)
    return record


# ----------------------------------------------------------------------------- the mode
def evaluate(experiment: Experiment, workdir: str, *, checkpoint_step: int | None = None) -> dict:
    """Write DIR/eval/eval.json (and samples.png, class_histogram.json) and return the record."""
    sampling, eval_settings = experiment.sampling, experiment.eval
    step, params = restore_ema_params(experiment, workdir, checkpoint_step)
    if not experiment.is_toy:
        experiment.load_split("test")  # a missing dataset stops the run before anything is written
    eval_dir = os.path.join(workdir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    sample_key, loss_key, bpd_key, toy_key = jax.random.split(experiment.key(Stream.EVAL), 4)
    record: dict[str, Any] = {
        "config": os.path.join(workdir, "config.json"),
        "step": step,
        "sampler": sampling.method,
        "grid": sampling.grid,
        "num_steps": sampling.num_steps,
    }
    samples, nfe, seconds = draw_samples(
        experiment,
        params,
        sample_key,
        eval_settings.num_samples,
        sampling.batch_size,
    )
    record.update(nfe=nfe, num_samples=len(samples), sampling_seconds=seconds)
    record["test_loss"] = _test_loss(experiment, params, loss_key)
    if experiment.is_toy:
        record.update(_toy_metrics(experiment, params, samples, toy_key))
        save_scatter_png(
            os.path.join(eval_dir, "samples.png"), samples[:, :2], title=f"step {step}"
        )
    else:
        save_image_grid(os.path.join(eval_dir, "samples.png"), samples[:100], experiment.data_range)
        if eval_settings.bpd:
            record.update(_bits_per_dim(experiment, params, bpd_key))
        features_fn = _features_fn(experiment, eval_dir, record)
        if features_fn is not None:
            extractor = eval_settings.feature_extractor
            reference = _reference_features(experiment, eval_dir, features_fn, "test")
            generated = np.asarray(features_fn(samples))
            stats_ref = metrics.feature_statistics(reference)
            stats_gen = metrics.feature_statistics(generated)
            record[f"fd_{extractor}"] = metrics.frechet_distance(
                stats_gen.mean, stats_gen.covariance, stats_ref.mean, stats_ref.covariance
            )
            # The floor: as many real training images as samples, against the same test features.
            train_images = experiment.load_split("train").images
            chosen = np.random.default_rng(0).permutation(len(train_images))[: len(samples)]
            real = data.uint8_to_float(train_images[chosen], experiment.data_range)
            stats_real = metrics.feature_statistics(np.asarray(features_fn(real)))
            record[f"fd_{extractor}_train_data"] = metrics.frechet_distance(
                stats_real.mean, stats_real.covariance, stats_ref.mean, stats_ref.covariance
            )
            subset = min(1000, len(generated), len(reference))
            kid_mean, kid_std = metrics.kernel_inception_distance(
                generated, reference, subset_size=subset, num_subsets=20, seed=0
            )
            record.update({f"kid_{extractor}": kid_mean, f"kid_{extractor}_std": kid_std})
        if eval_settings.feature_extractor == "classifier":
            params_classifier, _ = load_or_train_classifier(experiment, eval_dir)
            logits, _ = classifier.classifier_logits_and_features(
                params_classifier, _centered(experiment, samples)
            )
            counts = metrics.class_histogram(logits.argmax(axis=1), logits.shape[1])
            chi2 = metrics.chi_square_to_uniform(counts)
            record.update(
                class_histogram=counts.tolist(),
                class_chi_square=chi2.statistic,
                class_chi_square_p_value=chi2.p_value,
            )
    _write_json(os.path.join(eval_dir, "eval.json"), record)
    shown = {k: v for k, v in record.items() if isinstance(v, float | int) and k != "step"}
    print(f"eval at step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items())))
    print(f"-> {os.path.join(eval_dir, 'eval.json')}")
    return record
