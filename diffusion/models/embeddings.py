"""Embeddings of the network's time / noise-level input and of class labels.

The networks never map a diffusion time to a noise level themselves: the caller passes the number
the network should embed (e.g. ``999 * t`` for a DDPM-style positional embedding, ``log sigma`` for
NCSN++-style Fourier features), and the modules here embed exactly that number.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

EMBEDDING_TYPES = ("positional", "fourier")

# DDPM and score_sde initialise every Dense/Conv kernel with variance scaling, scale 1, fan_avg,
# uniform (Glorot uniform); zero init is used where a residual branch or the output must start at 0.
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def sinusoidal_embedding(
    t: jax.Array, embedding_dim: int, max_positions: float = 10000.0
) -> jax.Array:
    """Sinusoidal embedding of a scalar (Vaswani et al. 2017, Sec. 3.5; as used by Ho et al. 2020).

    Frequency ``k`` (``k = 0 .. half - 1``, ``half = embedding_dim // 2``) is
    ``max_positions ** (-k / (half - 1))``, so frequencies run geometrically from 1 down to
    ``1 / max_positions``. The output is ``[sin(t * freq), cos(t * freq)]`` (sines first, then
    cosines, as in the DDPM code), shape ``(B, embedding_dim)``.

    Args:
      t: (B,) float array, the number to embed (DDPM embeds the integer step index).
      embedding_dim: even output width, at least 4.
      max_positions: inverse of the lowest frequency.
    """
    if embedding_dim < 4 or embedding_dim % 2:
        raise ValueError(f"embedding_dim must be an even integer >= 4, got {embedding_dim}")
    half = embedding_dim // 2
    # Ho et al. 2020 code: exp(-log(max_positions) * k / (half - 1)).
    frequencies = jnp.exp(-math.log(max_positions) * jnp.arange(half) / (half - 1))
    angles = jnp.asarray(t, jnp.float32)[:, None] * frequencies[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def fourier_frequencies(num_frequencies: int, scale: float, seed: int = 0) -> np.ndarray:
    """The fixed random frequencies of Gaussian Fourier features, ``scale * N(0, 1)`` draws.

    Drawn with numpy's legacy ``RandomState(seed)``, whose stream numpy guarantees never to change
    (NEP 19), so the frequencies are the same on every machine and every jax/numpy version. They
    are a host constant, not a variable: nothing stores them, so no optimiser (not even a weight
    decay, which ``stop_gradient`` would not stop) can change them, and checkpoints do not carry them.
    """
    return scale * np.random.RandomState(seed).standard_normal(num_frequencies).astype(np.float32)


def gaussian_fourier_features(
    t: jax.Array, embedding_dim: int, scale: float = 16.0, seed: int = 0
) -> jax.Array:
    """Gaussian Fourier features (Tancik et al. 2020, Sec. 4; Song et al. 2021, NCSN++).

    ``[sin(2 pi w t), cos(2 pi w t)]`` with ``embedding_dim // 2`` fixed frequencies
    ``w ~ N(0, scale^2)`` (see :func:`fourier_frequencies`); shape ``(B, embedding_dim)``.
    NCSN++ embeds ``t = log sigma`` this way.
    """
    if embedding_dim < 2 or embedding_dim % 2:
        raise ValueError(f"embedding_dim must be an even integer >= 2, got {embedding_dim}")
    frequencies = fourier_frequencies(embedding_dim // 2, scale, seed)
    # Tancik et al. 2020, eq. (5): gamma(v) = [cos(2 pi B v), sin(2 pi B v)].
    angles = 2.0 * np.pi * jnp.asarray(t, jnp.float32)[:, None] * frequencies[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def check_conditioning_fields(
    embedding_type: str, fourier_scale: float, num_classes: int | None
) -> None:
    """Raise ValueError for an unknown embedding type, a non-positive scale or class count."""
    if embedding_type not in EMBEDDING_TYPES:
        raise ValueError(f"embedding_type must be one of {EMBEDDING_TYPES}, got {embedding_type!r}")
    if not fourier_scale > 0:
        raise ValueError(f"fourier_scale must be > 0, got {fourier_scale}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be None or a positive integer, got {num_classes}")


def check_time_input(t: jax.Array, batch_size: int) -> jax.Array:
    """Return ``t`` as a (B,) array; a scalar is broadcast, any other shape raises ValueError."""
    t = jnp.asarray(t)
    if t.ndim == 0:
        return jnp.broadcast_to(t, (batch_size,))
    if t.shape != (batch_size,):
        raise ValueError(f"t must have shape ({batch_size},) (batch size) or (), got {t.shape}")
    return t


class TimeEmbeddingMLP(nn.Module):
    """Dense - SiLU - Dense on the time features (Ho et al. 2020, App. B: width 4 * ch).

    No nonlinearity after the second Dense: each consumer applies SiLU before its own projection,
    as in the DDPM code.
    """

    features: int

    @nn.compact
    def __call__(self, embedding: jax.Array) -> jax.Array:
        """Map (B, E) time features to (B, features)."""
        hidden = nn.Dense(self.features, kernel_init=default_kernel_init)(embedding)
        return nn.Dense(self.features, kernel_init=default_kernel_init)(nn.silu(hidden))


class ConditioningEmbedding(nn.Module):
    """Time (noise-level) embedding plus an optional class-label embedding, shape (B, features).

    The time input goes through sinusoidal or Gaussian Fourier features of width
    ``embedding_dim`` and then :class:`TimeEmbeddingMLP`. With ``num_classes`` set, a learned
    embedding of the label is added; its table has ``num_classes + 1`` rows, the last row
    (index ``num_classes``) being the "null" label used for classifier-free guidance
    (Ho & Salimans 2022). ``y=None`` then means the null label.
    """

    features: int
    embedding_dim: int
    embedding_type: str = "positional"
    fourier_scale: float = 16.0
    num_classes: int | None = None

    @nn.compact
    def __call__(self, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
        """Embed t (B,) and, if the module is class-conditional, y (B,) int labels."""
        check_conditioning_fields(self.embedding_type, self.fourier_scale, self.num_classes)
        if self.num_classes is None and y is not None:
            raise ValueError("y was given but the model is unconditional (num_classes=None)")
        if y is not None and jnp.shape(y) != t.shape:
            raise ValueError(f"y must have shape {t.shape} (batch size), got {jnp.shape(y)}")
        if self.embedding_type == "positional":
            features = sinusoidal_embedding(t, self.embedding_dim)
        else:
            features = gaussian_fourier_features(t, self.embedding_dim, self.fourier_scale)
        embedding = TimeEmbeddingMLP(self.features)(features)
        if self.num_classes is None:
            return embedding
        # y=None means the null label, index num_classes.
        labels = jnp.full(t.shape, self.num_classes, jnp.int32) if y is None else jnp.asarray(y)
        label_table = nn.Embed(self.num_classes + 1, self.features, name="label_embedding")
        return embedding + label_table(labels)


def divide_by_sigma(output: jax.Array, log_sigma: jax.Array) -> jax.Array:
    """NCSN++ output scaling (Song et al. 2021): ``output / sigma`` with ``sigma = exp(log_sigma)``.

    The models' contract for ``scale_by_sigma=True`` is that their time input IS ``log sigma``.
    """
    sigma = jnp.exp(log_sigma).reshape((-1,) + (1,) * (output.ndim - 1))
    return output / sigma
