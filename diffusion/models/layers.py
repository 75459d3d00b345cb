"""Dense, convolution and GroupNorm layers with flax.linen's parameters, written for XLA:CPU speed.

Each module has the class name, parameter names, shapes and initialisers of its flax.linen namesake
(``Dense``, ``Conv``, ``GroupNorm``), so a network built from them has the same parameter tree, the
same initial values and the same checkpoints as one built from flax.linen; only the lowering differs:

* ``Dense`` flattens the leading axes to one before its matmul. On an image batch (B, H, W, C)
  flax's ``nn.Dense`` contracts the last axis of a 4-D array, and XLA:CPU then transposes the whole
  activation (B H W C -> C H W B) to form the weight gradient; on 2-D rows the gradient is one matmul
  ``rows^T @ cotangent`` that the dot emitter reads in place.
* ``GroupNorm`` (Wu & He 2018, eq. (1)-(2)) sums each channel over space first, then adds the
  channel sums of a group, and normalises with per-(example, channel) mean and multiplier, instead
  of reducing over group-shaped axes as flax does: GroupNorm + SiLU forward and backward on a
  (128, 32, 32, 96) activation took 99-116 ms against flax's 270-352 ms (2-core AVX-512 CPU).
* ``Conv`` calls XLA's convolution. With ``weight_grad='shifted_matmul'`` the gradient of the
  kernel is computed as one matmul per kernel tap (see :func:`shifted_matmul_weight_grad`) on CPU
  and by XLA elsewhere. The default ``'xla'`` leaves every gradient to XLA: on the AVX-512 CPU
  where this was measured, XLA's kernel gradient took 2-3x its forward pass and the matmul form
  made a U-Net train step 27% slower; a CPU where XLA's kernel gradient is far slower (8x was seen
  on an AVX2 machine) is where the option can pay.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

WEIGHT_GRADS = ("xla", "shifted_matmul")
_IMAGE_DIMENSIONS = ("NHWC", "HWIO", "NHWC")

Padding = tuple[tuple[int, int], tuple[int, int]]


def explicit_padding(
    image_size: tuple[int, int],
    kernel_size: tuple[int, int],
    strides: tuple[int, int],
    padding: str | Sequence[tuple[int, int]],
) -> Padding:
    """``padding`` ('SAME', 'VALID' or (low, high) pairs) as (low, high) pairs for each spatial axis,
    the pads XLA uses (``lax.padtype_to_pads``; 'SAME' puts the odd pixel at the high end)."""
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(image_size, kernel_size, strides, padding)
    else:
        pads = padding
    (low_h, high_h), (low_w, high_w) = pads
    return (int(low_h), int(high_h)), (int(low_w), int(high_w))


def xla_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding):
    """2-D convolution of NHWC ``x`` with an HWIO ``kernel`` (XLA's ``conv_general_dilated``)."""
    return lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=_IMAGE_DIMENSIONS
    )


