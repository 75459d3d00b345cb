"""Training data on the host: image datasets as uint8 arrays, toy point clouds, deterministic batches.

Image datasets (``load_dataset``) are materialised once as an ``ImageDataset``: uint8 images (N, H, W,
C) and int32 labels. Three sources:

* TFDS (``mnist``, ``fashion_mnist``, ``cifar10``) through ``tfds.data_source`` (random access, no
  TensorFlow). Nothing is ever downloaded: a dataset missing from ``data_dir`` raises
  ``DatasetNotFoundError``, which says how to prepare it elsewhere or where to use the IDX source.
* The original IDX files of MNIST / Fashion-MNIST in a local directory (``idx_dir``), optionally
  gzipped (LeCun et al. 1998; format at http://yann.lecun.com/exdb/mnist/).
* scikit-learn's bundled 8x8 ``digits`` (the UCI optdigits test set, Alpaydin & Kaynak 1998): 1,797
  images with integer values 0..16, mapped to uint8 by round(v * 255 / 16) (np.rint, half to even:
  v = 8 gives 128). There is no official split; ours is fixed and stratified: a permutation from
  numpy's PCG64 seeded with 0 puts the first 30 examples of each class in ``test`` (300 images), the
  remaining 1,497 in ``train``; each split keeps sklearn's order.

Batches are pure functions of (seed, step), so a run resumed at step s sees exactly the batches an
uninterrupted run would:

* Order. Examples form an endless stream of epochs; epoch e is a permutation of the dataset drawn
  from PCG64 seeded with SeedSequence(seed, spawn_key=(PERMUTATION, e)). The global batch at step s
  is stream positions [s B, (s + 1) B), so a batch may straddle two epochs.
* Augmentation. Global batch row r at step s has its own stream, PCG64 seeded with
  SeedSequence(seed, spawn_key=(AUGMENTATION, s, r)): its first uniform is the flip coin (flip when
  < 1/2), the next H W C uniforms are the dequantisation noise. So a row's augmentation does not
  depend on which process computes it, nor the noise on whether flips are enabled.
* Sharding. With P processes, process p gets rows [p B/P, (p + 1) B/P) of the global batch; the
  shards concatenate to the global batch.
* Scaling. A pixel x in {0, ..., 255} maps to lo + (hi - lo) x / 255, which hits lo and hi exactly.
  With uniform dequantisation (Theis, van den Oord & Bethge 2016, Section 3.1; as in score_sde) it
  maps to lo + (hi - lo) (x + u) / 256 with u ~ U[0, 1): the value stays in [lo, hi] and its mean is
  lo + (hi - lo) (x + 1/2) / 256.

Toy data (``toy_batch``) are sampled afresh for each (seed, step, batch size): 2-D point clouds
(``TOY_DATASETS``, within about [-4, 4]^2) and the exact-score Gaussian-mixture presets of
``diffusion.oracle`` (``ORACLE_PRESETS``).
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import operator
import os
import struct
from collections.abc import Callable, Sequence

import jax
import numpy as np

from diffusion import oracle

__all__ = [
    "DATA_RANGES",
    "IDX_DATASETS",
    "IMAGE_DATASETS",
    "ORACLE_PRESETS",
    "SPLITS",
    "TFDS_DATASETS",
    "TOY_DATASETS",
    "DataRange",
    "DatasetNotFoundError",
    "ImageDataset",
    "check_data_range",
    "example_indices",
    "image_batch",
    "load_dataset",
    "load_idx_split",
    "read_idx",
    "toy_batch",
    "uint8_to_float",
]

DataRange = tuple[float, float]
DATA_RANGES: tuple[DataRange, ...] = ((-1.0, 1.0), (0.0, 1.0))
SPLITS = ("train", "test")
TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10")
IDX_DATASETS = ("mnist", "fashion_mnist")
IMAGE_DATASETS = (*TFDS_DATASETS, "digits")
TOY_DATASETS = ("checkerboard", "two_moons", "swiss_roll")
ORACLE_PRESETS = tuple(oracle.PRESETS)

# Every image dataset here has 10 classes; the shape is checked after loading from any source.
_NUM_CLASSES = 10
_IMAGE_SHAPES = {
    "mnist": (28, 28, 1),
    "fashion_mnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
    "digits": (8, 8, 1),
}
_IDX_FILE_PREFIXES = {"train": "train", "test": "t10k"}
# IDX type codes (third byte of the magic number) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_PER_CLASS = 30
_DIGITS_MAX_VALUE = 16

# Purposes of the random streams, the first word of every spawn key, so no two streams coincide.
_PERMUTATION_STREAM = 0
_AUGMENTATION_STREAM = 1
_TOY_STREAM = 2


class DatasetNotFoundError(Exception):
    """A TFDS dataset is not prepared under the searched data directory (we never download)."""

    def __init__(self, name: str, searched_dir: str, data_dir: str | os.PathLike | None) -> None:
        self.name = name
        self.searched_dir = searched_dir
        self.has_idx = name in IDX_DATASETS  # MNIST-like data also comes as IDX files
        if self.has_idx:
            idx_remedy = (
                f"  (2) read the original IDX files instead: load_dataset({name!r}, split, "
                "idx_dir=DIR) with DIR holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (each optionally .gz)."
            )
        else:
            idx_remedy = (
                f"  (2) the IDX source (idx_dir=DIR) holds only {', '.join(IDX_DATASETS)}; "
                f"{name!r} has no IDX version."
            )
        super().__init__(
            f"TFDS dataset {name!r} is not prepared in {searched_dir} (data_dir={data_dir}), and "
            "this code never downloads. Either\n"
            "  (1) prepare it on a machine with internet access and TensorFlow (which tfds needs "
            "to build image datasets), with\n"
            f"        tfds build {name} --data_dir=DIR --file_format=array_record\n"
            f"      or tfds.data_source({name!r}, data_dir=DIR, download=True, "
            "builder_kwargs={'file_format': 'array_record'}),\n"
            "      copy DIR here and pass data_dir=DIR; or\n" + idx_remedy
        )


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """One split of an image dataset held in memory.

    Attributes:
      name: the dataset name, one of ``IMAGE_DATASETS``.
      images: (N, H, W, C) uint8.
      labels: (N,) int32 class indices in [0, num_classes).
      num_classes: number of classes.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images must be (N, H, W, C) uint8, got {self.images.shape} {self.images.dtype}"
            )
        if self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must have shape ({self.images.shape[0]},), got {self.labels.shape}"
            )

    @property
    def num_examples(self) -> int:
        """Number of examples N."""
        return self.images.shape[0]


