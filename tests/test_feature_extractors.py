"""Tests of the feature extractors: the small CNN classifier and the FID Inception-v3."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from diffusion.models import classifier, inception

# --- CNN classifier ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "convs_per_stage"), [(8, 1), pytest.param(28, 2, marks=pytest.mark.slow)]
)
def test_classifier_output_shapes(size, convs_per_stage):
    model = classifier.CNNClassifier(
        num_classes=7, channels=(8, 16, 32), convs_per_stage=convs_per_stage, feature_dim=24
    )
    images = jnp.zeros((3, size, size, 1))
    variables = jax.jit(model.init)(jax.random.key(0), images)
    logits, features = jax.jit(model.apply)(variables, images)
    assert logits.shape == (3, 7)
    assert features.shape == (3, 24)
    assert classifier.classifier_for_params(variables["params"]) == model


def _synthetic_stripes(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """8x8 images in [-1, 1]: a bright row band (class 0), column band (1) or diagonal (2)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, count)
    images = np.full((count, 8, 8), -1.0)
    offsets = rng.integers(0, 6, count)
    for index, (label, offset) in enumerate(zip(labels, offsets, strict=True)):
        if label == 0:
            images[index, offset : offset + 3, :] = 1.0
        elif label == 1:
            images[index, :, offset : offset + 3] = 1.0
        else:
            images[index][np.eye(8, k=offset - 3, dtype=bool)] = 1.0
    images += 0.3 * rng.standard_normal(images.shape)
    return images[..., None].astype(np.float32), labels.astype(np.int32)


@pytest.mark.slow
def test_classifier_learns_separable_synthetic_problem():
    train_images, train_labels = _synthetic_stripes(0, 600)
    test_images, test_labels = _synthetic_stripes(1, 300)
    params = classifier.train_classifier(
        train_images,
        train_labels,
        num_classes=3,
        steps=100,
        batch_size=32,
        learning_rate=3e-3,
        seed=0,
        channels=(8, 16),
        feature_dim=16,
        max_shift=1,
    )
    # Chance level is 1/3; the classes differ in an orientation any 3x3 filter bank sees.
    assert classifier.classifier_accuracy(params, test_images, test_labels) >= 0.95
    logits, features = classifier.classifier_logits_and_features(
        params, test_images, batch_size=128
    )
    assert logits.shape == (300, 3)
    assert features.shape == (300, 16)


def test_random_shift_is_a_translation_with_background_fill():
    images = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (16, 5, 6, 1)), jnp.float32)
    shifted = np.asarray(classifier.random_shift(jax.random.key(3), images, max_shift=1))
    padded = np.pad(np.asarray(images), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    offsets_seen = set()
    for index in range(images.shape[0]):
        matches = [
            (row, col)
            for row in range(3)
            for col in range(3)
            if np.array_equal(shifted[index], padded[index, row : row + 5, col : col + 6])
        ]
        assert len(matches) == 1
        offsets_seen.add(matches[0])
    assert len(offsets_seen) > 3  # the offsets are random, not one fixed translation


def test_train_classifier_rejects_out_of_range_labels():
    images = np.zeros((4, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        classifier.train_classifier(
            images,
            np.array([0, 1, 2, 3]),
            num_classes=3,
            steps=1,
            batch_size=2,
            learning_rate=1e-3,
            seed=0,
        )


# --- Inception-v3 (FID) --------------------------------------------------------------------------

# torchvision's Inception-v3 has 27,161,264 parameters (torchvision docs, Inception_V3_Weights,
# num_params). The FID pool3 network has neither its auxiliary classifier nor its final fc layer;
# both are counted here from their layer shapes in torchvision (conv + BatchNorm scale and bias).
TORCHVISION_INCEPTION_V3_PARAMS = 27_161_264
AUX_CLASSIFIER_PARAMS = (768 * 128 + 2 * 128) + (128 * 768 * 5 * 5 + 2 * 768) + (768 * 1000 + 1000)
FINAL_FC_PARAMS = 2048 * 1000 + 1000


def test_inception_parameter_count_and_layer_shapes():
    shapes = inception.inception_variable_shapes()
    num_params = sum(int(np.prod(shape)) for key, shape in shapes.items() if key[:7] == "params/")
    expected = TORCHVISION_INCEPTION_V3_PARAMS - AUX_CLASSIFIER_PARAMS - FINAL_FC_PARAMS
    assert num_params == expected == 21_785_568
    # 94 conv layers, each with a BatchNorm: kernel, scale, bias, mean, var.
    assert len(shapes) == 94 * 5
    assert shapes["params/Conv2d_1a_3x3/conv/kernel"] == (3, 3, 3, 32)
    assert shapes["params/Mixed_6b/branch7x7_2/conv/kernel"] == (1, 7, 128, 128)
    assert shapes["params/Mixed_7c/branch_pool/conv/kernel"] == (1, 1, 2048, 192)
    assert shapes["batch_stats/Mixed_7c/branch_pool/bn/var"] == (192,)


def test_inception_pools_ignore_padding_like_tensorflow():
    # FID-graph quirks (pytorch-fid's FIDInception* blocks): the 3x3 average pools divide by the
    # number of unpadded pixels, so a constant image stays constant at the borders (counting the
    # padding would give 4/9 in the corners); the padded max pool never picks the padding.
    ones = jnp.ones((1, 5, 5, 2))
    np.testing.assert_allclose(inception._average_pool_3x3_valid_pixels(ones), ones, rtol=1e-6)
    negative = -1.0 - jnp.arange(25.0).reshape(1, 5, 5, 1)
    pooled = np.asarray(inception._max_pool_3x3_same(negative))[0, :, :, 0]
    grid = np.asarray(negative)[0, :, :, 0]
    assert pooled[0, 0] == grid[:2, :2].max() == -1.0  # a zero pad would give 0
    assert pooled[2, 2] == grid[1:4, 1:4].max()


def _random_inception_variables(seed: int) -> dict:
    """Random variables with He-scaled kernels and non-trivial BatchNorm statistics."""
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in inception.inception_variable_shapes().items():
        name = key.rsplit("/", 1)[-1]
        if name == "kernel":
            fan_in = np.prod(shape[:3])
            flat[key] = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif name in ("scale", "var"):
            flat[key] = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            flat[key] = 0.1 * rng.standard_normal(shape)
    return traverse_util.unflatten_dict(
        {key: jnp.asarray(value, jnp.float32) for key, value in flat.items()}, sep="/"
    )


@pytest.fixture(scope="module")
def inception_variables():
    return _random_inception_variables(0)


@pytest.fixture(scope="module")
def small_images():
    # Two 28x28 grayscale images in [-1, 1], resized and repeated to 299x299x3 by the network.
    return jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 28, 28, 1)), jnp.float32)


