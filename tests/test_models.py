"""Tests of diffusion.models: shapes, parameter counts against hand formulas and Ho et al. 2020,
zero initialisation, dropout, skip rescaling, sigma scaling, embeddings and resampling."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion.models import (
    MLP,
    AttentionBlock,
    ConditioningEmbedding,
    Downsample,
    ResnetBlock,
    UNet,
    Upsample,
    gaussian_fourier_features,
    sinusoidal_embedding,
)
from diffusion.models.unet import group_norm_groups

TINY_UNET = {"ch": 8, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (4,)}
TINY_IMAGES = (2, 8, 8, 1)
# One level (no resampling, which the shape tests cover; attention in the middle only) keeps the
# compiles of the behaviour tests short.
ONE_LEVEL_UNET = {"ch": 8, "ch_mult": (1,), "num_res_blocks": 1, "attn_resolutions": ()}
# Threefry key generation is slow to compile on CPU (a model init takes tens of seconds); the
# XLA RngBitGenerator keys compile several times faster and do not change what is tested.
INIT_KEY = jax.random.key(0, impl="rbg")


def count_params(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def random_params(model, *inputs, seed: int = 1, scale: float = 0.1):
    """Parameters of the model's shapes drawn i.i.d. N(0, scale^2) on the host (no init compile),
    so that the zero-initialised layers are non-zero."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda leaf: jnp.asarray(scale * rng.standard_normal(leaf.shape), jnp.float32), shapes
    )


def image_batch(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def output_shape(model, *inputs) -> tuple[int, ...]:
    """Shape of model(*inputs) at init, by abstract evaluation (exact shapes, no compile)."""
    output, _ = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), *inputs))
    return output.shape


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("shape", "ch_mult", "attn_resolutions"),
    [
        ((2, 8, 8, 1), (1, 2), (4,)),
        ((2, 28, 28, 1), (1, 2, 2), (7,)),
        ((2, 28, 28, 1), (1, 2, 2, 2), (7, 4)),  # 28 -> 14 -> 7 -> 4 and back
        ((2, 32, 32, 3), (1, 2, 2, 2), (16,)),
    ],
)
def test_unet_output_shape_equals_input_shape(shape, ch_mult, attn_resolutions):
    model = UNet(ch=8, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=attn_resolutions)
    assert output_shape(model, jnp.zeros(shape), jnp.array([3.0, 500.0])) == shape


@pytest.mark.slow
def test_unet_runs_through_odd_sizes():
    # One real forward pass through the 28 -> 14 -> 7 -> 4 path (pooling resampling).
    model = UNet(ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(7,))
    model = model.clone(resamp_with_conv=False)
    x = image_batch((1, 28, 28, 1))
    params = random_params(model, x, jnp.zeros((1,)))
    output = jax.jit(model.apply)({"params": params}, x, jnp.array([10.0]))
    assert output.shape == x.shape
    assert np.all(np.isfinite(np.asarray(output)))


@pytest.mark.parametrize("dim", [2, 64])
def test_mlp_output_shape_equals_input_shape(dim):
    model = MLP(width=32, num_blocks=2, embedding_dim=16)
    assert output_shape(model, jnp.zeros((5, dim)), jnp.linspace(0.0, 1.0, 5)) == (5, dim)


def test_downsample_odd_size_and_upsample_restore_skip_shape():
    x = image_batch((1, 7, 7, 2))
    pooled = Downsample(with_conv=False).apply({}, x)
    assert pooled.shape == (1, 4, 4, 2)
    # 'SAME' 2x2 average ignoring padding: interior window and the lone corner pixel.
    np.testing.assert_allclose(pooled[0, 0, 0], x[0, :2, :2].mean(axis=(0, 1)), rtol=1e-6)
    np.testing.assert_allclose(pooled[0, 3, 3], x[0, 6, 6], rtol=1e-6)
    assert output_shape(Downsample(with_conv=True), x) == (1, 4, 4, 2)

    upsampled = Upsample(with_conv=False).apply({}, pooled, (7, 7))
    rows = np.arange(7) // 2  # nearest neighbour: output pixel i reads input pixel i // 2
    np.testing.assert_array_equal(upsampled[0], np.asarray(pooled[0])[rows][:, rows])
    assert output_shape(Upsample(with_conv=True), pooled, (7, 7)) == (1, 7, 7, 2)