def _unknown_choice(kind: str, value: object, accepted: Sequence[object]) -> ValueError:
    return ValueError(
        f"unknown {kind} {value!r}; accepted: {', '.join(repr(item) for item in accepted)}"
    )


def _check_choice(kind: str, value: object, accepted: Sequence[object]) -> None:
    if value not in accepted:
        raise _unknown_choice(kind, value, accepted)


def check_data_range(data_range: Sequence[float]) -> DataRange:
    """Return ``data_range`` as a (lo, hi) float tuple if it is one of ``DATA_RANGES``.

    Raises:
      ValueError: naming the bad value and the accepted ranges.
    """
    try:
        bounds = tuple(float(bound) for bound in data_range)
    except (TypeError, ValueError):
        bounds = None
    if bounds not in DATA_RANGES:
        raise _unknown_choice("data_range", data_range, DATA_RANGES)
    return bounds


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    idx_dir: str | os.PathLike | None = None,
) -> ImageDataset:
    """Load one split of an image dataset into memory.

    Args:
      name: one of ``IMAGE_DATASETS`` (mnist, fashion_mnist, cifar10, digits).
      split: "train" or "test".
      data_dir: TFDS data directory (None: TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets);
        used only when the dataset is read from TFDS.
      idx_dir: a directory of IDX files; when given, mnist / fashion_mnist are read from it instead
        of TFDS.

    Raises:
      ValueError: unknown name or split, or idx_dir given for a dataset that has no IDX files.
      DatasetNotFoundError: a TFDS dataset that is not prepared under data_dir.
    """
    if name in TOY_DATASETS or name in ORACLE_PRESETS:
        raise ValueError(
            f"{name!r} is a toy dataset: draw its batches with toy_batch({name!r}, ...)"
        )
    _check_choice("image dataset", name, IMAGE_DATASETS)
    _check_choice("split", split, SPLITS)
    if idx_dir is not None:
        _check_choice("dataset for idx_dir", name, IDX_DATASETS)
        images, labels = load_idx_split(idx_dir, split)
        source = f"IDX files in {idx_dir}"
    elif name == "digits":
        images, labels = _load_digits(split)
        source = "sklearn.datasets.load_digits"
    else:
        images, labels = _load_tfds(name, split, data_dir)
        source = "TFDS"
    if images.shape[1:] != _IMAGE_SHAPES[name]:
        raise ValueError(
            f"{name!r} from {source} has images of shape {images.shape[1:]}, "
            f"expected {_IMAGE_SHAPES[name]}"
        )
    return ImageDataset(name=name, images=images, labels=labels, num_classes=_NUM_CLASSES)


