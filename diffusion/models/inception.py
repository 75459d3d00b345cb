"""Inception-v3 as used for FID: the pool3 feature network of the TF graph of 2015-12-05.

Architecture. Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture") up to its
global average pool ("pool3", 2048 features), in the variant FID was defined with (Heusel et al.
2017): the TensorFlow graph ``inception-2015-12-05`` that pytorch-fid re-implements. Its blocks
differ from torchvision's Inception-v3 in two ways, and FID values are only comparable with them:

- every 3x3 stride-1 average pool inside Mixed_5b..5d (InceptionA), Mixed_6b..6e (InceptionC) and
  Mixed_7b (InceptionE) averages over the valid (unpadded) pixels only, as TensorFlow does
  (``count_include_pad=False``; torchvision counts the zero padding);
- the pool branch of the last block, Mixed_7c, uses a 3x3 *max* pool instead of an average pool.

Every convolution has no bias and is followed by batch normalisation (epsilon 1e-3, running
statistics) and a ReLU. Layer names follow torchvision (``Mixed_6b/branch7x7_2/conv``...), which
makes the checkpoint conversion a renaming plus a transposition.

Input. ``inception_pool3_features(variables, images)`` takes NHWC images with values in [-1, 1]
(for uint8 pixels p use p / 127.5 - 1) and 1 or 3 channels (grayscale is repeated to RGB), resizes
them bilinearly to 299x299 without antialiasing (half-pixel centres, edge clamping: what
pytorch-fid's ``F.interpolate(..., mode="bilinear", align_corners=False)`` does), and returns
(batch, 2048) features; it is jitted, call it batch by batch and accumulate the features
with ``diffusion.metrics.update_moments`` and compare with ``diffusion.metrics.frechet_distance``.
The preprocessing is pytorch-fid's; the original TF code resized inside its graph with TF's own
bilinear resize, one reason why pytorch-fid's FIDs differ slightly from the TF ones.

Weights. They cannot be downloaded by this library. Obtain pytorch-fid's port of the TF weights,
``pt_inception-2015-12-05-6726825d.pth`` (released at
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/), and convert them once in
an environment that has PyTorch::

    import numpy as np, torch
    from diffusion.models.inception import convert_pytorch_fid_state_dict, save_inception_params

    state_dict = torch.load("pt_inception-2015-12-05-6726825d.pth", map_location="cpu")
    variables = convert_pytorch_fid_state_dict({k: v.numpy() for k, v in state_dict.items()})
    save_inception_params("inception_fid.npz", variables)

then ``variables = load_inception_params("inception_fid.npz")`` anywhere (no PyTorch needed).

The .npz format: one float32 array per variable, keyed by its Flax path joined with "/", e.g.
``params/Conv2d_1a_3x3/conv/kernel`` (kernel as (kh, kw, in, out)), ``params/<layer>/bn/scale`` and
``params/<layer>/bn/bias`` (BatchNorm gamma and beta), ``batch_stats/<layer>/bn/mean`` and
``batch_stats/<layer>/bn/var`` (running statistics). The final fc layer (1008 classes) is not part
of the pool3 network and is dropped.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import Array
from jax.typing import ArrayLike

INCEPTION_INPUT_SIZE = 299
POOL3_DIM = 2048
# BatchNorm epsilon of the TF graph (and of torchvision's BasicConv2d).
_BATCH_NORM_EPSILON = 1e-3

Variables = Mapping[str, Any]


class ConvBatchNormReLU(nn.Module):
    """Convolution without bias, batch normalisation with running statistics, ReLU."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    # Symmetric zero padding (rows, columns), as in torchvision's ``padding`` argument.
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        pad_rows, pad_cols = self.padding
        hidden = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=((pad_rows, pad_rows), (pad_cols, pad_cols)),
            use_bias=False,
            name="conv",
        )(inputs)
        hidden = nn.BatchNorm(use_running_average=True, epsilon=_BATCH_NORM_EPSILON, name="bn")(
            hidden
        )
        return nn.relu(hidden)


# Factorised "same" convolutions: a 1xk row filter and a kx1 column filter.
_ROW_1X7 = {"kernel_size": (1, 7), "padding": (0, 3)}
_COLUMN_7X1 = {"kernel_size": (7, 1), "padding": (3, 0)}
_ROW_1X3 = {"kernel_size": (1, 3), "padding": (0, 1)}
_COLUMN_3X1 = {"kernel_size": (3, 1), "padding": (1, 0)}