# ----------------------------------------------------------------------------- parameter counts


def test_ddpm_cifar10_parameter_count_matches_ho_et_al():
    # Ho et al. 2020, App. B: CIFAR-10 model has 35.7M parameters; their release counts 35,746,307.
    model = UNet(
        ch=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
        resamp_with_conv=True,
        embedding_type="positional",
    )
    variables = jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,))
    )
    assert set(variables) == {"params"}
    assert count_params(variables["params"]) == 35_746_307


def conv3x3_count(c_in: int, c_out: int) -> int:
    return 9 * c_in * c_out + c_out


def dense_count(c_in: int, c_out: int) -> int:
    return c_in * c_out + c_out


def group_norm_count(channels: int) -> int:
    return 2 * channels  # scale and offset


def res_block_count(c_in: int, c_out: int, embedding_width: int) -> int:
    shortcut = dense_count(c_in, c_out) if c_in != c_out else 0
    return (
        group_norm_count(c_in)
        + conv3x3_count(c_in, c_out)
        + dense_count(embedding_width, c_out)
        + group_norm_count(c_out)
        + conv3x3_count(c_out, c_out)
        + shortcut
    )


def attention_count(channels: int) -> int:
    return group_norm_count(channels) + 4 * dense_count(channels, channels)  # q, k, v, out


@pytest.mark.parametrize("num_classes", [None, 10])
def test_tiny_unet_parameter_count_matches_hand_formula(num_classes):
    # 8x8x1 input, ch=8, ch_mult=(1, 2), one block per level, attention at 4x4; widths 8 / 16.
    embedding_width = 4 * 8
    expected = (
        dense_count(8, embedding_width)  # time MLP on the 8 sinusoidal features
        + dense_count(embedding_width, embedding_width)
        + (0 if num_classes is None else (num_classes + 1) * embedding_width)  # + null label
        + conv3x3_count(1, 8)  # input conv; skip 8 @ 8x8
        + res_block_count(8, 8, embedding_width)  # level 0; skip 8 @ 8x8
        + conv3x3_count(8, 8)  # downsample; skip 8 @ 4x4
        + res_block_count(8, 16, embedding_width)  # level 1; skip 16 @ 4x4
        + attention_count(16)
        + 2 * res_block_count(16, 16, embedding_width)  # middle
        + attention_count(16)
        + res_block_count(16 + 16, 16, embedding_width)  # up level 1
        + attention_count(16)
        + res_block_count(16 + 8, 16, embedding_width)
        + attention_count(16)
        + conv3x3_count(16, 16)  # upsample
        + res_block_count(16 + 8, 8, embedding_width)  # up level 0
        + res_block_count(8 + 8, 8, embedding_width)
        + group_norm_count(8)
        + conv3x3_count(8, 1)  # output conv
    )
    model = UNet(**TINY_UNET, num_classes=num_classes)
    variables = jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,))
    )
    assert count_params(variables["params"]) == expected


def test_mlp_parameter_count_matches_hand_formula():
    dim, width, num_blocks, embedding_dim, num_classes = 3, 16, 2, 8, 4
    expected = (
        dense_count(embedding_dim, width)
        + dense_count(width, width)
        + (num_classes + 1) * width
        + dense_count(dim, width)
        + num_blocks * 3 * dense_count(width, width)  # in, embedding projection, out
        + dense_count(width, dim)
    )
    model = MLP(width=width, num_blocks=num_blocks, embedding_dim=embedding_dim, num_classes=4)
    variables = jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jnp.zeros((1, dim)), jnp.zeros((1,))
    )
    assert count_params(variables["params"]) == expected