def _load_tfds(
    name: str, split: str, data_dir: str | os.PathLike | None
) -> tuple[np.ndarray, np.ndarray]:
    """Materialise a TFDS split through ``tfds.data_source`` without ever downloading."""
    import tensorflow_datasets as tfds  # slow import: only TFDS datasets need it

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception:
        # An unprepared dataset fails in tfds with an unrelated-looking error (a KeyError on the
        # splits, or a complaint about the TFRecord format); say what is actually wrong.
        builder = tfds.builder(name, data_dir=data_dir)
        if builder.is_prepared():
            raise
        raise DatasetNotFoundError(name, os.fspath(builder.data_dir), data_dir) from None
    # Item by item: tfds.testing.mock_data's data sources do not support __getitems__.
    examples = [source[index] for index in range(len(source))]
    images = np.stack([example["image"] for example in examples])
    labels = np.array([example["label"] for example in examples], dtype=np.int32)
    return images, labels


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (LeCun et al. 1998, the MNIST distribution format), gzipped if it ends in .gz.

    The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian
    uint32; big-endian data in C order follows.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: a bad magic number, a truncated header, or a data size that disagrees with the
        header; the message names the file.
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as file:
            raw = file.read()
    except (gzip.BadGzipFile, EOFError) as error:
        raise ValueError(f"{path} is not a readable gzip file: {error}") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: magic number 0x{raw[:4].hex()}, expected 0x0000 followed "
            f"by a type code in {{{', '.join(f'0x{code:02x}' for code in _IDX_DTYPES)}}} "
            "and the number of dimensions"
        )
    num_dims = raw[3]
    header_size = 4 + 4 * num_dims
    if len(raw) < header_size:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {num_dims} dimensions)")
    shape = struct.unpack(f">{num_dims}I", raw[4:header_size])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected_bytes = math.prod(shape) * dtype.itemsize
    if len(raw) - header_size != expected_bytes:
        raise ValueError(
            f"{path}: the IDX header promises shape {shape} of {dtype.name} ({expected_bytes} "
            f"bytes of data), the file holds {len(raw) - header_size}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find_idx_file(directory: str | os.PathLike, stem: str) -> str:
    candidates = [os.path.join(directory, stem + suffix) for suffix in ("", ".gz")]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"no IDX file {stem} or {stem}.gz in {os.fspath(directory)}")


