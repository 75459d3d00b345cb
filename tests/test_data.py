"""Tests for diffusion.data: sources, deterministic order, sharding, scaling and toy data."""

from __future__ import annotations

import collections
import gzip

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import IDX_BIG_ENDIAN, write_idx_file
from sklearn.datasets import load_digits

from diffusion import data

# ---------------------------------------------------------------------------------------- helpers


def _random_dataset(num_examples: int, shape=(6, 5, 3), seed: int = 0) -> data.ImageDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(num_examples, *shape), dtype=np.uint8)
    labels = rng.integers(0, 10, size=num_examples).astype(np.int32)
    return data.ImageDataset(name="random", images=images, labels=labels, num_classes=10)


# ------------------------------------------------------------------------------------------- TFDS


@pytest.mark.parametrize(("name", "shape"), [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_mock_data_materialises_the_split(name, shape):
    with tfds.testing.mock_data(num_examples=6):
        dataset = data.load_dataset(name, "train")
        source = tfds.data_source(name, split="train")
        expected_images = np.stack([source[index]["image"] for index in range(6)])
        expected_labels = np.array([source[index]["label"] for index in range(6)])
    assert dataset.images.shape == (6, *shape)
    assert dataset.images.dtype == np.uint8
    assert dataset.labels.dtype == np.int32
    assert dataset.num_classes == 10
    np.testing.assert_array_equal(dataset.images, expected_images)
    np.testing.assert_array_equal(dataset.labels, expected_labels)


class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A small dataset that TFDS can prepare offline and without TensorFlow (which encoding an
    ``Image`` feature would need), so the real ArrayRecord read path can be tested."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds.features.Tensor(shape=(6, 5, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12), "test": self._generate_examples(5)}

    def _generate_examples(self, num_examples):
        for key, (image, label) in enumerate(_tiny_examples(num_examples)):
            yield key, {"image": image, "label": label}


def _tiny_examples(num_examples: int) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(num_examples)
    images = rng.integers(0, 256, size=(num_examples, 6, 5, 3), dtype=np.uint8)
    return [(image, index % 10) for index, image in enumerate(images)]


def test_tfds_source_reads_a_prepared_array_record_dataset(tmp_path):
    TinyImages(data_dir=tmp_path, file_format="array_record").download_and_prepare()
    images, labels = data._load_tfds("tiny_images", "train", tmp_path)
    assert images.shape == (12, 6, 5, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32
    # TFDS shuffles the examples when it prepares a dataset: compare as multisets.
    loaded = collections.Counter(
        (image.tobytes(), int(label)) for image, label in zip(images, labels, strict=True)
    )
    written = collections.Counter((image.tobytes(), label) for image, label in _tiny_examples(12))
    assert loaded == written


def test_missing_tfds_dataset_raises_a_clear_error(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as caught:
        data.load_dataset("mnist", "train", data_dir=tmp_path)
    message = str(caught.value)
    assert "'mnist'" in message
    assert str(tmp_path) in message
    assert "tfds build mnist" in message  # remedy 1: prepare it elsewhere
    assert "idx_dir" in message  # remedy 2: the IDX source
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__
    assert not any(tmp_path.iterdir()), "nothing may be downloaded or prepared"


# -------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    ("type_code", "values"),
    [
        (0x08, np.arange(60).reshape(5, 4, 3) * 4),
        (0x0B, np.array([[-2, 1000], [32767, -32768]])),
        (0x0C, np.array([70000, -1, 2**31 - 1])),
        (0x0D, np.array([[0.5, -1.25, 2.0**40]])),
    ],
)
def test_read_idx_round_trip(tmp_path, suffix, type_code, values):
    path = tmp_path / f"array{suffix}"
    write_idx_file(path, values, type_code)
    loaded = data.read_idx(path)
    assert loaded.shape == values.shape
    assert loaded.dtype == np.dtype(IDX_BIG_ENDIAN[type_code]).newbyteorder("=")
    np.testing.assert_array_equal(loaded, values)


@pytest.mark.parametrize(("train_suffix", "test_suffix"), [("", ".gz"), (".gz", "")])
def test_load_dataset_from_idx_files(tmp_path, train_suffix, test_suffix):
    rng = np.random.default_rng(1)
    arrays = {}
    for prefix, count, suffix in (("train", 5, train_suffix), ("t10k", 3, test_suffix)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count).astype(np.uint8)
        write_idx_file(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx_file(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        arrays[prefix] = images, labels
    for split, prefix in (("train", "train"), ("test", "t10k")):
        dataset = data.load_dataset("fashion_mnist", split, idx_dir=tmp_path)
        np.testing.assert_array_equal(dataset.images, arrays[prefix][0][..., None])
        np.testing.assert_array_equal(dataset.labels, arrays[prefix][1])
        assert dataset.labels.dtype == np.int32


def test_read_idx_rejects_a_bad_magic_number(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx_file(path, np.zeros((2, 28, 28), dtype=np.uint8))
    raw = bytearray(path.read_bytes())
    raw[0] = 0x12
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="magic number") as caught:
        data.read_idx(path)
    assert str(path) in str(caught.value)


def test_read_idx_rejects_truncated_data(tmp_path):
    path = tmp_path / "labels.gz"
    write_idx_file(path, np.arange(10, dtype=np.uint8))
    with gzip.open(path, "rb") as file:
        raw = file.read()
    with gzip.open(path, "wb") as file:
        file.write(raw[:-1])
    with pytest.raises(ValueError, match="header promises") as caught:
        data.read_idx(path)
    assert str(path) in str(caught.value)


def test_missing_idx_file_names_the_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        data.load_dataset("mnist", "test", idx_dir=tmp_path)
    assert "t10k-images-idx3-ubyte" in str(caught.value)
    assert str(tmp_path) in str(caught.value)


# ----------------------------------------------------------------------------------------- digits


def test_digits_split_is_stratified_complete_and_deterministic():
    train, test = data.load_dataset("digits", "train"), data.load_dataset("digits", "test")
    assert train.images.shape == (1497, 8, 8, 1) and test.images.shape == (300, 8, 8, 1)
    assert train.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(test.labels), np.full(10, 30))
    # The union of the splits is sklearn's dataset under round(v * 255 / 16), as a multiset; the
    # rounding is done here in integers (half up, which agrees with half-to-even for v = 8).
    digits = load_digits()
    expected_images = ((digits.images.astype(np.int64) * 255 + 8) // 16).astype(np.uint8)

    def examples(images, labels):
        return collections.Counter(
            (image.tobytes(), int(label)) for image, label in zip(images, labels, strict=True)
        )

    split_examples = examples(train.images[..., 0], train.labels)
    split_examples.update(examples(test.images[..., 0], test.labels))
    assert split_examples == examples(expected_images, digits.target)
    assert {0, 255} <= set(np.unique(train.images).tolist())
    again = data.load_dataset("digits", "test")
    np.testing.assert_array_equal(again.images, test.images)


# ---------------------------------------------------------------------------------- bad arguments


def test_bad_names_raise_value_errors_before_any_loading(tmp_path):
    missing_dir = tmp_path / "does-not-exist"
    with pytest.raises(ValueError, match="'mnist', 'fashion_mnist', 'cifar10', 'digits'"):
        data.load_dataset("imagenet", "train", idx_dir=missing_dir)
    with pytest.raises(ValueError, match=r"unknown split 'validation'.*'train', 'test'"):
        data.load_dataset("mnist", "validation", idx_dir=missing_dir)
    with pytest.raises(ValueError, match="'mnist', 'fashion_mnist'"):
        data.load_dataset("cifar10", "train", idx_dir=missing_dir)
    with pytest.raises(ValueError, match="toy_batch"):
        data.load_dataset("two_moons", "train")
    with pytest.raises(ValueError, match=r"\(-1.0, 1.0\), \(0.0, 1.0\)"):
        data.image_batch(_random_dataset(4), step=0, batch_size=2, seed=0, data_range=(0, 255))
    with pytest.raises(ValueError, match="'checkerboard'"):
        data.toy_batch("spiral", step=0, batch_size=2, seed=0)


# ---------------------------------------------------------------------------------- order, resume


def test_batches_are_a_function_of_seed_and_step():
    dataset = _random_dataset(50)
    options = {"batch_size": 8, "dequantize": True, "random_flip": True}
    first = data.image_batch(dataset, step=7, seed=3, **options)
    second = data.image_batch(dataset, step=7, seed=3, **options)
    np.testing.assert_array_equal(first["image"], second["image"])
    np.testing.assert_array_equal(first["label"], second["label"])
    other_seed = data.example_indices(50, step=7, batch_size=8, seed=4)
    assert not np.array_equal(other_seed, data.example_indices(50, step=7, batch_size=8, seed=3))
    other_step = data.image_batch(dataset, step=8, seed=3, **options)
    assert not np.array_equal(other_step["image"], first["image"])


@pytest.mark.parametrize("batch_size", [4, 10, 25])
def test_each_epoch_visits_every_example_once(batch_size):
    num_examples, num_epochs = 10, 10
    num_steps = num_examples * num_epochs // batch_size
    stream = np.concatenate(
        [
            data.example_indices(num_examples, step=step, batch_size=batch_size, seed=0)
            for step in range(num_steps)
        ]
    )
    epochs = stream.reshape(num_epochs, num_examples)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(num_examples))
    assert len({epoch.tobytes() for epoch in epochs}) == num_epochs, "epochs must be reshuffled"


def test_resumed_run_sees_the_batches_of_an_uninterrupted_run():
    def run(dataset, first_step, last_step):
        return [
            data.image_batch(dataset, step=step, batch_size=16, seed=5, dequantize=True)
            for step in range(first_step, last_step)
        ]

    uninterrupted = run(data.load_dataset("digits", "test"), 0, 40)
    # A restart reloads the data and starts at step 30, across the epoch boundary at step 18.75.
    resumed = run(data.load_dataset("digits", "test"), 30, 40)
    for continuing, fresh in zip(uninterrupted[30:], resumed, strict=True):
        np.testing.assert_array_equal(continuing["image"], fresh["image"])
        np.testing.assert_array_equal(continuing["label"], fresh["label"])


# --------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("process_count", [2, 4])
def test_shards_concatenate_to_the_global_batch(process_count):
    dataset = _random_dataset(30)
    options = {"step": 3, "batch_size": 16, "seed": 1, "dequantize": True, "random_flip": True}
    global_batch = data.image_batch(dataset, **options)
    shards = [
        data.image_batch(dataset, process_index=index, process_count=process_count, **options)
        for index in range(process_count)
    ]
    for key in ("image", "label"):
        np.testing.assert_array_equal(np.concatenate([s[key] for s in shards]), global_batch[key])
    toy_options = {"step": 2, "batch_size": 16, "seed": 1}
    toy_shards = [
        data.toy_batch("swiss_roll", process_index=i, process_count=process_count, **toy_options)
        for i in range(process_count)
    ]
    np.testing.assert_array_equal(
        np.concatenate(toy_shards), data.toy_batch("swiss_roll", **toy_options)
    )


def test_sharding_rejects_bad_process_arguments():
    with pytest.raises(ValueError, match="not divisible"):
        data.example_indices(10, step=0, batch_size=6, seed=0, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        data.example_indices(10, step=0, batch_size=8, seed=0, process_index=4, process_count=4)


# ---------------------------------------------------------------------------- scaling, augmenting


@pytest.mark.parametrize("data_range", [(-1.0, 1.0), (0.0, 1.0)])
def test_scaling_hits_the_range_endpoints(data_range):
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    dataset = data.ImageDataset("ramp", pixels, np.zeros(1, np.int32), num_classes=10)
    image = data.image_batch(dataset, step=0, batch_size=1, seed=0, data_range=data_range)["image"]
    assert image.dtype == np.float32
    lo, hi = data_range
    assert image.min() == lo and image.max() == hi
    assert image[0, 0, 0, 0] == lo and image[0, 15, 15, 0] == hi
    expected = lo + (hi - lo) * np.arange(256, dtype=np.float64) / 255
    np.testing.assert_allclose(image.ravel(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("data_range", [(-1.0, 1.0), (0.0, 1.0)])
def test_dequantized_values_stay_in_their_bin_with_mean_at_the_bin_centre(data_range):
    lo, hi = data_range
    levels = np.array([0, 17, 128, 255], dtype=np.uint8)
    images = np.repeat(levels, 8)[:, None, None, None] * np.ones((1, 32, 32, 3), np.uint8)
    dataset = data.ImageDataset("levels", images, np.repeat(np.arange(4), 8), num_classes=10)
    batch = data.image_batch(
        dataset, step=0, batch_size=32, seed=2, data_range=data_range, dequantize=True
    )
    values = batch["image"].astype(np.float64)
    assert values.min() >= lo and values.max() <= hi
    position = (values - lo) / (hi - lo) * 256  # x + u for pixel value x
    level = levels[batch["label"]].astype(np.float64)[:, None, None, None]
    assert np.all(position >= level - 1e-4) and np.all(position <= level + 1 + 1e-4)
    for label, value in enumerate(levels):
        # 8 images x 3072 pixels: the standard error of the mean of u is 0.29 / 157 = 1.8e-3.
        mean = values[batch["label"] == label].mean()
        expected = lo + (hi - lo) * (value + 0.5) / 256
        np.testing.assert_allclose(mean, expected, rtol=0, atol=(hi - lo) / 256 * 0.01)


def test_random_flip_mirrors_about_half_of_the_images_left_right():
    dataset = _random_dataset(64, shape=(4, 6, 3))
    batch = data.image_batch(dataset, step=0, batch_size=64, seed=0, data_range=(0.0, 1.0))
    flipped = data.image_batch(
        dataset, step=0, batch_size=64, seed=0, data_range=(0.0, 1.0), random_flip=True
    )
    originals = dataset.images[data.example_indices(64, step=0, batch_size=64, seed=0)]
    np.testing.assert_array_equal(np.rint(batch["image"] * 255), originals)
    restored = np.rint(flipped["image"] * 255)
    is_mirrored = np.all(restored == originals[:, :, ::-1], axis=(1, 2, 3))
    is_unchanged = np.all(restored == originals, axis=(1, 2, 3))
    assert np.all(is_mirrored ^ is_unchanged)
    assert 16 <= is_mirrored.sum() <= 48  # Binomial(64, 1/2): mean 32, std 4


# --------------------------------------------------------------------------------------- toy data


def test_toy_batches_are_deterministic_float32_points():
    for name in data.TOY_DATASETS:
        points = data.toy_batch(name, step=4, batch_size=64, seed=0)
        assert points.shape == (64, 2) and points.dtype == np.float32
        np.testing.assert_array_equal(points, data.toy_batch(name, step=4, batch_size=64, seed=0))
        assert not np.array_equal(points, data.toy_batch(name, step=5, batch_size=64, seed=0))
        assert np.all(np.abs(points) < 4.5)


def test_checkerboard_fills_only_the_black_cells_uniformly():
    points = data.toy_batch("checkerboard", step=0, batch_size=20000, seed=0).astype(np.float64)
    cells = np.floor((points + 4.0) / 2.0).astype(int)  # (column, row) in 0..3
    assert np.all((cells >= 0) & (cells <= 3))
    assert np.all(cells.sum(axis=1) % 2 == 0), "a point fell in a white cell"
    counts = np.bincount(cells[:, 0] * 4 + cells[:, 1], minlength=16)
    assert np.all(np.abs(counts[counts > 0] - 2500) < 250) and np.count_nonzero(counts) == 8
    # Each column holds two black cells, so each marginal is U[-4, 4]: mean 0, std 4 / sqrt(3).
    np.testing.assert_allclose(points.mean(axis=0), 0.0, atol=0.06)
    np.testing.assert_allclose(points.std(axis=0), 4 / np.sqrt(3), atol=0.03)


def _distance_to_arc(points, centre, radius, angle_low, angle_high):
    """Distance from each point to the circle arc {centre + radius (cos a, sin a), a in range}."""
    offset = points - np.asarray(centre)
    angle = np.mod(np.arctan2(offset[:, 1], offset[:, 0]) - angle_low, 2 * np.pi) + angle_low
    on_arc = angle <= angle_high
    radial = np.abs(np.linalg.norm(offset, axis=1) - radius)
    ends = [
        np.asarray(centre) + radius * np.array([np.cos(a), np.sin(a)])
        for a in (angle_low, angle_high)
    ]
    to_ends = np.min([np.linalg.norm(points - end, axis=1) for end in ends], axis=0)
    return np.where(on_arc, radial, to_ends)


def test_two_moons_has_two_equal_clusters_on_their_arcs():
    points = data.toy_batch("two_moons", step=0, batch_size=10000, seed=0).astype(np.float64)
    upper = _distance_to_arc(points, (-1.0, -0.5), 2.0, 0.0, np.pi)
    lower = _distance_to_arc(points, (1.0, 0.5), 2.0, np.pi, 2 * np.pi)
    nearest = np.minimum(upper, lower)
    # Noise std 0.2 per coordinate: 4 std covers all but ~1e-4 of the points.
    assert np.mean(nearest < 0.8) > 0.999
    assert 0.47 < np.mean(upper < lower) < 0.53


def test_swiss_roll_lies_on_its_spiral():
    points = data.toy_batch("swiss_roll", step=0, batch_size=10000, seed=0).astype(np.float64)
    radius = np.linalg.norm(points, axis=1)
    angle = np.mod(np.arctan2(points[:, 1], points[:, 0]), 2 * np.pi)
    # The spiral r = t / (1.5 pi) at angle t for t in [1.5 pi, 4.5 pi]; compare with each winding.
    windings = angle[:, None] + 2 * np.pi * np.arange(3)[None]
    windings = np.where((windings >= 1.5 * np.pi) & (windings <= 4.5 * np.pi), windings, np.inf)
    radial_gap = np.min(np.abs(radius[:, None] - windings / (1.5 * np.pi)), axis=1)
    assert np.mean(radial_gap < 0.4) > 0.99
    # t is uniform, so the radius is U[1, 3] (mean 2, std 1/sqrt(3)) up to the small noise.
    np.testing.assert_allclose(radius.mean(), 2.0, atol=0.03)
    np.testing.assert_allclose(radius.std(), 1 / np.sqrt(3), atol=0.03)


def test_oracle_presets_are_sampled_through_the_oracle():
    ring = data.toy_batch("ring8_2d", step=1, batch_size=4000, seed=0)
    assert ring.shape == (4000, 2) and ring.dtype == np.float32
    ring = ring.astype(np.float64)
    # 8 modes at radius 2, angles k pi / 4, std 0.05 each: all points within 8 std of their mode.
    mode = np.rint(np.arctan2(ring[:, 1], ring[:, 0]) / (np.pi / 4)).astype(int) % 8
    centres = 2.0 * np.stack([np.cos(mode * np.pi / 4), np.sin(mode * np.pi / 4)], axis=1)
    assert np.all(np.linalg.norm(ring - centres, axis=1) < 0.4)
    assert np.all(np.abs(np.bincount(mode, minlength=8) - 500) < 100)
    gmm = data.toy_batch("gmm_64d", step=0, batch_size=8, seed=0, process_index=1, process_count=2)
    assert gmm.shape == (4, 64) and gmm.dtype == np.float32
    np.testing.assert_array_equal(
        data.toy_batch("gaussian_2d", step=3, batch_size=8, seed=2),
        data.toy_batch("gaussian_2d", step=3, batch_size=8, seed=2),
    )