def shifted_matmul_weight_grad(
    x: jax.Array,
    cotangent: jax.Array,
    kernel_size: tuple[int, int],
    strides: tuple[int, int],
    padding: Padding,
) -> jax.Array:
    """Gradient of ``sum(cotangent * xla_conv(x, kernel))`` with respect to ``kernel``, as matmuls.

    The convolution is ``y[n, i, j, o] = sum_{dy, dx, c} xp[n, s_h i + dy, s_w j + dx, c]
    k[dy, dx, c, o]`` with ``xp`` the padded input, so for each tap (dy, dx)
    ``dk[dy, dx] = X_{dy,dx}^T G``, where ``X_{dy,dx}`` is the input window of that tap (strided by
    the convolution's strides) with its (N, H', W') axes flattened into rows (N H' W' x C) and ``G``
    the cotangent as rows (N H' W' x O): kh * kw matmuls with the rows contracted.
    Returns (kh, kw, C, O) in the cotangent's dtype, accumulated in at least float32.
    """
    (low_h, high_h), (low_w, high_w) = padding
    padded = jnp.pad(x, ((0, 0), (low_h, high_h), (low_w, high_w), (0, 0)))
    batch, out_h, out_w, out_channels = cotangent.shape
    in_channels = x.shape[-1]
    stride_h, stride_w = strides
    rows = cotangent.reshape(-1, out_channels)
    accumulate = jnp.promote_types(cotangent.dtype, jnp.float32)
    taps = []
    for dy in range(kernel_size[0]):
        for dx in range(kernel_size[1]):
            window = lax.slice(
                padded,
                (0, dy, dx, 0),
                (
                    batch,
                    dy + (out_h - 1) * stride_h + 1,
                    dx + (out_w - 1) * stride_w + 1,
                    in_channels,
                ),
                (1, stride_h, stride_w, 1),
            )
            taps.append(
                lax.dot_general(
                    window.reshape(-1, in_channels),
                    rows,
                    (((0,), (0,)), ((), ())),
                    precision=lax.Precision.HIGHEST,
                    preferred_element_type=accumulate,
                )
            )
    grad = jnp.stack(taps).reshape(*kernel_size, in_channels, out_channels)
    return grad.astype(cotangent.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_with_matmul_weight_grad(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding
) -> jax.Array:
    """``xla_conv`` whose kernel gradient is :func:`shifted_matmul_weight_grad` on CPU.

    The forward pass and the input gradient (a transposed convolution) are XLA's on every backend;
    the kernel gradient is chosen per platform when the program is lowered
    (``lax.platform_dependent``): shifted matmuls on CPU, XLA's own gradient on GPU and TPU.
    """
    return xla_conv(x, kernel, strides, padding)


def _conv_forward(x, kernel, strides, padding):
    return xla_conv(x, kernel, strides, padding), (x, kernel)


def _conv_backward(strides, padding, residuals, cotangent):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda inputs: xla_conv(inputs, kernel, strides, padding), x)
    (x_grad,) = input_vjp(cotangent)

    def xla_weight_grad(x, cotangent):
        _, kernel_vjp = jax.vjp(lambda weights: xla_conv(x, weights, strides, padding), kernel)
        return kernel_vjp(cotangent)[0]

    def matmul_weight_grad(x, cotangent):
        return shifted_matmul_weight_grad(x, cotangent, kernel.shape[:2], strides, padding)

    kernel_grad = lax.platform_dependent(
        x, cotangent, cpu=matmul_weight_grad, default=xla_weight_grad
    )
    return x_grad, kernel_grad.astype(kernel.dtype)


conv_with_matmul_weight_grad.defvjp(_conv_forward, _conv_backward)


def _promote(*arrays, dtype):
    """Cast the arrays (None passes through) to ``dtype``, or to their common type if it is None."""
    return nn.dtypes.promote_dtype(*arrays, dtype=dtype)