def load_idx_split(directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read the images (N, H, W, 1) uint8 and labels (N,) int32 of an MNIST-style IDX split.

    ``split`` "train" reads train-{images-idx3,labels-idx1}-ubyte, "test" reads t10k-...; each file
    may be gzipped (name + ".gz").
    """
    _check_choice("split", split, SPLITS)
    prefix = _IDX_FILE_PREFIXES[split]
    images_path = _find_idx_file(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx_file(directory, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{images_path}: expected 3-D uint8 images, got {images.shape} {images.dtype}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{labels_path}: expected {images.shape[0]} labels to match {images_path}, "
            f"got shape {labels.shape}"
        )
    return images[..., np.newaxis], labels.astype(np.int32)


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits as uint8 round(v * 255 / 16), in the fixed stratified split."""
    from sklearn.datasets import load_digits  # slow import: only digits need it

    digits = load_digits()
    images = np.rint(digits.images * (255 / _DIGITS_MAX_VALUE)).astype(np.uint8)[..., np.newaxis]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(labels.shape[0])
    is_test = np.zeros(labels.shape[0], dtype=bool)
    for label in range(_NUM_CLASSES):
        is_test[order[labels[order] == label][:_DIGITS_TEST_PER_CLASS]] = True
    in_split = is_test if split == "test" else ~is_test
    return images[in_split], labels[in_split]


def _generator(seed: int, *spawn_key: int) -> np.random.Generator:
    """PCG64 generator for one random stream; the spawn key is (purpose, counters...)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=spawn_key)))


@dataclasses.dataclass(frozen=True)
class _Shard:
    """Validated batch arguments and this process's rows [start, stop) of the global batch."""

    step: int
    batch_size: int
    seed: int
    start: int
    stop: int

    @property
    def rows(self) -> range:
        return range(self.start, self.stop)

    @property
    def positions(self) -> np.ndarray:
        """Positions of the shard's rows in the endless stream of examples."""
        return self.step * self.batch_size + np.arange(self.start, self.stop, dtype=np.int64)


def _shard(
    *, step: int, batch_size: int, seed: int, process_index: int, process_count: int
) -> _Shard:
    step, batch_size, seed = (operator.index(value) for value in (step, batch_size, seed))
    process_index, process_count = operator.index(process_index), operator.index(process_count)
    if step < 0 or seed < 0 or batch_size < 1:
        raise ValueError(
            f"need step >= 0, seed >= 0 and batch_size >= 1, got step={step}, seed={seed}, "
            f"batch_size={batch_size}"
        )
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index} and {process_count}"
        )
    if batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by process_count {process_count}"
        )
    rows_per_process = batch_size // process_count
    return _Shard(
        step=step,
        batch_size=batch_size,
        seed=seed,
        start=process_index * rows_per_process,
        stop=(process_index + 1) * rows_per_process,
    )