def _average_pool_3x3_valid_pixels(inputs: Array) -> Array:
    """3x3 stride-1 average pool, padding 1, averaging over unpadded pixels (TF behaviour)."""
    return nn.avg_pool(
        inputs, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False
    )


def _max_pool_3x3_stride_2(inputs: Array) -> Array:
    """3x3 stride-2 max pool without padding (grid reductions)."""
    return nn.max_pool(inputs, (3, 3), strides=(2, 2))


def _max_pool_3x3_same(inputs: Array) -> Array:
    """3x3 stride-1 max pool, padding 1 that is never selected (pytorch-fid's FIDInceptionE_2)."""
    return nn.max_pool(inputs, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


class InceptionA(nn.Module):
    """35x35 block (Szegedy et al. 2016, Fig. 5): 1x1, 5x5, double 3x3 and pool branches."""

    pool_features: int

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        branch1x1 = ConvBatchNormReLU(64, (1, 1), name="branch1x1")(inputs)
        branch5x5 = ConvBatchNormReLU(48, (1, 1), name="branch5x5_1")(inputs)
        branch5x5 = ConvBatchNormReLU(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
        branch3x3dbl = ConvBatchNormReLU(64, (1, 1), name="branch3x3dbl_1")(inputs)
        branch3x3dbl = ConvBatchNormReLU(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(
            branch3x3dbl
        )
        branch3x3dbl = ConvBatchNormReLU(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(
            branch3x3dbl
        )
        branch_pool = ConvBatchNormReLU(self.pool_features, (1, 1), name="branch_pool")(
            _average_pool_3x3_valid_pixels(inputs)
        )
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction 35x35 -> 17x17 (Szegedy et al. 2016, Fig. 10)."""

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        branch3x3 = ConvBatchNormReLU(384, (3, 3), strides=2, name="branch3x3")(inputs)
        branch3x3dbl = ConvBatchNormReLU(64, (1, 1), name="branch3x3dbl_1")(inputs)
        branch3x3dbl = ConvBatchNormReLU(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(
            branch3x3dbl
        )
        branch3x3dbl = ConvBatchNormReLU(96, (3, 3), strides=2, name="branch3x3dbl_3")(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3_stride_2(inputs)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Szegedy et al. 2016, Fig. 6)."""

    channels_7x7: int

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        width, row, column = self.channels_7x7, _ROW_1X7, _COLUMN_7X1
        branch1x1 = ConvBatchNormReLU(192, (1, 1), name="branch1x1")(inputs)
        branch7x7 = ConvBatchNormReLU(width, (1, 1), name="branch7x7_1")(inputs)
        branch7x7 = ConvBatchNormReLU(width, **row, name="branch7x7_2")(branch7x7)
        branch7x7 = ConvBatchNormReLU(192, **column, name="branch7x7_3")(branch7x7)
        branch7x7dbl = ConvBatchNormReLU(width, (1, 1), name="branch7x7dbl_1")(inputs)
        branch7x7dbl = ConvBatchNormReLU(width, **column, name="branch7x7dbl_2")(branch7x7dbl)
        branch7x7dbl = ConvBatchNormReLU(width, **row, name="branch7x7dbl_3")(branch7x7dbl)
        branch7x7dbl = ConvBatchNormReLU(width, **column, name="branch7x7dbl_4")(branch7x7dbl)
        branch7x7dbl = ConvBatchNormReLU(192, **row, name="branch7x7dbl_5")(branch7x7dbl)
        branch_pool = ConvBatchNormReLU(192, (1, 1), name="branch_pool")(
            _average_pool_3x3_valid_pixels(inputs)
        )
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """Grid reduction 17x17 -> 8x8 (Szegedy et al. 2016, Fig. 10, with factorised 7x7)."""

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        branch3x3 = ConvBatchNormReLU(192, (1, 1), name="branch3x3_1")(inputs)
        branch3x3 = ConvBatchNormReLU(320, (3, 3), strides=2, name="branch3x3_2")(branch3x3)
        branch7x7x3 = ConvBatchNormReLU(192, (1, 1), name="branch7x7x3_1")(inputs)
        branch7x7x3 = ConvBatchNormReLU(192, **_ROW_1X7, name="branch7x7x3_2")(branch7x7x3)
        branch7x7x3 = ConvBatchNormReLU(192, **_COLUMN_7X1, name="branch7x7x3_3")(branch7x7x3)
        branch7x7x3 = ConvBatchNormReLU(192, (3, 3), strides=2, name="branch7x7x3_4")(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_stride_2(inputs)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block with expanded filter banks (Szegedy et al. 2016, Fig. 7).

    ``max_pool_branch`` selects the FID graph's max pool in the pool branch (Mixed_7c) instead of
    the valid-pixel average pool (Mixed_7b).
    """

    max_pool_branch: bool = False

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        row, column = _ROW_1X3, _COLUMN_3X1
        branch1x1 = ConvBatchNormReLU(320, (1, 1), name="branch1x1")(inputs)
        branch3x3 = ConvBatchNormReLU(384, (1, 1), name="branch3x3_1")(inputs)
        branch3x3 = jnp.concatenate(
            [
                ConvBatchNormReLU(384, **row, name="branch3x3_2a")(branch3x3),
                ConvBatchNormReLU(384, **column, name="branch3x3_2b")(branch3x3),
            ],
            axis=-1,
        )
        branch3x3dbl = ConvBatchNormReLU(448, (1, 1), name="branch3x3dbl_1")(inputs)
        branch3x3dbl = ConvBatchNormReLU(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(
            branch3x3dbl
        )
        branch3x3dbl = jnp.concatenate(
            [
                ConvBatchNormReLU(384, **row, name="branch3x3dbl_3a")(branch3x3dbl),
                ConvBatchNormReLU(384, **column, name="branch3x3dbl_3b")(branch3x3dbl),
            ],
            axis=-1,
        )
        if self.max_pool_branch:
            pooled = _max_pool_3x3_same(inputs)  # FID graph quirk of Mixed_7c
        else:
            pooled = _average_pool_3x3_valid_pixels(inputs)
        branch_pool = ConvBatchNormReLU(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionV3FID(nn.Module):
    """Inception-v3 of the FID graph, from 299x299x3 inputs in [-1, 1] to 2048 pool3 features.

    Spatial sizes for a 299x299 input: 149, 147, 147, pool 73, 73, 71, pool 35 (Mixed_5*),
    17 (Mixed_6*), 8 (Mixed_7*), then the global average pool.
    """

    @nn.compact
    def __call__(self, images: Array) -> Array:
        hidden = ConvBatchNormReLU(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(images)
        hidden = ConvBatchNormReLU(32, (3, 3), name="Conv2d_2a_3x3")(hidden)
        hidden = ConvBatchNormReLU(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(hidden)
        hidden = _max_pool_3x3_stride_2(hidden)
        hidden = ConvBatchNormReLU(80, (1, 1), name="Conv2d_3b_1x1")(hidden)
        hidden = ConvBatchNormReLU(192, (3, 3), name="Conv2d_4a_3x3")(hidden)
        hidden = _max_pool_3x3_stride_2(hidden)
        hidden = InceptionA(pool_features=32, name="Mixed_5b")(hidden)
        hidden = InceptionA(pool_features=64, name="Mixed_5c")(hidden)
        hidden = InceptionA(pool_features=64, name="Mixed_5d")(hidden)
        hidden = InceptionB(name="Mixed_6a")(hidden)
        hidden = InceptionC(channels_7x7=128, name="Mixed_6b")(hidden)
        hidden = InceptionC(channels_7x7=160, name="Mixed_6c")(hidden)
        hidden = InceptionC(channels_7x7=160, name="Mixed_6d")(hidden)
        hidden = InceptionC(channels_7x7=192, name="Mixed_6e")(hidden)
        hidden = InceptionD(name="Mixed_7a")(hidden)
        hidden = InceptionE(name="Mixed_7b")(hidden)
        hidden = InceptionE(max_pool_branch=True, name="Mixed_7c")(hidden)
        return hidden.mean(axis=(1, 2))  # pool3


def resize_for_inception(images: ArrayLike) -> Array:
    """Bring NHWC images in [-1, 1] with 1 or 3 channels to (batch, 299, 299, 3).

    Bilinear interpolation with half-pixel centres, edge clamping and no antialiasing, i.e.
    PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)`` used by pytorch-fid.
    Grayscale images are repeated over the three colour channels.
    """
    images = jnp.asarray(images, dtype=jnp.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"images must be NHWC with 1 or 3 channels; got shape {tuple(images.shape)}"
        )
    batch, height, width, channels = images.shape
    if (height, width) != (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE):
        images = jax.image.resize(
            images,
            (batch, INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE, channels),
            method="bilinear",
            antialias=False,
        )
    return jnp.broadcast_to(images, (*images.shape[:3], 3))


@jax.jit
def inception_pool3_features(variables: Variables, images: ArrayLike) -> Array:
    """(batch, 2048) pool3 features of NHWC images in [-1, 1] (resized to 299x299 RGB first)."""
    return InceptionV3FID().apply(variables, resize_for_inception(images))


@functools.cache
def inception_variable_shapes() -> dict[str, tuple[int, ...]]:
    """Flat "collection/layer/.../name" -> shape of every variable of ``InceptionV3FID``.

    Computed abstractly with ``jax.eval_shape`` (no 299x299 forward pass).
    """
    abstract = jax.eval_shape(
        InceptionV3FID().init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE, 3), jnp.float32),
    )
    return {
        key: tuple(leaf.shape)
        for key, leaf in traverse_util.flatten_dict(abstract, sep="/").items()
    }


def _validated_variables(flat_arrays: Mapping[str, np.ndarray], source: str) -> dict[str, Any]:
    """Check a flat path -> array mapping against the model and nest it into Flax variables."""
    expected = inception_variable_shapes()
    missing = sorted(set(expected) - set(flat_arrays))
    unexpected = sorted(set(flat_arrays) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match InceptionV3FID: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
    wrong_shapes = {
        key: (tuple(np.shape(array)), expected[key])
        for key, array in flat_arrays.items()
        if tuple(np.shape(array)) != expected[key]
    }
    if wrong_shapes:
        raise ValueError(f"{source} has arrays of the wrong shape (got, expected): {wrong_shapes}")
    return traverse_util.unflatten_dict(
        {key: jnp.asarray(array, dtype=jnp.float32) for key, array in flat_arrays.items()},
        sep="/",
    )


def save_inception_params(path: str | os.PathLike, variables: Variables) -> None:
    """Write Inception variables to an .npz file in the layout described in the module docstring."""
    flat = traverse_util.flatten_dict(dict(variables), sep="/")
    _validated_variables(flat, "variables")
    np.savez(path, **{key: np.asarray(array, dtype=np.float32) for key, array in flat.items()})


def load_inception_params(path: str | os.PathLike) -> dict[str, Any]:
    """Read Inception variables ({"params", "batch_stats"}) from an .npz file (see module doc)."""
    with np.load(path) as archive:
        flat = {key: archive[key] for key in archive.files}
    return _validated_variables(flat, f"Inception weights file {os.fspath(path)!r}")


# PyTorch BatchNorm2d names -> (Flax collection, Flax name).
_TORCH_BATCH_NORM_NAMES = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
# Entries of the pytorch-fid checkpoint that the pool3 network does not use.
_TORCH_IGNORED_NAMES = ("fc.weight", "fc.bias")


def convert_pytorch_fid_state_dict(state_dict: Mapping[str, ArrayLike]) -> dict[str, Any]:
    """Convert pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` state dict to Flax variables.

    ``state_dict`` maps torchvision-style names to NumPy arrays (``{k: v.numpy() for k, v in
    torch.load(path).items()}``). ``<layer>.conv.weight`` (out, in, kh, kw) becomes
    ``params/<layer>/conv/kernel`` (kh, kw, in, out); ``<layer>.bn.{weight, bias, running_mean,
    running_var}`` become ``params/<layer>/bn/{scale, bias}`` and
    ``batch_stats/<layer>/bn/{mean, var}``; ``fc.*`` and ``num_batches_tracked`` are dropped.
    Raises ValueError naming any key that is missing, unexpected or of the wrong shape.
    """
    flat: dict[str, np.ndarray] = {}
    unknown = []
    for torch_name, value in state_dict.items():
        if torch_name in _TORCH_IGNORED_NAMES or torch_name.endswith(".num_batches_tracked"):
            continue
        parts = torch_name.split(".")
        array = np.asarray(value, dtype=np.float32)
        if len(parts) < 3:  # every network entry is <module path>.<conv|bn>.<variable>
            unknown.append(torch_name)
            continue
        layer, layer_kind, variable = "/".join(parts[:-2]), parts[-2], parts[-1]
        if layer_kind == "conv" and variable == "weight" and array.ndim == 4:
            flat[f"params/{layer}/conv/kernel"] = array.transpose(2, 3, 1, 0)
        elif layer_kind == "bn" and variable in _TORCH_BATCH_NORM_NAMES:
            collection, flax_name = _TORCH_BATCH_NORM_NAMES[variable]
            flat[f"{collection}/{layer}/bn/{flax_name}"] = array
        else:
            unknown.append(torch_name)
    if unknown:
        raise ValueError(
            f"state_dict has entries that are not part of the FID Inception network: {unknown[:5]} "
            f"({len(unknown)} in all); expected pytorch-fid's pt_inception-2015-12-05 checkpoint"
        )
    return _validated_variables(flat, "state_dict")