@pytest.fixture(scope="module")
def inception_features(inception_variables, small_images):
    return np.asarray(inception.inception_pool3_features(inception_variables, small_images))


def test_inception_features_shape_and_determinism(
    inception_variables, small_images, inception_features
):
    assert inception_features.shape == (2, inception.POOL3_DIM)
    assert np.all(np.isfinite(inception_features))
    assert np.all(inception_features >= 0)  # average of ReLU outputs
    assert not np.allclose(inception_features[0], inception_features[1])
    again = np.asarray(inception.inception_pool3_features(inception_variables, small_images))
    np.testing.assert_array_equal(again, inception_features)


def test_inception_npz_round_trip(tmp_path, inception_variables, small_images, inception_features):
    path = tmp_path / "inception_fid.npz"
    inception.save_inception_params(path, inception_variables)
    loaded = inception.load_inception_params(path)
    features = np.asarray(inception.inception_pool3_features(loaded, small_images))
    np.testing.assert_array_equal(features, inception_features)


def test_load_inception_params_rejects_incomplete_file(tmp_path):
    path = tmp_path / "partial.npz"
    np.savez(path, **{"params/Conv2d_1a_3x3/conv/kernel": np.zeros((3, 3, 3, 32), np.float32)})
    with pytest.raises(ValueError, match="missing"):
        inception.load_inception_params(path)


def _torch_layout_state_dict(variables: dict) -> dict[str, np.ndarray]:
    """What pytorch-fid's checkpoint holds for these variables (torchvision names and layouts)."""
    flat = traverse_util.flatten_dict(variables, sep="/")
    torch_names = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    state_dict = {}
    for key, value in flat.items():
        _, *layer, kind, name = key.split("/")
        prefix = ".".join(layer)
        if kind == "conv":
            state_dict[f"{prefix}.conv.weight"] = np.asarray(value).transpose(3, 2, 0, 1)
        else:
            state_dict[f"{prefix}.bn.{torch_names[name]}"] = np.asarray(value)
            state_dict[f"{prefix}.bn.num_batches_tracked"] = np.array(0)
    state_dict["fc.weight"] = np.zeros((1008, 2048), np.float32)
    state_dict["fc.bias"] = np.zeros((1008,), np.float32)
    return state_dict


def test_convert_pytorch_fid_state_dict_restores_variables(inception_variables):
    state_dict = _torch_layout_state_dict(inception_variables)
    converted = inception.convert_pytorch_fid_state_dict(state_dict)
    jax.tree.map(np.testing.assert_array_equal, converted, inception_variables)
    with pytest.raises(ValueError, match="AuxLogits"):
        inception.convert_pytorch_fid_state_dict(
            {**state_dict, "AuxLogits.fc.weight": np.zeros((1000, 768))}
        )