def _stream_indices(num_examples: int, seed: int, positions: np.ndarray) -> np.ndarray:
    """Dataset rows at the given stream positions: epoch i // N, row i % N of its permutation."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    epochs, offsets = np.divmod(positions, num_examples)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
        in_epoch = epochs == epoch
        permutation = _generator(seed, _PERMUTATION_STREAM, int(epoch)).permutation(num_examples)
        indices[in_epoch] = permutation[offsets[in_epoch]]
    return indices


def example_indices(
    num_examples: int,
    *,
    step: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """Dataset rows of this process's shard of the global batch at ``step`` ((B/P,) int64).

    Stream position i = step * batch_size + row lies in epoch i // N at offset i % N, and maps to
    row ``offset`` of that epoch's permutation, drawn from SeedSequence(seed, (PERMUTATION, epoch)).
    """
    shard = _shard(
        step=step,
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    return _stream_indices(num_examples, shard.seed, shard.positions)


def uint8_to_float(
    images: np.ndarray,
    data_range: Sequence[float] = (-1.0, 1.0),
    dequantization_noise: np.ndarray | None = None,
) -> np.ndarray:
    """Scale uint8 pixels x to float32 in data_range = (lo, hi).

    Without noise: lo + (hi - lo) x / 255, exact at both ends. With noise u in [0, 1) (uniform
    dequantisation, Theis et al. 2016, Section 3.1): lo + (hi - lo) (x + u) / 256.
    """
    lo, hi = check_data_range(data_range)
    pixels = np.asarray(images, dtype=np.float32)
    no_noise = dequantization_noise is None
    unit = pixels / 255 if no_noise else (pixels + dequantization_noise) / 256
    return (lo + (hi - lo) * unit).astype(np.float32)


def image_batch(
    dataset: ImageDataset,
    *,
    step: int,
    batch_size: int,
    seed: int,
    data_range: Sequence[float] = (-1.0, 1.0),
    dequantize: bool = False,
    random_flip: bool = False,
    process_index: int = 0,
    process_count: int = 1,
) -> dict[str, np.ndarray]:
    """This process's shard of the global batch at ``step``: {"image": (B/P, H, W, C) float32,
    "label": (B/P,) int32}.

    Order, sharding, scaling and dequantisation are as in the module docstring. ``random_flip``
    mirrors each image left-right with probability 1/2 (the CIFAR-10 augmentation of Ho et al. 2020,
    Appendix B). Global row r draws both from its own stream seeded with (seed, AUGMENTATION,
    step, r).
    """
    check_data_range(data_range)
    shard = _shard(
        step=step,
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    indices = _stream_indices(dataset.num_examples, shard.seed, shard.positions)
    images = dataset.images[indices]
    noise = None
    if random_flip or dequantize:
        # Row r's stream gives first its flip coin, then its noise, whichever of them is used.
        streams = [
            _generator(shard.seed, _AUGMENTATION_STREAM, shard.step, row) for row in shard.rows
        ]
        flip_coins = np.array([stream.random() for stream in streams])
        if random_flip:
            flips = flip_coins < 0.5
            images[flips] = images[flips, :, ::-1]
        if dequantize:
            noise = np.stack(
                [stream.random(images.shape[1:], dtype=np.float32) for stream in streams]
            )
    return {
        "image": uint8_to_float(images, data_range, noise),
        "label": dataset.labels[indices].astype(np.int32),
    }


def _checkerboard(rng: np.random.Generator, num: int) -> np.ndarray:
    """Uniform on the 8 "black" cells of a 4 x 4 board of 2 x 2 cells covering [-4, 4]^2: cell
    (i, j), counted from the lower-left corner, is black when i + j is even (FFJORD toy data,
    Grathwohl et al. 2019)."""
    cell = rng.integers(0, 8, size=num)
    column = cell % 4
    row = 2 * (cell // 4) + (cell % 2)  # makes row + column even
    corner = np.stack([column, row], axis=1) * 2.0 - 4.0
    return corner + 2.0 * rng.random((num, 2))


def _two_moons(rng: np.random.Generator, num: int) -> np.ndarray:
    """sklearn's make_moons geometry (unit arcs centred at (0, 0) above and (1, 1/2) below, Gaussian
    noise std 0.1), centred and scaled by 2: arcs of radius 2 centred at (-1, -1/2) (upper) and
    (1, 1/2) (lower), noise std 0.2, within about [-3.6, 3.6] x [-2.1, 2.1]. Each moon has
    probability 1/2."""
    angle = np.pi * rng.random(num)
    lower = rng.random(num) < 0.5
    upper_points = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    lower_points = np.stack([1.0 - np.cos(angle), 0.5 - np.sin(angle)], axis=1)
    points = np.where(lower[:, np.newaxis], lower_points, upper_points)
    points = points + 0.1 * rng.standard_normal((num, 2))
    return 2.0 * (points - np.array([0.5, 0.25]))


def _swiss_roll(rng: np.random.Generator, num: int) -> np.ndarray:
    """The 2-D swiss roll t (cos t, sin t), t ~ U[1.5 pi, 4.5 pi] (sklearn's make_swiss_roll, in
    the plane), scaled by 1 / (1.5 pi) so the radius t / (1.5 pi) runs from 1 to 3, plus Gaussian
    noise std 0.1."""
    turn = np.pi * (1.5 + 3.0 * rng.random(num))
    radius = turn / (1.5 * np.pi)
    points = radius[:, np.newaxis] * np.stack([np.cos(turn), np.sin(turn)], axis=1)
    return points + 0.1 * rng.standard_normal((num, 2))


_TOY_SAMPLERS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "checkerboard": _checkerboard,
    "two_moons": _two_moons,
    "swiss_roll": _swiss_roll,
}


def toy_batch(
    name: str,
    *,
    step: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """This process's shard (B/P, dim) float32 of a fresh global batch of toy points at ``step``.

    ``TOY_DATASETS`` are 2-D and drawn with numpy from SeedSequence(seed, (TOY, step)); the
    ``ORACLE_PRESETS`` are ``diffusion.oracle.preset(name).sample(key, batch_size)`` with
    key = fold_in(key(seed), step). Either way the global batch depends on (seed, step, batch_size)
    only and process p keeps rows [p B/P, (p + 1) B/P).
    """
    _check_choice("toy dataset", name, (*TOY_DATASETS, *ORACLE_PRESETS))
    shard = _shard(
        step=step,
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    if name in ORACLE_PRESETS:
        key = jax.random.fold_in(jax.random.key(shard.seed), shard.step)
        points = np.asarray(oracle.preset(name).sample(key, shard.batch_size))
    else:
        rng = _generator(shard.seed, _TOY_STREAM, shard.step)
        points = _TOY_SAMPLERS[name](rng, shard.batch_size)
    return points[shard.start : shard.stop].astype(np.float32)
