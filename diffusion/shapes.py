"""Broadcasting helpers shared by every module that mixes per-example coefficients with data."""

import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike


def expand_to(coef: ArrayLike, x: ArrayLike) -> Array:
    """Append trailing unit axes to ``coef`` so that it broadcasts against ``x`` from the left.

    A scalar stays a scalar; a (batch,) coefficient becomes (batch, 1, ..., 1) with ``x.ndim`` axes.
    """
    coef = jnp.asarray(coef)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (jnp.ndim(x) - coef.ndim))


def sum_except_batch(x: ArrayLike) -> Array:
    """Sum over every axis but the first (per-example reductions of log-densities and norms)."""
    x = jnp.asarray(x)
    return x.reshape(x.shape[0], -1).sum(axis=-1)