def test_group_norm_groups_rule():
    assert group_norm_groups(128) == 32  # DDPM's 32 groups at its widths
    assert group_norm_groups(256) == 32
    assert group_norm_groups(8) == 2
    assert group_norm_groups(3) == 1
    for channels in range(1, 300):
        groups = group_norm_groups(channels)
        assert channels % groups == 0 and groups <= 32
        assert channels < 8 or channels // groups >= 4


# ----------------------------------------------------------------------------- zero init


CONDITIONAL_UNET = UNet(**ONE_LEVEL_UNET, num_classes=3, dropout=0.5)


@functools.partial(jax.jit, static_argnames="train")
def apply_conditional_unet(params, x, t, y, *, train=False, dropout_seed=0):
    """The tiny U-Net's apply, compiled once per value of train (a dropout key is always given)."""
    rngs = {"dropout": jax.random.key(dropout_seed, impl="rbg")}
    return CONDITIONAL_UNET.apply(params, x, t, y, train=train, rngs=rngs)


@pytest.fixture(scope="module")
def initial_params():
    """The tiny class-conditional U-Net's parameters as initialised by the model."""
    init = jax.jit(CONDITIONAL_UNET.init)
    return init(INIT_KEY, jnp.zeros(TINY_IMAGES), jnp.zeros((2,)), jnp.zeros((2,), jnp.int32))[
        "params"
    ]


@pytest.fixture(scope="module")
def random_unet_params():
    """Random (non-zero everywhere) parameters of the tiny class-conditional U-Net."""
    return random_params(CONDITIONAL_UNET, jnp.zeros(TINY_IMAGES), jnp.zeros((2,)))


def test_unet_output_is_exactly_zero_at_init(initial_params):
    x, t, y = image_batch(TINY_IMAGES), jnp.array([1.0, 7.0]), jnp.array([0, 2])
    output = apply_conditional_unet({"params": initial_params}, x, t, y)
    assert np.all(np.asarray(output) == 0.0)


def test_unet_zero_init_blocks_make_output_independent_of_t_and_y(initial_params):
    # DDPM zero-inits the last conv of each residual block and each attention output: with only
    # the output conv made non-zero, every block is its skip path and the embedding cannot reach
    # the output.
    params = dict(initial_params)
    params["output_conv"] = jax.tree_util.tree_map(lambda leaf: leaf + 0.1, params["output_conv"])
    x = image_batch(TINY_IMAGES)
    reference = apply_conditional_unet(
        {"params": params}, x, jnp.array([1.0, 1.0]), jnp.array([0, 0])
    )
    other = apply_conditional_unet(
        {"params": params}, x, jnp.array([90.0, 400.0]), jnp.array([2, 1])
    )
    assert np.any(np.asarray(reference) != 0.0)
    np.testing.assert_array_equal(reference, other)


def max_abs_difference(first: jax.Array, second: jax.Array) -> float:
    return float(jnp.max(jnp.abs(first - second)))


def test_unet_output_depends_on_t_and_y(random_unet_params):
    params = {"params": random_unet_params}
    x, t, y = image_batch(TINY_IMAGES), jnp.array([0.1, 0.1]), jnp.array([0, 0])
    reference = apply_conditional_unet(params, x, t, y)
    assert max_abs_difference(apply_conditional_unet(params, x, t + 0.5, y), reference) > 1e-4
    assert max_abs_difference(apply_conditional_unet(params, x, t, y + 2), reference) > 1e-4


def test_missing_label_is_the_null_label():
    embedder = ConditioningEmbedding(features=8, embedding_dim=4, num_classes=3)
    t = jnp.array([0.5, 2.0])
    params = {"params": random_params(embedder, t, jnp.zeros((2,), jnp.int32))}
    null_label = jnp.array([3, 3])  # index num_classes
    np.testing.assert_array_equal(embedder.apply(params, t), embedder.apply(params, t, null_label))
    assert (
        max_abs_difference(embedder.apply(params, t), embedder.apply(params, t, null_label - 1)) > 0
    )


