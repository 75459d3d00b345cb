"""Networks: the DDPM / DDPM++ U-Net, a residual MLP for low-dimensional data, and embeddings.

Every model is a Flax Linen module called as ``model.apply(params, x, t, y=None, train=False)``
with batch-first ``x`` (NHWC images or (B, D) points), ``t`` a (B,) float array (the number the
network embeds, already mapped by the caller) and ``y`` optional (B,) int class labels.
"""

from diffusion.models.embeddings import (
    ConditioningEmbedding,
    TimeEmbeddingMLP,
    gaussian_fourier_features,
    sinusoidal_embedding,
)
from diffusion.models.mlp import MLP, MLPResidualBlock
from diffusion.models.unet import AttentionBlock, Downsample, ResnetBlock, UNet, Upsample

__all__ = [
    "MLP",
    "AttentionBlock",
    "ConditioningEmbedding",
    "Downsample",
    "MLPResidualBlock",
    "ResnetBlock",
    "TimeEmbeddingMLP",
    "UNet",
    "Upsample",
    "gaussian_fourier_features",
    "sinusoidal_embedding",
]
