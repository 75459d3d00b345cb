"""U-Net of the DDPM / DDPM++ family (Ho et al. 2020, App. B; Song et al. 2021, DDPM++).

With the DDPM++ options off (``skip_rescale=False``, ``embedding_type='positional'``,
``scale_by_sigma=False``, ``num_classes=None``) this is Ho et al.'s network layer for layer:
their CIFAR-10 configuration has 35,746,307 parameters here as in their release.

Initialisation follows the DDPM code: Glorot-uniform kernels, zero biases, and zero kernels for the
last conv of every residual block, the output projection of every attention block and the final
conv. So at init every residual branch is zero, every block is the identity on its skip path (or a
1x1 projection where the width changes), and the network outputs exactly zero.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from diffusion.models import layers
from diffusion.models.embeddings import (
    ConditioningEmbedding,
    check_conditioning_fields,
    check_time_input,
    default_kernel_init,
    divide_by_sigma,
)


def group_norm_groups(channels: int) -> int:
    """Number of GroupNorm groups for a width: the largest divisor of ``channels`` not above
    ``min(32, channels // 4)`` (at least 1).

    Gives DDPM's 32 groups for every width in Ho et al.'s models (multiples of 32 from 128 up) and
    keeps at least 4 channels per group for small widths (8 channels -> 2 groups), where 32 groups
    would not divide the width.
    """
    upper = max(1, min(32, channels // 4))
    return max(groups for groups in range(1, upper + 1) if channels % groups == 0)


REMAT_POLICIES = ("none", "blocks", "convs")
# Name given (jax.ad_checkpoint.checkpoint_name) to every convolution output inside a block, so
# that the 'convs' rematerialisation policy can keep exactly those.
CONV_OUTPUT = "conv_output"


def group_norm(x: jax.Array, dtype: Any = None) -> jax.Array:
    """GroupNorm (Wu & He 2018) over the channel axis with :func:`group_norm_groups` groups."""
    return layers.GroupNorm(num_groups=group_norm_groups(x.shape[-1]), epsilon=1e-6, dtype=dtype)(x)


def conv3x3(
    features: int,
    *,
    zero_init: bool = False,
    stride: int = 1,
    name: str | None = None,
    dtype: Any = None,
    weight_grad: str = "xla",
) -> layers.Conv:
    """3x3 'SAME' convolution with DDPM's initialisation (zero kernel if ``zero_init``)."""
    kernel_init = nn.initializers.zeros if zero_init else default_kernel_init
    return layers.Conv(
        features,
        (3, 3),
        strides=(stride, stride),
        padding="SAME",
        kernel_init=kernel_init,
        name=name,
        dtype=dtype,
        weight_grad=weight_grad,
    )


def dense(features: int, *, zero_init: bool = False, name: str | None = None, dtype: Any = None):
    """Dense layer (a 1x1 convolution on images) with DDPM's initialisation."""
    kernel_init = nn.initializers.zeros if zero_init else default_kernel_init
    return layers.Dense(features, kernel_init=kernel_init, name=name, dtype=dtype)


def named_conv_output(x: jax.Array) -> jax.Array:
    """Tag a convolution's output with :data:`CONV_OUTPUT` for the 'convs' remat policy."""
    return checkpoint_name(x, CONV_OUTPUT)


def residual_sum(skip: jax.Array, branch: jax.Array, skip_rescale: bool) -> jax.Array:
    """``skip + branch``, divided by sqrt(2) when ``skip_rescale`` (DDPM++, Song et al. 2021)."""
    total = skip + branch
    return total / math.sqrt(2.0) if skip_rescale else total


class ResnetBlock(nn.Module):
    """Residual block of DDPM (Ho et al. 2020, App. B; Wide ResNet style).

    ``h = Conv(SiLU(GN(x))) + Dense(SiLU(emb))``, ``h = Conv_0(Dropout(SiLU(GN(h))))`` with the
    last conv zero-initialised; the skip path is a 1x1 projection when the width changes.
    Returns ``residual_sum(skip, h)``.
    """

    out_channels: int
    dropout: float = 0.0
    skip_rescale: bool = False
    dtype: Any = None
    conv_weight_grad: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, embedding: jax.Array, train: bool = False) -> jax.Array:
        """x: (B, H, W, C_in), embedding: (B, E) -> (B, H, W, out_channels)."""
        conv_options = {"dtype": self.dtype, "weight_grad": self.conv_weight_grad}
        hidden = conv3x3(self.out_channels, **conv_options)(nn.silu(group_norm(x, self.dtype)))
        hidden = named_conv_output(hidden)
        projected = dense(self.out_channels, dtype=self.dtype)(nn.silu(embedding))
        hidden = hidden + projected[:, None, None, :]
        hidden = nn.silu(group_norm(hidden, self.dtype))
        hidden = nn.Dropout(self.dropout)(hidden, deterministic=not train)
        hidden = named_conv_output(
            conv3x3(self.out_channels, zero_init=True, **conv_options)(hidden)
        )
        skip = x
        if x.shape[-1] != self.out_channels:
            # DDPM's "nin_shortcut": a 1x1 convolution, i.e. a Dense on the channel axis.
            skip = named_conv_output(dense(self.out_channels, dtype=self.dtype)(x))
        return residual_sum(skip, hidden, self.skip_rescale)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all spatial positions (Ho et al. 2020, App. B).

    ``q, k, v`` are 1x1 projections of ``GN(x)``; weights ``softmax(q k^T / sqrt(C))``
    (Vaswani et al. 2017, eq. (1)); the output projection is zero-initialised.
    """

    skip_rescale: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        batch, height, width, channels = x.shape
        normed = group_norm(x, self.dtype).reshape(batch, height * width, channels)
        query, key, value = (
            named_conv_output(dense(channels, name=name, dtype=self.dtype)(normed))
            for name in ("query", "key", "value")
        )
        # Logits and softmax in float32 whatever the compute dtype.
        logits = jnp.einsum("bqc,bkc->bqk", query, key, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits / math.sqrt(channels), axis=-1).astype(value.dtype)
        attended = jnp.einsum("bqk,bkc->bqc", weights, value)
        output = dense(channels, zero_init=True, name="output", dtype=self.dtype)(attended)
        return residual_sum(x, named_conv_output(output).reshape(x.shape), self.skip_rescale)


class Downsample(nn.Module):
    """Halve the spatial size, rounding up (7 -> 4): stride-2 3x3 conv, or 2x2 average pooling.

    Both use 'SAME' padding; the average ignores padded entries at odd sizes.
    """

    with_conv: bool
    dtype: Any = None
    conv_weight_grad: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C)."""
        if self.with_conv:
            conv = conv3x3(
                x.shape[-1], stride=2, dtype=self.dtype, weight_grad=self.conv_weight_grad
            )
            return conv(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME", count_include_pad=False)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling cropped to ``output_size``, then a 3x3 conv if ``with_conv``.

    Cropping to the skip connection's size undoes :class:`Downsample` at odd sizes (4 -> 8 -> 7).
    """

    with_conv: bool
    dtype: Any = None
    conv_weight_grad: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
        """x: (B, H, W, C) -> (B, *output_size, C), with output_size <= (2H, 2W)."""
        height, width = output_size
        upsampled = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)[:, :height, :width, :]
        if self.with_conv:
            conv = conv3x3(x.shape[-1], dtype=self.dtype, weight_grad=self.conv_weight_grad)
            return conv(upsampled)
        return upsampled


def level_resolutions(image_size: int, num_levels: int) -> list[int]:
    """Spatial size at each U-Net level: halving with rounding up (28, 14, 7, 4, ...)."""
    sizes = [image_size]
    for _ in range(num_levels - 1):
        sizes.append(-(-sizes[-1] // 2))
    return sizes


def _block_classes(remat: str) -> dict[str, type[nn.Module]]:
    """ResnetBlock and AttentionBlock, wrapped in ``nn.remat`` with the policy named by ``remat``."""
    if remat == "none":
        return {"ResnetBlock": ResnetBlock, "AttentionBlock": AttentionBlock}
    policy = {
        "blocks": jax.checkpoint_policies.nothing_saveable,
        "convs": jax.checkpoint_policies.save_only_these_names(CONV_OUTPUT),
    }[remat]
    return {
        # static_argnums counts the module as 0: ResnetBlock's ``train`` is argument 3.
        "ResnetBlock": nn.remat(ResnetBlock, policy=policy, static_argnums=(3,)),
        "AttentionBlock": nn.remat(AttentionBlock, policy=policy),
    }


class UNet(nn.Module):
    """DDPM / DDPM++ U-Net, ``apply(params, x, t, y=None, train=False)`` -> same shape as ``x``.

    Ho et al. 2020 (App. B) architecture: ``num_res_blocks`` residual blocks per level on the way
    down and ``num_res_blocks + 1`` on the way up (each consuming one skip connection), self-
    attention after every residual block whose feature map has a size in ``attn_resolutions`` and
    in the middle (ResBlock - Attention - ResBlock), GroupNorm + SiLU + zero-initialised 3x3 conv
    at the output.

    Attributes:
      ch: base width; level ``i`` has ``ch * ch_mult[i]`` channels; the time embedding has ``4 ch``.
      ch_mult: width multipliers, one level per entry (``len(ch_mult) - 1`` downsamplings).
      num_res_blocks: residual blocks per level on the way down.
      attn_resolutions: feature-map sizes (height) where self-attention is applied.
      dropout: dropout rate inside residual blocks (active only with ``train=True``).
      resamp_with_conv: strided / post-upsampling 3x3 convs instead of pooling / plain repeat.
      embedding_type: 'positional' (DDPM) or 'fourier' (NCSN++) features of ``t``, width ``ch``.
      fourier_scale: standard deviation of the Fourier frequencies.
      skip_rescale: divide every residual sum by sqrt(2) (DDPM++).
      num_classes: None for unconditional; else a label embedding (with the extra null label
        ``num_classes``, used when ``y`` is None) is added to the time embedding.
      scale_by_sigma: divide the output by ``exp(t)``. Contract: with this option the time input
        ``t`` IS ``log sigma`` (as NCSN++, which embeds ``log sigma`` with Fourier features), so
        the output is the network's output divided by sigma.
      out_channels: output channels; None means the input's channel count.
      dtype: compute dtype of convolutions, dense layers and activations (e.g. ``jnp.bfloat16``);
        None computes in the parameters' float32. Parameters stay float32 either way; GroupNorm
        statistics, attention logits and softmax are float32, and the output is float32.
      remat: rematerialisation of residual and attention blocks (``jax.checkpoint``): 'none'
        stores every activation for the backward pass; 'blocks' stores only each block's input
        and recomputes the block; 'convs' stores the outputs of the convolutions and dense
        projections inside blocks and recomputes normalisations and activations.
      conv_weight_grad: how the kernel gradients of the 3x3 convolutions are computed on CPU:
        'xla' or 'shifted_matmul' (``diffusion.models.layers.Conv``); same values either way.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    embedding_type: str = "positional"
    fourier_scale: float = 16.0
    skip_rescale: bool = False
    num_classes: int | None = None
    scale_by_sigma: bool = False
    out_channels: int | None = None
    dtype: Any = None
    remat: str = "none"
    conv_weight_grad: str = "xla"

    def __post_init__(self) -> None:
        """Check the hyperparameters at construction (ValueError naming the bad value)."""
        if self.ch < 4 or self.ch % 2:
            raise ValueError(f"ch must be an even integer >= 4, got {self.ch}")
        if len(self.ch_mult) == 0 or any(mult < 1 for mult in self.ch_mult):
            raise ValueError(
                f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}"
            )
        if self.num_res_blocks < 0:
            raise ValueError(f"num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.out_channels is not None and self.out_channels < 1:
            raise ValueError(f"out_channels must be None or >= 1, got {self.out_channels}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.conv_weight_grad not in layers.WEIGHT_GRADS:
            raise ValueError(
                f"conv_weight_grad must be one of {layers.WEIGHT_GRADS}, "
                f"got {self.conv_weight_grad!r}"
            )
        if self.dtype is not None and not jnp.issubdtype(self.dtype, jnp.floating):
            raise ValueError(f"dtype must be None or a floating dtype, got {self.dtype!r}")
        check_conditioning_fields(self.embedding_type, self.fourier_scale, self.num_classes)
        super().__post_init__()

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 4:
            raise ValueError(f"x must be a batch of NHWC images (4 dims), got shape {x.shape}")
        sizes = level_resolutions(min(x.shape[1:3]), len(self.ch_mult))
        if len(sizes) > 1 and sizes[-2] < 2:
            raise ValueError(
                f"input of spatial size {x.shape[1:3]} is too small for {len(self.ch_mult)} levels "
                f"(ch_mult={self.ch_mult}): level sizes would be {sizes}"
            )

    def _attention_at(self, features: jax.Array) -> bool:
        return features.shape[1] in self.attn_resolutions

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool = False
    ) -> jax.Array:
        """x: (B, H, W, C) images, t: (B,) network time input, y: optional (B,) int labels."""
        self._check_input(x)
        t = check_time_input(t, x.shape[0])
        embedding = ConditioningEmbedding(
            features=4 * self.ch,
            embedding_dim=self.ch,
            embedding_type=self.embedding_type,
            fourier_scale=self.fourier_scale,
            num_classes=self.num_classes,
        )(t, y)

        block_classes = _block_classes(self.remat)
        counts = {"ResnetBlock": 0, "AttentionBlock": 0}

        def block_name(kind: str) -> str:
            # The names flax gives unnamed submodules, so that remat (whose wrapped classes
            # flax would name 'CheckpointResnetBlock_0', ...) keeps the parameter tree.
            counts[kind] += 1
            return f"{kind}_{counts[kind] - 1}"

        conv_options = {"dtype": self.dtype, "conv_weight_grad": self.conv_weight_grad}

        def res_block(features: jax.Array, out_channels: int) -> jax.Array:
            block = block_classes["ResnetBlock"](
                out_channels,
                self.dropout,
                self.skip_rescale,
                name=block_name("ResnetBlock"),
                **conv_options,
            )
            return block(features, embedding, train)

        def attention(features: jax.Array) -> jax.Array:
            block = block_classes["AttentionBlock"](
                self.skip_rescale, dtype=self.dtype, name=block_name("AttentionBlock")
            )
            return block(features)

        last_level = len(self.ch_mult) - 1
        input_conv = conv3x3(self.ch, dtype=self.dtype, weight_grad=self.conv_weight_grad)
        hidden = input_conv(x)
        skips = [hidden]
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                hidden = res_block(hidden, self.ch * mult)
                if self._attention_at(hidden):
                    hidden = attention(hidden)
                skips.append(hidden)
            if level != last_level:
                hidden = Downsample(self.resamp_with_conv, **conv_options)(hidden)
                skips.append(hidden)

        middle_channels = hidden.shape[-1]
        hidden = res_block(hidden, middle_channels)
        hidden = attention(hidden)
        hidden = res_block(hidden, middle_channels)

        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for _ in range(self.num_res_blocks + 1):
                hidden = res_block(jnp.concatenate([hidden, skips.pop()], axis=-1), self.ch * mult)
                if self._attention_at(hidden):
                    hidden = attention(hidden)
            if level != 0:
                upsample = Upsample(self.resamp_with_conv, **conv_options)
                hidden = upsample(hidden, skips[-1].shape[1:3])

        out_channels = x.shape[-1] if self.out_channels is None else self.out_channels
        output_conv = conv3x3(
            out_channels,
            zero_init=True,
            name="output_conv",
            dtype=self.dtype,
            weight_grad=self.conv_weight_grad,
        )
        output = output_conv(nn.silu(group_norm(hidden, self.dtype))).astype(jnp.float32)
        if self.scale_by_sigma:
            output = divide_by_sigma(output, t)
        return output