def test_mlp_zero_output_at_init_and_dependence_on_t_and_y():
    model = MLP(width=32, num_blocks=2, embedding_dim=16, num_classes=3)
    x, t, y = image_batch((4, 2)), jnp.full((4,), 0.3), jnp.zeros((4,), jnp.int32)
    params = jax.jit(model.init)(INIT_KEY, x, t, y)["params"]
    apply = jax.jit(model.apply)
    assert np.all(np.asarray(apply({"params": params}, x, t, y)) == 0.0)
    params = dict(params)
    params["output_layer"] = jax.tree_util.tree_map(lambda leaf: leaf + 0.1, params["output_layer"])
    reference = apply({"params": params}, x, t, y)
    assert max_abs_difference(apply({"params": params}, x, t + 0.2, y), reference) > 1e-4
    assert max_abs_difference(apply({"params": params}, x, t, y + 1), reference) > 1e-4


# ----------------------------------------------------------------------------- dropout, jit


def test_dropout_only_in_training(random_unet_params):
    params = {"params": random_unet_params}
    x, t, y = image_batch(TINY_IMAGES), jnp.array([2.0, 3.0]), jnp.array([0, 1])

    def apply(seed: int, train: bool) -> jax.Array:
        return apply_conditional_unet(params, x, t, y, train=train, dropout_seed=seed)

    np.testing.assert_array_equal(apply(10, False), apply(11, False))
    np.testing.assert_array_equal(apply(10, True), apply(10, True))
    assert max_abs_difference(apply(10, True), apply(11, True)) > 1e-4
    assert max_abs_difference(apply(10, True), apply(10, False)) > 1e-4


