"""Tests of diffusion.models.layers: the kernel gradient as shifted matmuls against XLA's own
gradient (float64 tight, float32 at its rounding level), the convolution with that gradient under
jit, vmap and a whole U-Net's loss, and Dense / Conv / GroupNorm against their flax.linen
namesakes (same parameter trees, same initial values, same outputs and gradients)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion.models import UNet, layers

# (image H, W, C_in, C_out, kernel, stride, padding): every convolution the U-Net and the classifier
# use (3x3 'SAME' at stride 1 and 2 on even and odd sizes, the 4x4 stride-2 stem, 1x1) plus 'VALID'
# and explicit asymmetric pads.
CONV_CASES = [
    ((8, 8, 3, 5), (3, 3), (1, 1), "SAME"),
    ((8, 8, 4, 4), (3, 3), (2, 2), "SAME"),  # Downsample, even size: pads (0, 1)
    ((7, 7, 4, 4), (3, 3), (2, 2), "SAME"),  # Downsample, odd size: pads (1, 1)
    ((8, 8, 1, 6), (4, 4), (2, 2), "SAME"),  # the classifier's stem
    ((6, 5, 3, 2), (1, 1), (1, 1), "SAME"),
    ((7, 6, 2, 3), (3, 2), (1, 2), "VALID"),
    ((6, 6, 2, 3), (3, 3), (1, 1), ((2, 0), (1, 2))),
]
CASE_IDS = ["3x3", "3x3-s2-even", "3x3-s2-odd", "4x4-s2", "1x1", "valid", "explicit-pads"]


def conv_inputs(image_shape, kernel_size, strides, padding, dtype, batch=3, seed=0):
    height, width, in_channels, out_channels = image_shape
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, height, width, in_channels)), dtype)
    kernel = jnp.asarray(rng.standard_normal((*kernel_size, in_channels, out_channels)), dtype)
    pads = layers.explicit_padding((height, width), kernel_size, strides, padding)
    output_shape = jax.eval_shape(lambda: layers.xla_conv(x, kernel, strides, pads)).shape
    cotangent = jnp.asarray(rng.standard_normal(output_shape), dtype)
    return x, kernel, cotangent, pads


def xla_kernel_grad(x, kernel, cotangent, strides, pads):
    _, vjp = jax.vjp(lambda weights: layers.xla_conv(x, weights, strides, pads), kernel)
    return vjp(cotangent)[0]


@pytest.mark.parametrize(
    ("image_shape", "kernel_size", "strides", "padding"), CONV_CASES, ids=CASE_IDS
)
def test_shifted_matmul_kernel_grad_equals_xla_in_float64(
    x64, image_shape, kernel_size, strides, padding
):
    x, kernel, cotangent, pads = conv_inputs(
        image_shape, kernel_size, strides, padding, jnp.float64
    )
    expected = xla_kernel_grad(x, kernel, cotangent, strides, pads)
    actual = layers.shifted_matmul_weight_grad(x, cotangent, kernel_size, strides, pads)
    assert actual.shape == kernel.shape and actual.dtype == jnp.float64
    # Same sums in another order: float64 rounding, ~1e-16 relative per term.
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("image_shape", "kernel_size", "strides", "padding"), CONV_CASES, ids=CASE_IDS
)
def test_conv_gradients_equal_xla_in_float32_under_jit(image_shape, kernel_size, strides, padding):
    x, kernel, cotangent, pads = conv_inputs(
        image_shape, kernel_size, strides, padding, jnp.float32
    )

    def loss(conv):
        return lambda x, kernel: jnp.vdot(conv(x, kernel, strides, pads), cotangent)

    expected = jax.jit(jax.grad(loss(layers.xla_conv), argnums=(0, 1)))(x, kernel)
    actual = jax.jit(jax.grad(loss(layers.conv_with_matmul_weight_grad), argnums=(0, 1)))(x, kernel)
    # Sums of at most a few hundred float32 products of N(0, 1) numbers: rounding ~1e-6 relative
    # to the sum of magnitudes, so 1e-5 of the largest entry.
    for got, want in zip(actual, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()))
    forward = layers.conv_with_matmul_weight_grad(x, kernel, strides, pads)
    np.testing.assert_array_equal(forward, layers.xla_conv(x, kernel, strides, pads))


def test_conv_with_matmul_weight_grad_uses_matmuls_on_cpu():
    # On CPU the kernel gradient is lowered as one dot_general per tap (9 for 3x3), on top of the
    # loss's own dot (the vdot); XLA's gradient is one convolution.
    x, kernel, cotangent, pads = conv_inputs((8, 8, 3, 4), (3, 3), (1, 1), "SAME", jnp.float32)

    def count_ops(conv):
        grad = jax.grad(lambda k: jnp.vdot(conv(x, k, (1, 1), pads), cotangent))
        text = jax.jit(grad).lower(kernel).as_text()
        return text.count("stablehlo.convolution"), text.count("stablehlo.dot_general")

    assert count_ops(layers.xla_conv) == (1, 1)
    _, dots = count_ops(layers.conv_with_matmul_weight_grad)
    assert dots == 1 + 9


def test_conv_with_matmul_weight_grad_under_vmap(x64):
    # Per-example kernel gradients (vmap over the batch of grad) equal XLA's.
    x, kernel, cotangent, pads = conv_inputs((6, 6, 2, 3), (3, 3), (2, 2), "SAME", jnp.float64)

    def per_example(conv):
        def grad_one(image, target):
            return jax.grad(lambda k: jnp.vdot(conv(image[None], k, (2, 2), pads), target[None]))(
                kernel
            )

        return jax.vmap(grad_one)(x, cotangent)

    np.testing.assert_allclose(
        per_example(layers.conv_with_matmul_weight_grad),
        per_example(layers.xla_conv),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.slow  # two float64 U-Net gradient compiles: ~15 s on a quiet 2-core CPU
def test_unet_loss_gradient_same_with_shifted_matmul_kernel_grads(x64):
    # The whole network's gradient (stride-2 Downsample, 1x1 shortcuts, attention) in float64.
    settings = {"ch": 8, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (4,)}
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1), jnp.float64)
    t = jnp.array([3.0, 500.0])
    xla_model = UNet(**settings)
    matmul_model = UNet(**settings, conv_weight_grad="shifted_matmul")
    # Random parameters, non-zero everywhere (zero-initialised convs would hide their inputs'
    # gradients), drawn on the host: no init compile.
    rng = np.random.default_rng(2)
    params = jax.tree.map(
        lambda leaf: jnp.asarray(0.1 * rng.standard_normal(leaf.shape), jnp.float64),
        jax.eval_shape(xla_model.init, jax.random.key(1), x, t),
    )

    def grads(model):
        loss = lambda params: jnp.mean((model.apply(params, x, t) - x) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    expected, actual = grads(xla_model), grads(matmul_model)
    assert jax.tree.structure(expected) == jax.tree.structure(actual)
    for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_conv_rejects_unknown_weight_grad():
    with pytest.raises(ValueError, match="weight_grad"):
        layers.Conv(4, weight_grad="fft")


# ----------------------------------------------------------------------------- flax namesakes


def init_and_apply(module, x):
    """Compiled (one program each, not op by op) init and apply. RngBitGenerator keys compile
    several times faster than threefry on CPU; both modules get the same key."""
    variables = jax.jit(module.init)(jax.random.key(0, impl="rbg"), x)
    return variables, jax.jit(module.apply)(variables, x)


def assert_same_tree(ours, theirs):
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for leaf, other in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(leaf, other)  # same names and rng paths: identical draws


@pytest.mark.parametrize("shape", [(2, 5, 5, 6), (3, 7, 6)])
def test_dense_matches_flax_dense(shape):
    x = jax.random.normal(jax.random.key(1), shape)
    ours, ours_out = init_and_apply(layers.Dense(4), x)
    theirs, theirs_out = init_and_apply(nn.Dense(4), x)
    assert_same_tree(ours, theirs)
    np.testing.assert_allclose(ours_out, theirs_out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("kernel_size", "strides", "weight_grad"),
    [((3, 3), (1, 1), "xla"), ((3, 3), (2, 2), "shifted_matmul"), ((4, 4), (2, 2), "xla")],
)
def test_conv_matches_flax_conv(kernel_size, strides, weight_grad):
    x = jax.random.normal(jax.random.key(1), (2, 7, 7, 3))
    ours, ours_out = init_and_apply(
        layers.Conv(5, kernel_size, strides, weight_grad=weight_grad), x
    )
    theirs, theirs_out = init_and_apply(nn.Conv(5, kernel_size, strides), x)
    assert_same_tree(ours, theirs)
    np.testing.assert_allclose(ours_out, theirs_out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "groups"), [((2, 5, 5, 12), 4), ((2, 6, 8), 8), ((3, 4, 4, 6), 1)]
)
def test_group_norm_matches_flax_group_norm(x64, shape, groups):
    # Data with a non-zero mean and unequal channel scales, in float64: exact up to rounding.
    rng = np.random.default_rng(0)
    x = jnp.asarray(3.0 + rng.standard_normal(shape) * rng.uniform(0.5, 2.0, shape[-1]))
    cotangent = jnp.asarray(rng.standard_normal(shape))
    ours_module = layers.GroupNorm(num_groups=groups, epsilon=1e-6)
    theirs_module = nn.GroupNorm(num_groups=groups, epsilon=1e-6)
    ours, ours_out = init_and_apply(ours_module, x)
    theirs, theirs_out = init_and_apply(theirs_module, x)
    assert_same_tree(ours, theirs)
    np.testing.assert_allclose(ours_out, theirs_out, rtol=1e-12, atol=1e-12)
    # Gradients with respect to input, scale and bias, at non-trivial scale and bias.
    params = {"params": {"scale": 1.0 + x[0, ..., 0].mean() * jnp.arange(shape[-1]) / 10.0}}
    params["params"]["bias"] = jnp.linspace(-1.0, 1.0, shape[-1])

    def grads(module):
        loss = lambda p, x: jnp.vdot(module.apply(p, x), cotangent)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    for got, want in zip(
        jax.tree.leaves(grads(ours_module)), jax.tree.leaves(grads(theirs_module)), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_group_norm_normalises_each_group():
    # Independent of flax: every (example, group) has mean 0 and variance 1 / (1 + eps / var).
    x = 2.0 + 3.0 * jax.random.normal(jax.random.key(0), (2, 4, 4, 6))
    _, y = init_and_apply(layers.GroupNorm(num_groups=3, epsilon=1e-6), x)
    groups = np.asarray(y).reshape(2, 16, 3, 2).transpose(0, 2, 1, 3).reshape(2, 3, -1)
    np.testing.assert_allclose(groups.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(groups.var(-1), 1.0, atol=1e-5)


def test_group_norm_rejects_groups_not_dividing_channels():
    with pytest.raises(ValueError, match="num_groups"):
        init_and_apply(layers.GroupNorm(num_groups=4), jnp.ones((1, 2, 2, 6)))
