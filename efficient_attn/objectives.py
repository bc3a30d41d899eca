"""Losses and metrics of the three task kinds, as sums that add up over batches and devices.

Classification ('classify', 'pair'): softmax cross-entropy and accuracy over examples, each weighted by
the batch's 'weights' (0 for the filler rows of the last evaluation batch; 1 when absent).
Language modelling ('lm'): the same per predicted byte, over the positions whose label is a real token
(label id > 0: id 0 is padding); the headline metric is bits per byte = mean nats / ln 2.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from efficient_attn.data.base import KINDS


def batch_sums(kind: str, logits: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Sums of one batch.

  Args:
    kind: one of KINDS.
    logits: float [batch, classes] ('classify', 'pair') or [batch, length, vocab] ('lm').
    batch: 'labels' int [batch] or [batch, length]; optional 'weights' float [batch]; for 'lm' also
      'mask' bool [batch, length] (True for real input tokens).

  Returns:
    float32 scalars: 'loss_sum' (nats), 'correct', 'count' (examples, or predicted bytes for 'lm').
  """
  if kind not in KINDS:
    raise ValueError(f'Unknown task kind {kind!r}; valid kinds: {", ".join(KINDS)}.')
  labels = batch['labels']
  logits = logits.astype(jnp.float32)
  weights = batch.get('weights')
  if weights is None:
    weights = jnp.ones(labels.shape[:1], jnp.float32)
  if kind == 'lm':
    token_weights = (labels > 0).astype(jnp.float32) * weights[:, None].astype(jnp.float32)
    mask = batch.get('mask')
    if mask is not None and mask.shape == labels.shape:
      token_weights = token_weights * mask.astype(jnp.float32)
    weights = token_weights
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  return {'loss_sum': jnp.sum(nll * weights), 'correct': jnp.sum(correct * weights),
          'count': jnp.sum(weights)}


def mean_loss(sums: Mapping[str, jax.Array]) -> jax.Array:
  """The training objective: mean nats per example (or per predicted byte)."""
  return sums['loss_sum'] / jnp.maximum(sums['count'], 1.0)


def summarize(kind: str, sums: Mapping[str, float]) -> dict[str, float]:
  """Host-side metrics from accumulated sums: loss, accuracy (and bits_per_byte for 'lm')."""
  count = float(sums['count'])
  if count <= 0:
    raise ValueError('No weighted examples were evaluated (count 0).')
  out = {'loss': float(sums['loss_sum']) / count, 'accuracy': float(sums['correct']) / count,
         'count': count}
  if kind == 'lm':
    out['bits_per_byte'] = out['loss'] / math.log(2)
  return out


def selection_metric(kind: str) -> tuple[str, str]:
  """(metric name, 'max' or 'min') that picks the best validation checkpoint."""
  return ('bits_per_byte', 'min') if kind == 'lm' else ('accuracy', 'max')