def test_jitted_apply_is_repeatable_and_batch_independent(random_unet_params):
    params = {"params": random_unet_params}
    x, t, y = image_batch(TINY_IMAGES), jnp.array([5.0, 50.0]), jnp.array([2, 0])
    first = apply_conditional_unet(params, x, t, y)
    np.testing.assert_array_equal(first, apply_conditional_unet(params, x, t, y))
    # GroupNorm and attention act per sample: swapping the batch swaps the outputs.
    swapped = apply_conditional_unet(params, x[::-1], t[::-1], y[::-1])
    np.testing.assert_allclose(swapped, first[::-1], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- DDPM++ options


@pytest.mark.slow
def test_skip_rescale_divides_block_outputs_by_sqrt2():
    x = image_batch((2, 4, 4, 8))
    embedding = image_batch((2, 16), seed=1)
    for block, inputs in [
        (ResnetBlock(16), (x, embedding)),  # width change: 1x1 shortcut
        (ResnetBlock(8), (x, embedding)),  # identity shortcut
        (AttentionBlock(), (x,)),
    ]:
        params = {"params": random_params(block, *inputs)}
        rescaled_block = block.clone(skip_rescale=True)
        plain, rescaled = jax.jit(
            lambda params, block=block, rescaled_block=rescaled_block, inputs=inputs: (
                block.apply(params, *inputs),
                rescaled_block.apply(params, *inputs),
            )
        )(params)
        np.testing.assert_allclose(rescaled, plain / math.sqrt(2.0), rtol=1e-5, atol=1e-6)


def test_skip_rescale_changes_unet_output_with_same_parameters(random_unet_params):
    x, t = image_batch(TINY_IMAGES), jnp.array([5.0, 50.0])
    rescaled_model = CONDITIONAL_UNET.clone(skip_rescale=True)
    rescaled_shapes = jax.eval_shape(rescaled_model.init, jax.random.PRNGKey(0), x, t)["params"]
    assert jax.tree_util.tree_structure(rescaled_shapes) == jax.tree_util.tree_structure(
        random_unet_params
    )
    plain = apply_conditional_unet({"params": random_unet_params}, x, t, None)
    rescaled = jax.jit(rescaled_model.apply)({"params": random_unet_params}, x, t)
    assert max_abs_difference(rescaled, plain) > 1e-4


@pytest.mark.parametrize("architecture", ["unet", "mlp"])
def test_scale_by_sigma_divides_output_by_exp_t(architecture):
    if architecture == "unet":
        model = UNet(**ONE_LEVEL_UNET, embedding_type="fourier")
        shape = (3, 8, 8, 1)
    else:
        model = MLP(width=16, num_blocks=1, embedding_dim=8, embedding_type="fourier")
        shape = (3, 2)
    x = jnp.broadcast_to(image_batch((1, *shape[1:])), shape)  # one input at three noise levels
    sigma = np.array([0.01, 1.0, 50.0])
    log_sigma = jnp.log(jnp.asarray(sigma, jnp.float32))  # contract: t IS log sigma
    params = {"params": random_params(model, x, log_sigma)}
    scaled_model = model.clone(scale_by_sigma=True)
    plain, scaled = jax.jit(
        lambda params: (model.apply(params, x, log_sigma), scaled_model.apply(params, x, log_sigma))
    )(params)
    assert max_abs_difference(plain[0], plain[2]) > 1e-4  # the Fourier embedding sees t
    sigma_broadcast = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
    np.testing.assert_allclose(scaled, np.asarray(plain) / sigma_broadcast, rtol=1e-5)


# ----------------------------------------------------------------------------- embeddings


def test_sinusoidal_embedding_matches_vaswani_formula():
    times = [0.0, 1.0, 17.0, 999.0]
    dim = 16
    half = dim // 2
    embedding = np.asarray(sinusoidal_embedding(jnp.array(times), dim))
    for row, time in enumerate(times):
        for k in range(half):
            # frequency k: 10000 ** (-k / (half - 1)), from 1 down to 1 / 10000
            angle = time / 10000.0 ** (k / (half - 1))
            assert embedding[row, k] == pytest.approx(math.sin(angle), abs=1e-4)
            assert embedding[row, half + k] == pytest.approx(math.cos(angle), abs=1e-4)


def test_fourier_features_fixed_untrainable_and_of_the_given_scale():
    # The frequencies are a constant, not a variable: identical across inits with different keys.
    model = UNet(**TINY_UNET, embedding_type="fourier")
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)
    assert set(shapes) == {"params"}
    positional_shapes = jax.eval_shape(
        UNet(**TINY_UNET).init, jax.random.PRNGKey(0), x, t
    )  # same embedding width, so the parameter trees coincide
    assert count_params(shapes) == count_params(positional_shapes)

    times = jnp.array([1e-4, 0.3])
    first = gaussian_fourier_features(times, 1024, scale=16.0)
    np.testing.assert_array_equal(first, gaussian_fourier_features(times, 1024, scale=16.0))
    np.testing.assert_allclose(first[:, :512] ** 2 + first[:, 512:] ** 2, 1.0, rtol=1e-5)
    # For small t, sin(2 pi w t) ~ 2 pi w t: read the frequencies off and check their spread.
    frequencies = np.asarray(first[0, :512], np.float64) / (2 * np.pi * 1e-4)
    assert np.std(frequencies) == pytest.approx(16.0, rel=0.1)  # N(0, 16^2); std error ~3 %


# ----------------------------------------------------------------------------- remat, compute dtype


def unet_loss_and_grads(model, params, x, t, y, dropout_seed=0):
    """Output (train=True, dropout active) and gradient of a squared loss, one compile."""

    @jax.jit
    def run(params):
        def loss(params):
            rngs = {"dropout": jax.random.key(dropout_seed, impl="rbg")}
            output = model.apply(params, x, t, y, train=True, rngs=rngs)
            return jnp.mean((output - x) ** 2), output

        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, output), grads = run(params)
    return output, grads


