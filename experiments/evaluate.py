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

For a conditional model (or classifier guidance): the conditioning accuracy, the fraction of samples
that the in-project classifier assigns to the requested label, and for each classifier-free guidance
scale w of eval.guidance_scales the accuracy and FD of samples at w (keys ``..._w<w>``). With
eval.vlb: bits/dim of test data from the variational bound (diffusion.variational) under each
reverse-variance rule (``bpd_vlb_<rule>``; ``bpd_vlb`` the model's own), beside the ODE's
``bits_per_dim``.

Cached in DIR/eval/: the trained classifier (classifier_<dataset>.msgpack, with its test accuracy in
classifier_<dataset>.json) and the reference features of the real data (features_<dataset>_<split>_
<extractor>.npz), so a second evaluation does not repeat them.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import data, likelihood, metrics, oracle, variational
from diffusion.images import save_scatter_png, write_atomically
from diffusion.models import classifier
from experiments.build import Experiment, Stream
from experiments.caching import cached, write_json
from experiments.sample import (
    draw_samples,
    load_or_estimate_eps_sq_norm,
    sampling_inputs,
    save_grid,
)
from experiments.workdir import restore_ema_params

__all__ = ["evaluate", "load_or_train_classifier"]


# ----------------------------------------------------------------------------- the classifier
def load_or_train_classifier(experiment: Experiment, eval_dir: str) -> tuple[Any, float]:
    """(params, test accuracy) of the in-project classifier for the experiment's dataset.

    Trained once on the training split (in [-1, 1]) and cached in ``eval_dir`` (created if needed),
    keyed by its settings (``experiment.eval.classifier_*``, seed): other settings train a new one.
    """
    dataset = experiment.data.dataset
    eval_settings = experiment.eval
    settings = dict(
        steps=eval_settings.classifier_steps,
        batch_size=eval_settings.classifier_batch_size,
        learning_rate=float(eval_settings.classifier_learning_rate),
        max_shift=eval_settings.classifier_max_shift,
        weight_decay=float(eval_settings.classifier_weight_decay),
        seed=experiment.seed,
    )

    def train():
        train_split, test_split = experiment.load_split("train"), experiment.load_split("test")
        train_images = data.uint8_to_float(train_split.images, (-1.0, 1.0))
        test_images = data.uint8_to_float(test_split.images, (-1.0, 1.0))
        params = classifier.train_classifier(
            train_images, train_split.labels, num_classes=train_split.num_classes, **settings
        )
        accuracy = classifier.classifier_accuracy(params, test_images, test_split.labels)
        print(f"trained the {dataset} classifier: test accuracy {accuracy:.4f}")
        return params, {"dataset": dataset, "test_accuracy": accuracy}

    params, info = cached(eval_dir, f"classifier_{dataset}", settings, train)
    return params, float(info["test_accuracy"])


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
    denoiser = experiment.predictor(params)
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
        result = likelihood.ode_log_likelihood(experiment.predictor(params), points, key)
        record["ode_log_prob_per_dim"] = float(jnp.mean(result.log_prob)) / truth.dim
        record["exact_log_prob_per_dim"] = (
            float(jnp.mean(truth.log_prob(experiment.process, points, t0))) / truth.dim
        )
        record["ode_nfe"] = int(result.nfe)
    return record


def _feature_metrics(
    generated: np.ndarray, reference: np.ndarray, extractor: str, *, kid: bool = True
) -> dict[str, float]:
    """FD (and KID) of generated features against reference features, keys named by extractor."""
    stats_gen = metrics.feature_statistics(generated)
    stats_ref = metrics.feature_statistics(reference)
    record = {
        f"fd_{extractor}": metrics.frechet_distance(
            stats_gen.mean, stats_gen.covariance, stats_ref.mean, stats_ref.covariance
        )
    }
    if kid:
        subset = min(1000, len(generated), len(reference))
        kid_mean, kid_std = metrics.kernel_inception_distance(
            generated, reference, subset_size=subset, num_subsets=20, seed=0
        )
        record.update({f"kid_{extractor}": kid_mean, f"kid_{extractor}_std": kid_std})
    return record


def _conditioning_accuracy(
    experiment: Experiment, classifier_params, samples: np.ndarray, labels: np.ndarray
) -> float:
    """Fraction of samples that the in-project classifier assigns to their requested label."""
    logits, _ = classifier.classifier_logits_and_features(
        classifier_params, _centered(experiment, samples)
    )
    return float(np.mean(logits.argmax(axis=1) == labels))


def _vlb_data(experiment: Experiment) -> np.ndarray:
    """The data the bound is evaluated on: test images (uniformly dequantised when the run trains on
    dequantised data) or fresh toy points, eval.vlb_num_examples of them."""
    num = experiment.eval.vlb_num_examples
    if experiment.is_toy:
        return data.toy_batch(
            experiment.data.dataset, step=0, batch_size=num, seed=experiment.seed + 3
        )
    images = experiment.load_split("test").images[:num]
    noise = None
    if experiment.data.dequantize:
        noise = np.random.default_rng(experiment.seed).random(images.shape, np.float32)
    return data.uint8_to_float(images, experiment.data_range, dequantization_noise=noise)


def _vlb_rules(experiment: Experiment) -> tuple[tuple[str, ...], str]:
    """(the variance rules the bound is evaluated with, the model's own rule).

    A discrete chain: fixed small, fixed large, learned (a learned-variance network only) and
    analytic. A continuous process: the continuous bound, in which only the decoder's variance
    remains ('fixed_large' or 'analytic'; the others need a next chain time).
    """
    if experiment.process.is_discrete:
        rules = ("fixed_small", "fixed_large", "learned", "analytic")
        rules = tuple(r for r in rules if r != "learned" or experiment.learned_variance)
        return rules, experiment.variance
    own = experiment.variance if experiment.variance in variational.CHAIN_FREE_VARIANCES else None
    return variational.CHAIN_FREE_VARIANCES, own or "fixed_large"


@functools.partial(jax.jit, static_argnames=("decoder", "num_terms", "continuous"))
def _vlb_nats(model, x0, key, *, decoder: str, num_terms: int | None, continuous: bool):
    """(total, prior, decoder term L_0 or NaN) per example (nats)."""
    if continuous:
        estimate = variational.continuous_vlb(
            model, x0, key, decoder=decoder, num_time_samples=num_terms, time_sampling="importance"
        )
        return estimate.total, estimate.prior, estimate.reconstruction
    estimate = variational.discrete_vlb(model, x0, key, decoder=decoder, num_terms=num_terms)
    reconstruction = (
        estimate.terms[:, 0] if num_terms is None else jnp.full_like(estimate.total, jnp.nan)
    )
    return estimate.total, estimate.prior, reconstruction


def _vlb_bits_per_dim(
    experiment: Experiment, params, key: jax.Array, workdir: str, step: int
) -> dict[str, Any]:
    """Bits/dim from the variational bound under each rule of ``_vlb_rules`` (Ho et al. 2020,
    eq. 5 with their discretised decoder; Kingma et al. 2021 in continuous time), every rule with
    the same noise and term draws (common random numbers), in batches of eval.batch_size."""
    settings = experiment.eval
    continuous = not experiment.process.is_discrete
    num_terms = settings.vlb_num_terms or None
    rules, own = _vlb_rules(experiment)
    table = load_or_estimate_eps_sq_norm(experiment, workdir, params, step)
    x0 = _vlb_data(experiment)
    dim = int(np.prod(x0.shape[1:]))
    decoder = experiment.vlb_decoder
    data_range = (
        experiment.data_range if (decoder == "gaussian" and not experiment.is_toy) else None
    )

    def bits(nats):
        return np.asarray(variational.vlb_bits_per_dim(nats, dim, decoder, data_range))

    record: dict[str, Any] = {"vlb_decoder": decoder, "vlb_num_examples": len(x0)}
    batch_size = settings.batch_size
    for rule in rules:
        model = experiment.reverse_model(params, variance=rule, eps_sq_norm=table)
        parts = []
        for index, start in enumerate(range(0, len(x0), batch_size)):
            outputs = _vlb_nats(
                model,
                jnp.asarray(x0[start : start + batch_size]),
                jax.random.fold_in(key, index),
                decoder=decoder,
                num_terms=num_terms,
                continuous=continuous,
            )
            parts.append([np.asarray(value) for value in outputs])
        total, prior, reconstruction = (
            np.concatenate(column) for column in zip(*parts, strict=True)
        )
        values = bits(total)
        record[f"bpd_vlb_{rule}"] = float(values.mean())
        record[f"bpd_vlb_{rule}_stderr"] = (
            float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
        )
        if rule == own:
            record["bpd_vlb"] = record[f"bpd_vlb_{rule}"]
            record["bpd_vlb_rule"] = rule
            record["bpd_vlb_prior"] = float(bits(prior).mean())
            if np.all(np.isfinite(reconstruction)):
                record["bpd_vlb_decoder"] = float(bits(reconstruction).mean())
    if continuous:
        record["vlb_num_terms"] = int(num_terms) + 1  # time samples + the decoder
    else:
        record["vlb_num_terms"] = (
            len(experiment.process.chain_times) if num_terms is None else num_terms
        )
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
    sample_key, loss_key, bpd_key, toy_key, vlb_key = jax.random.split(
        experiment.key(Stream.EVAL), 5
    )
    record: dict[str, Any] = {
        "config": os.path.join(workdir, "config.json"),
        "step": step,
        "sampler": sampling.method,
        "grid": sampling.grid,
        "num_steps": sampling.num_steps,
    }
    inputs = sampling_inputs(experiment, workdir, params, step)

    def draw(**overrides):
        return draw_samples(
            experiment,
            params,
            sample_key,
            eval_settings.num_samples,
            sampling.batch_size,
            **inputs,
            **overrides,
        )

    drawn = draw()
    samples, labels = drawn.samples, drawn.labels
    record.update(
        nfe=drawn.nfe,
        network_evaluations=drawn.network_evaluations,
        num_samples=len(samples),
        sampling_seconds=drawn.seconds,
    )
    if labels is not None:
        record["labels"] = sampling.labels
        if experiment.num_classes is not None:
            record["guidance_scale"] = sampling.guidance_scale
        if experiment.classifier_module is not None:
            record["classifier_scale"] = sampling.classifier_scale
    record["test_loss"] = _test_loss(experiment, params, loss_key)
    if eval_settings.vlb:
        record.update(_vlb_bits_per_dim(experiment, params, vlb_key, workdir, step))
    if experiment.is_toy:
        record.update(_toy_metrics(experiment, params, samples, toy_key))
        save_scatter_png(
            os.path.join(eval_dir, "samples.png"), samples[:, :2], title=f"step {step}"
        )
    else:
        shown = slice(None) if labels is not None else slice(100)
        save_grid(
            os.path.join(eval_dir, "samples.png"),
            samples[shown],
            None if labels is None else labels[shown],
            experiment.data_range,
        )
        if eval_settings.bpd:
            record.update(_bits_per_dim(experiment, params, bpd_key))
        features_fn = _features_fn(experiment, eval_dir, record)
        extractor = eval_settings.feature_extractor
        reference = None
        if features_fn is not None:
            reference = _reference_features(experiment, eval_dir, features_fn, "test")
            record.update(_feature_metrics(np.asarray(features_fn(samples)), reference, extractor))
            # The floor: as many real training images as samples, against the same test features.
            train_images = experiment.load_split("train").images
            chosen = np.random.default_rng(0).permutation(len(train_images))[: len(samples)]
            real = data.uint8_to_float(train_images[chosen], experiment.data_range)
            floor = _feature_metrics(np.asarray(features_fn(real)), reference, extractor, kid=False)
            record[f"fd_{extractor}_train_data"] = floor[f"fd_{extractor}"]
        if eval_settings.feature_extractor == "classifier" or labels is not None:
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
            if labels is not None:
                record["conditioning_accuracy"] = float(np.mean(logits.argmax(axis=1) == labels))
        if experiment.num_classes is not None:
            # Classifier-free guidance scales: the same keys and labels, only w changes.
            for scale in eval_settings.guidance_scales:
                at_scale = drawn if scale == sampling.guidance_scale else draw(guidance_scale=scale)
                suffix = f"_w{scale:g}"
                record["conditioning_accuracy" + suffix] = _conditioning_accuracy(
                    experiment, params_classifier, at_scale.samples, at_scale.labels
                )
                if reference is not None:
                    fd = _feature_metrics(
                        np.asarray(features_fn(at_scale.samples)), reference, extractor, kid=False
                    )
                    record[f"fd_{extractor}{suffix}"] = fd[f"fd_{extractor}"]
    write_json(os.path.join(eval_dir, "eval.json"), record)
    shown = {k: v for k, v in record.items() if isinstance(v, float | int) and k != "step"}
    print(f"eval at step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items())))
    print(f"-> {os.path.join(eval_dir, 'eval.json')}")
    return record
