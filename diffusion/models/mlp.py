"""Residual MLP for low-dimensional data (2-D toy distributions, Gaussian mixtures in R^D)."""

import flax.linen as nn
import jax

from diffusion.models.embeddings import (
    ConditioningEmbedding,
    check_conditioning_fields,
    check_time_input,
    default_kernel_init,
    divide_by_sigma,
)


class MLPResidualBlock(nn.Module):
    """``x + Dense(Dropout(SiLU(Dense(SiLU(x)) + Dense(SiLU(emb)))))``: the DDPM residual block
    (Ho et al. 2020, App. B) with its convolutions replaced by Dense layers and no normalisation.
    """

    features: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, embedding: jax.Array, *, train: bool = False) -> jax.Array:
        """x: (B, features), embedding: (B, E) -> (B, features)."""
        hidden = nn.Dense(self.features, kernel_init=default_kernel_init)(nn.silu(x))
        hidden = hidden + nn.Dense(self.features, kernel_init=default_kernel_init)(
            nn.silu(embedding)
        )
        hidden = nn.Dropout(self.dropout)(nn.silu(hidden), deterministic=not train)
        return x + nn.Dense(self.features, kernel_init=default_kernel_init)(hidden)


class MLP(nn.Module):
    """Residual MLP, ``apply(params, x, t, y=None, train=False)`` -> same shape as ``x`` (B, D).

    ``Dense(x) -> num_blocks x MLPResidualBlock -> SiLU -> Dense`` with a zero-initialised output
    layer (output exactly 0 at init). The conditioning (time features of width ``embedding_dim``
    through Dense-SiLU-Dense of width ``width``, plus the optional label embedding) is the U-Net's.

    Attributes:
      width: hidden width (and conditioning width).
      num_blocks: residual blocks.
      embedding_dim: width of the sinusoidal / Fourier features of ``t``.
      embedding_type: 'positional' or 'fourier'.
      fourier_scale: standard deviation of the Fourier frequencies.
      num_classes: None for unconditional; else labels ``0..num_classes-1`` plus the null label
        ``num_classes`` (used when ``y`` is None).
      dropout: dropout rate inside the residual blocks (active only with ``train=True``).
      scale_by_sigma: divide the output by ``exp(t)``; contract: ``t`` IS ``log sigma``.
    """

    width: int = 256
    num_blocks: int = 3
    embedding_dim: int = 64
    embedding_type: str = "positional"
    fourier_scale: float = 16.0
    num_classes: int | None = None
    dropout: float = 0.0
    scale_by_sigma: bool = False

    def __post_init__(self) -> None:
        """Check the hyperparameters at construction (ValueError naming the bad value)."""
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {self.num_blocks}")
        if self.embedding_dim < 4 or self.embedding_dim % 2:
            raise ValueError(
                f"embedding_dim must be an even integer >= 4, got {self.embedding_dim}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        check_conditioning_fields(self.embedding_type, self.fourier_scale, self.num_classes)
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool = False
    ) -> jax.Array:
        """x: (B, D) points, t: (B,) network time input, y: optional (B,) int labels."""
        if x.ndim != 2:
            raise ValueError(f"x must have shape (batch, dim), got {x.shape}")
        t = check_time_input(t, x.shape[0])
        embedding = ConditioningEmbedding(
            features=self.width,
            embedding_dim=self.embedding_dim,
            embedding_type=self.embedding_type,
            fourier_scale=self.fourier_scale,
            num_classes=self.num_classes,
        )(t, y)
        hidden = nn.Dense(self.width, kernel_init=default_kernel_init)(x)
        for _ in range(self.num_blocks):
            hidden = MLPResidualBlock(self.width, self.dropout)(hidden, embedding, train=train)
        output_layer = nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros, name="output_layer")
        output = output_layer(nn.silu(hidden))
        if self.scale_by_sigma:
            output = divide_by_sigma(output, t)
        return output