LOSS_INPUTS = (jnp.array([2.0, 300.0]), jnp.array([0, 2]))  # t, y for the loss tests


@pytest.fixture(scope="module")
def reference_loss_and_grads(random_unet_params):
    """Output and gradients of the default (float32, no remat) tiny U-Net with dropout active."""
    params = {"params": random_unet_params}
    return unet_loss_and_grads(CONDITIONAL_UNET, params, image_batch(TINY_IMAGES), *LOSS_INPUTS)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["blocks", "convs"])
def test_remat_keeps_parameters_outputs_and_gradients(
    random_unet_params, reference_loss_and_grads, remat
):
    # jax.checkpoint recomputes the same operations (the same dropout mask included: flax replays
    # the block's rng), so outputs and gradients equal the stored-activation ones up to float32
    # reassociation by XLA's fusion.
    x, (t, y) = image_batch(TINY_IMAGES), LOSS_INPUTS
    remat_model = CONDITIONAL_UNET.clone(remat=remat)
    shapes = jax.eval_shape(remat_model.init, jax.random.PRNGKey(0), x, t, y)["params"]
    assert jax.tree.structure(shapes) == jax.tree.structure(random_unet_params)
    expected_output, expected_grads = reference_loss_and_grads
    output, grads = unet_loss_and_grads(remat_model, {"params": random_unet_params}, x, t, y)
    np.testing.assert_allclose(output, expected_output, rtol=1e-6, atol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def relative_l2(approximation: jax.Array, reference: jax.Array) -> float:
    return float(jnp.linalg.norm(jnp.ravel(approximation - reference)) / jnp.linalg.norm(reference))


@pytest.mark.slow
def test_bfloat16_compute_is_close_to_float32(random_unet_params, reference_loss_and_grads):
    # bfloat16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3); through this network's ~20
    # layers the output's relative L2 error measured 3e-3 to 6e-3 over three random parameter
    # draws and the gradient's (all leaves together) 1.6e-2, so the bounds are 2e-2 and 5e-2.
    # Parameters, gradients and the output stay float32.
    # The same dropout mask (same key) on both sides.
    x, (t, y) = image_batch(TINY_IMAGES), LOSS_INPUTS
    reference_output, reference_grads = reference_loss_and_grads
    model = CONDITIONAL_UNET.clone(dtype=jnp.bfloat16)
    output, grads = unet_loss_and_grads(model, {"params": random_unet_params}, x, t, y)
    assert output.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    assert relative_l2(output, reference_output) < 2e-2
    flat = lambda tree: jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(tree)])  # noqa: E731
    assert relative_l2(flat(grads), flat(reference_grads)) < 5e-2
    # And it is not float32 in disguise: bfloat16 rounding shows.
    assert relative_l2(output, reference_output) > 1e-4


# ----------------------------------------------------------------------------- input errors


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="embedding_type"):
        UNet(embedding_type="learned")
    with pytest.raises(ValueError, match="ch_mult"):
        UNet(ch_mult=())
    with pytest.raises(ValueError, match="embedding_type"):
        MLP(embedding_type="sinusoid")
    with pytest.raises(ValueError, match="remat"):
        UNet(remat="everything")
    with pytest.raises(ValueError, match="conv_weight_grad"):
        UNet(conv_weight_grad="winograd")
    with pytest.raises(ValueError, match="dtype"):
        UNet(dtype=jnp.int8)
    model = UNet(ch=8, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, attn_resolutions=())
    with pytest.raises(ValueError, match="too small"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)), jnp.zeros((1,)))
    tiny = UNet(**TINY_UNET)
    with pytest.raises(ValueError, match="unconditional"):
        jax.eval_shape(
            tiny.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)), jnp.zeros(1)
        )
    with pytest.raises(ValueError, match="t must have shape"):
        jax.eval_shape(tiny.init, jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)), jnp.zeros((3,)))
