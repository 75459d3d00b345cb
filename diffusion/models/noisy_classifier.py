"""A noise-conditional classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021).

Dhariwal & Nichol's classifier is the downsampling half of their U-Net, conditioned on the noise
level through the same time embedding, ending in a pooled linear head (their Sec. 4). This is that
design, small: the project's time embedding (``ConditioningEmbedding`` without labels), then

* points (B, D): a Dense layer and ``num_blocks`` residual MLP blocks (``MLPResidualBlock``);
* images (B, H, W, C): a 3x3 convolution, then per level ``num_blocks`` DDPM residual blocks
  (``ResnetBlock``) and a stride-2 convolution between levels, then GroupNorm, SiLU and a global
  average pool (in place of their attention pool);

and a zero-initialised linear head, so that at initialisation every class has probability 1 / C.
The network normalises each example on its own (GroupNorm, no batch statistics), as gradient
guidance requires. ``apply(params, x, t)`` returns (B, num_classes) logits; ``t`` is the number the
network embeds (see ``diffusion.parameterization.network_time``).
"""

import flax.linen as nn
import jax

from diffusion.models.embeddings import (
    ConditioningEmbedding,
    check_conditioning_fields,
    check_time_input,
    default_kernel_init,
)
from diffusion.models.mlp import MLPResidualBlock
from diffusion.models.unet import Downsample, ResnetBlock, conv3x3, group_norm

__all__ = ["NoisyClassifier"]


class NoisyClassifier(nn.Module):
    """Time-conditional classifier of points (B, D) or images (B, H, W, C).

    Attributes:
      num_classes: number of classes (width of the logits).
      width: hidden width of the MLP trunk and of the time embedding.
      num_blocks: residual blocks (per level for images).
      channels: channels per resolution level (images only); len(channels) - 1 downsamplings.
      embedding_dim: width of the sinusoidal / Fourier features of t.
      embedding_type: 'positional' or 'fourier'.
      fourier_scale: standard deviation of the Fourier frequencies.
    """

    num_classes: int
    width: int = 128
    num_blocks: int = 2
    channels: tuple[int, ...] = (32, 64)
    embedding_dim: int = 64
    embedding_type: str = "positional"
    fourier_scale: float = 16.0

    def __post_init__(self) -> None:
        """Check the hyperparameters at construction (ValueError naming the bad value)."""
        if not (isinstance(self.num_classes, int) and self.num_classes >= 2):
            raise ValueError(f"num_classes must be an integer >= 2, got {self.num_classes!r}")
        if self.width < 1 or self.num_blocks < 0:
            raise ValueError(
                f"width must be >= 1 and num_blocks >= 0, got {self.width} and {self.num_blocks}"
            )
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must be positive widths, got {self.channels}")
        if self.embedding_dim < 4 or self.embedding_dim % 2:
            raise ValueError(
                f"embedding_dim must be an even integer >= 4, got {self.embedding_dim}"
            )
        check_conditioning_fields(self.embedding_type, self.fourier_scale, None)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        """x: (B, D) or (B, H, W, C), t: (B,) network time input -> (B, num_classes) logits."""
        if x.ndim not in (2, 4):
            raise ValueError(f"x must be (batch, dim) or (batch, H, W, C), got shape {x.shape}")
        t = check_time_input(t, x.shape[0])
        embedding = ConditioningEmbedding(
            features=self.width,
            embedding_dim=self.embedding_dim,
            embedding_type=self.embedding_type,
            fourier_scale=self.fourier_scale,
        )(t)
        if x.ndim == 2:
            hidden = nn.Dense(self.width, kernel_init=default_kernel_init)(x)
            for _ in range(self.num_blocks):
                hidden = MLPResidualBlock(self.width)(hidden, embedding)
        else:
            hidden = conv3x3(self.channels[0])(x)
            for level, level_channels in enumerate(self.channels):
                if level > 0:
                    hidden = Downsample(with_conv=True)(hidden)
                for _ in range(self.num_blocks):
                    hidden = ResnetBlock(level_channels)(hidden, embedding)
            hidden = nn.silu(group_norm(hidden)).mean(axis=(1, 2))
            hidden = nn.Dense(self.width, kernel_init=default_kernel_init)(hidden)
        head = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="logits")
        return head(nn.silu(hidden))