class Dense(nn.Module):
    """``flax.linen.Dense`` (parameters 'kernel' (in, features) and 'bias' (features,)), computed
    on the input flattened to rows: (..., in) -> (rows, in) @ kernel -> (..., features)."""

    features: int
    use_bias: bool = True
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.linear.default_kernel_init
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """(..., in) -> (..., features)."""
        in_features = inputs.shape[-1]
        kernel = self.param(
            "kernel", self.kernel_init, (in_features, self.features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, kernel, bias = _promote(inputs, kernel, bias, dtype=self.dtype)
        outputs = inputs.reshape(-1, in_features) @ kernel
        if bias is not None:
            outputs = outputs + bias
        return outputs.reshape(*inputs.shape[:-1], self.features)


class Conv(nn.Module):
    """2-D ``flax.linen.Conv`` on NHWC images (parameters 'kernel' (kh, kw, in, features) and
    'bias' (features,)); ``weight_grad`` picks how the kernel gradient is computed on CPU
    ('xla' or 'shifted_matmul', see :func:`conv_with_matmul_weight_grad`)."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: str | Sequence[tuple[int, int]] = "SAME"
    use_bias: bool = True
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.linear.default_kernel_init
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    weight_grad: str = "xla"

    def __post_init__(self) -> None:
        """Check the options at construction (ValueError naming the bad value)."""
        if self.weight_grad not in WEIGHT_GRADS:
            raise ValueError(f"weight_grad must be one of {WEIGHT_GRADS}, got {self.weight_grad!r}")
        if len(self.kernel_size) != 2 or len(self.strides) != 2:
            raise ValueError(
                f"kernel_size and strides must be pairs, got {self.kernel_size} and {self.strides}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """(B, H, W, in) -> (B, H', W', features)."""
        if inputs.ndim != 4:
            raise ValueError(f"Conv expects NHWC images (4 dims), got shape {inputs.shape}")
        kernel_size = tuple(self.kernel_size)
        strides = tuple(self.strides)
        kernel_shape = (*kernel_size, inputs.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, kernel, bias = _promote(inputs, kernel, bias, dtype=self.dtype)
        padding = explicit_padding(inputs.shape[1:3], kernel_size, strides, self.padding)
        if self.weight_grad == "shifted_matmul":
            outputs = conv_with_matmul_weight_grad(inputs, kernel, strides, padding)
        else:
            outputs = xla_conv(inputs, kernel, strides, padding)
        if bias is not None:
            outputs = outputs + bias
        return outputs


class GroupNorm(nn.Module):
    """GroupNorm (Wu & He 2018) over the last axis, as ``flax.linen.GroupNorm`` (parameters 'scale'
    and 'bias' (C,), statistics in at least float32, variance E[x^2] - E[x]^2 clipped at 0, the
    normalisation itself in the output dtype).

    Per example n and group g of C/G channels, over all other axes:
    ``y = (x - mu_ng) / sqrt(var_ng + epsilon) * scale + bias`` (Wu & He 2018, eq. (1)-(2)).
    Computed as per-channel sums over space, then group sums of those (C values per example), so
    the normalisation is one elementwise pass with per-(n, c) mean and multiplier.
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, ..., C) -> same shape."""
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(
                f"num_groups={self.num_groups} does not divide the {channels} channels"
            )
        scale = self.param("scale", nn.initializers.ones_init(), (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (channels,), self.param_dtype)
        batch = x.shape[0]
        stats_dtype = jnp.promote_types(x.dtype, jnp.float32)
        rows = x.reshape(batch, -1, channels).astype(stats_dtype)
        group_size = channels // self.num_groups
        count = rows.shape[1] * group_size

        def group_mean(channel_sums: jax.Array) -> jax.Array:  # (B, C) -> (B, G)
            return channel_sums.reshape(batch, self.num_groups, group_size).sum(-1) / count

        mean = group_mean(rows.sum(axis=1))
        mean_of_squares = group_mean(jnp.square(rows).sum(axis=1))
        variance = jnp.maximum(mean_of_squares - jnp.square(mean), 0.0)
        inverse_std = lax.rsqrt(variance + self.epsilon)
        # y = (x - mean) * multiplier + bias with (B, C) coefficients: one fused elementwise pass.
        multiplier = jnp.repeat(inverse_std, group_size, axis=1) * scale.astype(stats_dtype)
        channel_mean = jnp.repeat(mean, group_size, axis=1)
        shape = (batch, *(1,) * (x.ndim - 2), channels)
        multiplier, channel_mean = multiplier.reshape(shape), channel_mean.reshape(shape)
        # The elementwise pass (and what autodiff stores of it) in the output dtype: bfloat16 under
        # a bfloat16 compute dtype, with the statistics above still in float32.
        output_dtype = self.dtype or jnp.promote_types(x.dtype, self.param_dtype)
        centered = x.astype(output_dtype) - channel_mean.astype(output_dtype)
        return centered * multiplier.astype(output_dtype) + bias.astype(output_dtype)
