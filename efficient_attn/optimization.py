"""The optimizer: AdamW with linear warmup, rsqrt or cosine decay, and global-norm clipping.

`config.optimizer` fields (see configs/common.py `base_optimizer`): learning_rate (the peak),
schedule ('rsqrt' | 'cosine' | 'constant'), warmup_steps, end_learning_rate_factor (cosine), b1, b2, eps,
weight_decay, grad_clip_norm (0 = off).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ('rsqrt', 'cosine', 'constant')


def _field(config: Any, name: str) -> Any:
  try:
    return config[name]
  except (KeyError, AttributeError):
    raise ValueError(f'optimizer config has no field {name!r}.') from None


def _is_number(value: Any) -> bool:
  """A finite int or float (not a bool): inf and nan would only show up as a NaN loss later."""
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_optimizer_config(config: Any) -> None:
  """Raises ValueError naming the first invalid `config.optimizer` field."""
  lr = _field(config, 'learning_rate')
  if not _is_number(lr) or not lr > 0:
    raise ValueError(f'optimizer.learning_rate must be a finite number > 0, got {lr!r}.')
  schedule = _field(config, 'schedule')
  if schedule not in SCHEDULES:
    raise ValueError(f'optimizer.schedule must be one of {", ".join(SCHEDULES)}, got {schedule!r}.')
  warmup = _field(config, 'warmup_steps')
  if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
    raise ValueError(f'optimizer.warmup_steps must be an integer >= 0, got {warmup!r}.')
  for name in ('b1', 'b2'):
    value = _field(config, name)
    if not _is_number(value) or not 0 <= value < 1:
      raise ValueError(f'optimizer.{name} must be in [0, 1), got {value!r}.')
  for name in ('eps', 'weight_decay', 'grad_clip_norm', 'end_learning_rate_factor'):
    value = _field(config, name)
    if not _is_number(value) or value < 0:
      raise ValueError(f'optimizer.{name} must be a finite number >= 0, got {value!r}.')


def learning_rate_schedule(config: Any, total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """The learning rate as a function of the update count (0 for the first update).

  All schedules warm up linearly to `learning_rate` over `warmup_steps` updates; update c (counting
  from 0) uses the factor (c + 1) / warmup, so the first update already moves the weights. Then:
    rsqrt:    lr * sqrt(warmup / (c + 1))  -- LRA's `constant * linear_warmup * rsqrt_decay` written
              with its peak as the parameter (LRA base lr = peak * sqrt(warmup)).
    cosine:   from lr towards end_learning_rate_factor * lr along a half cosine that ends just after
              update `total_steps`.
    constant: lr.
  """
  check_optimizer_config(config)
  peak = float(config.learning_rate)
  warmup = int(config.warmup_steps)
  schedule = config.schedule
  end = float(config.end_learning_rate_factor) * peak
  # +1: the last update (c = total_steps) still has a small positive rate rather than exactly 0.
  decay_steps = max(1, total_steps - warmup + 1)

  def fn(count):
    c = jnp.asarray(count, jnp.float32) + 1.0
    warm = jnp.minimum(1.0, c / warmup) if warmup > 0 else jnp.float32(1.0)
    if schedule == 'rsqrt':
      decay = jnp.sqrt(max(warmup, 1) / jnp.maximum(c, max(warmup, 1)))
      return peak * warm * decay
    if schedule == 'cosine':
      progress = jnp.clip((c - warmup) / decay_steps, 0.0, 1.0)
      return warm * (end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
    return peak * warm

  return fn


def _decay_mask(params: Any) -> Any:
  # Decay matrices (kernels, embeddings), not biases and LayerNorm scales.
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(config: Any, total_steps: int) -> tuple[optax.GradientTransformation,
                                                         Callable[[jax.Array], jax.Array]]:
  """AdamW (decoupled weight decay on matrices) behind optional global-norm clipping.

  Returns:
    (the optax transformation, the learning-rate schedule it uses).
  """
  schedule = learning_rate_schedule(config, total_steps)
  adamw = optax.adamw(schedule, b1=float(config.b1), b2=float(config.b2), eps=float(config.eps),
                      weight_decay=float(config.weight_decay), mask=_decay_mask)
  clip = float(config.grad_clip_norm)
  tx = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw
  return tx, schedule
