"""Optimizers and learning-rate schedules (optax), built from plain arguments that gin binds at the edges."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]


def create_schedule(*, peak_value: float, warmup_steps: int = 0, decay: str = "constant",
                    decay_steps: Optional[int] = None, end_value: float = 0.0) -> Schedule:
    """Linear warmup from 0 to `peak_value` over `warmup_steps`, then a decay.

    Args:
      decay: 'constant' (stay at peak), 'cosine' or 'linear' (to end_value at step decay_steps, counted from
        step 0, warmup included), 'rsqrt' (peak * sqrt(warmup_steps / step) after warmup).
      decay_steps: required for 'cosine' and 'linear'. It is a setting of its own, not the run length, so a
        resumed or extended run keeps the same schedule.
    """
    if decay in ("cosine", "linear"):
        if decay_steps is None or decay_steps <= warmup_steps:
            raise ValueError(f"decay={decay!r} needs decay_steps > warmup_steps ({warmup_steps}), got {decay_steps}")
        rest = decay_steps - warmup_steps
        if decay == "cosine":
            after = optax.cosine_decay_schedule(peak_value, rest, alpha=end_value / peak_value if peak_value else 0.0)
        else:
            after = optax.linear_schedule(peak_value, end_value, rest)
    elif decay == "constant":
        after = optax.constant_schedule(peak_value)
    elif decay == "rsqrt":
        offset = max(warmup_steps, 1)

        def after(step):
            return peak_value * jnp.sqrt(offset / (step + offset))
    else:
        raise ValueError(f"decay={decay!r}: expected 'constant', 'cosine', 'linear' or 'rsqrt'")
    if warmup_steps <= 0:
        return after
    warmup = optax.linear_schedule(0.0, peak_value, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optax transformation and the schedule it follows (kept for logging the learning rate)."""

    tx: optax.GradientTransformation
    schedule: Schedule


def _decay_mask(params):
    # No weight decay on vectors (norm scales) and on the relative-position table.
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and "relpos_bias" not in jax.tree_util.keystr(path), params)


def create_optimizer(*, name: str = "adamw", learning_rate: Schedule | float = 1e-3, b1: float = 0.9,
                     b2: float = 0.98, eps: float = 1e-9, weight_decay: float = 0.0,
                     clip_norm: Optional[float] = 1.0) -> Optimizer:
    """AdamW or Adafactor with global-norm gradient clipping.

    Args:
      name: 'adamw' or 'adafactor' (factored second moments, no first moment: the memory-light choice).
      learning_rate: a schedule (create_schedule) or a constant.
      b1, b2, eps: AdamW moments; for Adafactor b2 is its decay_rate.
      weight_decay: decoupled weight decay, applied to matrices only.
      clip_norm: clip gradients to this global norm first (None: no clipping).
    """
    schedule = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)
    if name == "adamw":
        tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask)
    elif name == "adafactor":
        tx = optax.adafactor(schedule, decay_rate=b2, clipping_threshold=None,
                             weight_decay_rate=weight_decay or None, weight_decay_mask=_decay_mask,
                             multiply_by_parameter_scale=False)
    else:
        raise ValueError(f"optimizer name={name!r}: expected 'adamw' or 'adafactor'")
    if clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return Optimizer(tx=tx, schedule=schedule)


def create_gan_optimizer(*, generator: Optimizer, discriminator: Optimizer) -> Optimizer:
    """One optimizer over params {'generator': ..., 'discriminator': ...}: each part follows its own optimizer
    (learning rate, clipping). The logged learning rate is the generator's."""
    def labels(params):
        unknown = set(params) - {"generator", "discriminator"}
        if unknown:
            raise ValueError(f"GAN parameters must be {{'generator', 'discriminator'}}, got extra {sorted(unknown)}")
        return {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}
    tx = optax.multi_transform({"generator": generator.tx, "discriminator": discriminator.tx}, labels)
    return Optimizer(tx=tx, schedule=generator.schedule)
