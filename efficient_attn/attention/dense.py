"""The plain O(n^2) reference: `dense_attention`.

Every variant in the package is tested against this function fed with the variant's own
`dense_mask` / `dense_bias`, so it is written for clarity, not speed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# A large *finite* negative: masked scores use it instead of -inf so that max/exp never produce NaN.
# A bias at or below MASK_VALUE / 2 marks a pair as invisible (see `dense_attention`).
MASK_VALUE = -1e30


def dense_attention(q, k, v, *, mask=None, bias=None):
  """Softmax attention over all pairs.

  Args:
    q: [batch, q_len, heads, head_dim].
    k, v: [batch, k_len, heads, head_dim].
    mask: optional bool, broadcastable to [batch, heads, q_len, k_len]; True = may attend.
    bias: optional float, broadcastable to [batch, heads, q_len, k_len], added to the scores
      (`q.k / sqrt(head_dim)`). Entries <= MASK_VALUE / 2 count as invisible.

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype. A query that sees no key gets zeros.
  """
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  visible = jnp.ones(scores.shape, bool)
  if mask is not None:
    visible = visible & jnp.asarray(mask, bool)
  if bias is not None:
    bias = jnp.asarray(bias, jnp.float32)
    visible = visible & (bias > MASK_VALUE / 2)
    scores = scores + jnp.where(visible, bias, 0.0)
  scores = jnp.where(visible, scores, MASK_VALUE)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  p = jnp.where(visible, jnp.exp(scores - jax.lax.stop_gradient(row_max)), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum('bhqk,bkhd->bqhd', p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)