def test_converted_conv_bn_layer_matches_pytorch_semantics():
    # PyTorch: y = relu(gamma (conv(x) - running_mean) / sqrt(running_var + eps) + beta), conv a
    # cross-correlation of NCHW x with (out, in, kh, kw) weights. Written out in NumPy for a 1x7
    # kernel, whose transposition mistakes (kh <-> kw, in <-> out) would all change the result.
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((5, 3, 1, 7)).astype(np.float32)
    gamma, beta, running_mean = rng.standard_normal((3, 5)).astype(np.float32)
    running_var = rng.uniform(0.5, 2.0, 5).astype(np.float32)
    inputs_nchw = rng.standard_normal((2, 3, 4, 9)).astype(np.float32)

    padded = np.pad(inputs_nchw, ((0, 0), (0, 0), (0, 0), (3, 3)))
    conv = np.zeros((2, 5, 4, 9))
    for dx in range(7):
        conv += np.einsum("oi,nihw->nohw", weight[:, :, 0, dx], padded[:, :, :, dx : dx + 9])
    bn = (conv - running_mean[:, None, None]) / np.sqrt(running_var[:, None, None] + 1e-3)
    expected_nchw = np.maximum(gamma[:, None, None] * bn + beta[:, None, None], 0.0)

    state_dict = _torch_layout_state_dict(_random_inception_variables(5))
    prefix = "Mixed_6b.branch7x7_2"
    state_dict.update(
        {
            f"{prefix}.conv.weight": np.pad(weight, ((0, 123), (0, 125), (0, 0), (0, 0))),
            f"{prefix}.bn.weight": np.pad(gamma, (0, 123)),
            f"{prefix}.bn.bias": np.pad(beta, (0, 123)),
            f"{prefix}.bn.running_mean": np.pad(running_mean, (0, 123)),
            f"{prefix}.bn.running_var": np.pad(running_var, (0, 123), constant_values=1.0),
        }
    )
    converted = inception.convert_pytorch_fid_state_dict(state_dict)
    layer_variables = {
        collection: converted[collection]["Mixed_6b"]["branch7x7_2"]
        for collection in ("params", "batch_stats")
    }
    layer = inception.ConvBatchNormReLU(128, (1, 7), padding=(0, 3))
    inputs_nhwc = np.pad(inputs_nchw.transpose(0, 2, 3, 1), ((0, 0), (0, 0), (0, 0), (0, 125)))
    outputs = np.asarray(layer.apply(layer_variables, jnp.asarray(inputs_nhwc)))
    np.testing.assert_allclose(outputs[..., :5], expected_nchw.transpose(0, 2, 3, 1), atol=1e-4)


def _bilinear_align_corners_false(images: np.ndarray, size: int) -> np.ndarray:
    """PyTorch F.interpolate(mode="bilinear", align_corners=False) on NHWC, written out."""

    def axis_weights(in_size: int) -> np.ndarray:
        # Source coordinate of output pixel j: (j + 0.5) in/out - 0.5, clamped below at 0.
        source = np.maximum((np.arange(size) + 0.5) * in_size / size - 0.5, 0.0)
        lower = np.floor(source).astype(int)
        upper = np.minimum(lower + 1, in_size - 1)
        fraction = source - lower
        matrix = np.zeros((size, in_size))
        np.add.at(matrix, (np.arange(size), lower), 1 - fraction)
        np.add.at(matrix, (np.arange(size), upper), fraction)
        return matrix

    rows, cols = axis_weights(images.shape[1]), axis_weights(images.shape[2])
    return np.einsum("yh,xw,nhwc->nyxc", rows, cols, images, optimize=True)


@pytest.mark.parametrize(("in_size", "channels"), [(28, 1), (8, 3), (400, 3)])
def test_resize_for_inception_matches_pytorch_bilinear(in_size, channels):
    images = np.random.default_rng(6).uniform(-1, 1, (1, in_size, in_size, channels))
    resized = np.asarray(inception.resize_for_inception(images))
    expected = _bilinear_align_corners_false(images, 299)
    assert resized.shape == (1, 299, 299, 3)
    # float32 source coordinates are off by ~in_size * 6e-8 pixels: ~5e-5 at in_size = 400.
    np.testing.assert_allclose(resized, np.broadcast_to(expected, resized.shape), atol=2e-4)


def test_resize_for_inception_rejects_bad_channels():
    with pytest.raises(ValueError, match="1 or 3 channels"):
        inception.resize_for_inception(np.zeros((1, 8, 8, 2)))
