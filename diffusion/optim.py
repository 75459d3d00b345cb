"""The optimiser, its learning-rate schedules and the EMA decay: what a train step applies.

DDPM (Ho et al. 2020) and score_sde (Song et al. 2021) train with Adam, learning rate 2e-4, 5000
warm-up steps and gradient clipping at norm 1, and sample from an exponential moving average of the
parameters; the defaults here follow them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "DECAYS",
    "OPTIMIZERS",
    "ema_decay_at",
    "learning_rate_schedule",
    "make_optimizer",
]

OPTIMIZERS = ("adam", "adamw")
DECAYS = ("constant", "cosine")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def learning_rate_schedule(
    peak_learning_rate: float,
    *,
    warmup_steps: int = 0,
    decay: str = "constant",
    total_steps: int | None = None,
    final_learning_rate: float = 0.0,
) -> optax.Schedule:
    """Learning rate of update s (s = the number of updates applied before it).

    Linear warm-up: lr(s) = peak * s / warmup for s < warmup (Ho et al. 2020's and score_sde's
    ``lr * min(step / warmup, 1)``, so the very first update has lr 0). After warm-up either
    'constant': lr(s) = peak, or 'cosine' (Loshchilov & Hutter 2017, SGDR, eq. 5, without restarts):
    lr(s) = final + (peak - final) (1 + cos(pi (s - warmup) / (total - warmup))) / 2 up to
    s = total_steps, then final.
    """
    _check_positive("peak_learning_rate", peak_learning_rate)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
    if decay not in DECAYS:
        raise ValueError(f"unknown decay {decay!r}; accepted: {', '.join(DECAYS)}")
    if decay == "constant":
        if warmup_steps == 0:
            return optax.constant_schedule(peak_learning_rate)
        return optax.linear_schedule(0.0, peak_learning_rate, warmup_steps)
    if total_steps is None or total_steps <= warmup_steps:
        raise ValueError(
            f"decay='cosine' needs total_steps > warmup_steps = {warmup_steps}, got {total_steps!r}"
        )
    if not 0.0 <= final_learning_rate <= peak_learning_rate:
        raise ValueError(
            f"final_learning_rate must be in [0, peak_learning_rate = {peak_learning_rate}], "
            f"got {final_learning_rate!r}"
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,  # optax counts the warm-up inside decay_steps
        end_value=final_learning_rate,
    )


def make_optimizer(
    learning_rate: optax.ScalarOrSchedule,
    *,
    name: str = "adam",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """Global-norm clipping (Pascanu et al. 2013: g <- g min(1, c / ||g||_2)) then Adam (Kingma &
    Ba 2015) or AdamW (Loshchilov & Hutter 2019, decoupled weight decay).

    ``grad_clip_norm=None`` disables clipping; ``weight_decay`` needs ``name='adamw'``.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; accepted: {', '.join(OPTIMIZERS)}")
    if name == "adam" and weight_decay != 0.0:
        raise ValueError(f"weight_decay={weight_decay!r} needs name='adamw' (Adam has none)")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"need 0 <= b1, b2 < 1, got b1={b1!r}, b2={b2!r}")
    _check_positive("eps", eps)
    if name == "adam":
        adam = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    else:
        adam = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if grad_clip_norm is None:
        return adam
    _check_positive("grad_clip_norm", grad_clip_norm)
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adam)


def ema_decay_at(step: jax.Array | int, ema_decay: float, ema_warmup: bool) -> jax.Array:
    """EMA decay of the update from ``step`` to ``step + 1``.

    Without warm-up the constant ``ema_decay`` (DDPM, score_sde). With warm-up
    min(ema_decay, (1 + s) / (10 + s)), the ``num_updates`` rule of TensorFlow's
    ``tf.train.ExponentialMovingAverage``, with s = ``step`` updates applied before this one.
    """
    decay = jnp.asarray(ema_decay, jnp.float32)
    if not ema_warmup:
        return decay
    num_updates = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + num_updates) / (10.0 + num_updates))
