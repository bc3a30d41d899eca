"""Nystromformer attention (`nystrom`, Xiong et al. 2021): softmax attention through landmarks.

With landmarks Lq, Lk ([m, d] per head: segment means of the queries and of the keys) and scores
scaled by 1 / sqrt(d):

  out = F A^+ B V,  F = softmax(Q Lk^T) [n, m],  A = softmax(Lq Lk^T) [m, m],
                    B = softmax(Lq K^T) [m, n]

evaluated right to left (F (A^+ (B V))), so no array has more than n * m elements: O(n m d) time and
O(n m) memory. A^+ is the paper's iterative Moore-Penrose pseudo-inverse (`iterative_pinv`).

Landmarks use the real tokens only: with L real tokens (L read from `padding_mask` per sequence),
the real token of rank r (0-based, in sequence order) falls in segment floor(r * m / L), so any L
works (segments of floor(L / m) or ceil(L / m) tokens) and padded tokens never enter a landmark.
When L < m only L segments are filled; the empty ones are invalid landmarks, masked out of every
softmax (their rows and columns of A are zero, which the pseudo-inverse iteration keeps zero).
Padded keys are masked out of B; outputs at padded queries are zeros.

Not included: the paper's depthwise convolution of V (kernel 33) added to the output. It is a
learned residual on the values, outside the attention map: a model can add it, but it is no part of
this attention's definition and would make the variant `learned`. Causal attention is not defined
in the paper (landmarks average over the whole sequence, so any query would see the future):
`supports_causal = False`, and causal=True raises.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from efficient_attn.attention.api import Attention, check_positive_int, register
from efficient_attn.attention.dense import MASK_VALUE


def iterative_pinv(a, iters: int):
  """The Moore-Penrose pseudo-inverse by the iteration Nystromformer uses (Razavi et al. 2014).

  Z_0 = A^T / (||A||_1 ||A||_inf), Z_{t+1} = Z_t (13 I - A Z_t (15 I - A Z_t (7 I - A Z_t))) / 4
  (the paper's Eq., evaluated in residual form, see below),
  with the norms the largest column and row sums of |A| per matrix (per batch and head, so batch
  elements never interact). Rows and columns of A that are zero stay zero in every Z_t.

  Args:
    a: [..., m, m] (float32 or float64).
    iters: the number of iterations (the paper uses 6).
  Returns:
    [..., m, m] in a's dtype.
  """
  col = jnp.max(jnp.sum(jnp.abs(a), axis=-2), axis=-1)
  row = jnp.max(jnp.sum(jnp.abs(a), axis=-1), axis=-1)
  norm = col * row
  z = jnp.swapaxes(a, -1, -2) / jnp.where(norm > 0, norm, 1.0)[..., None, None]
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)
  for _ in range(iters):
    # The same polynomial in the residual E = I - A Z: (13 I - X (15 I - X (7 I - X))) / 4 with
    # X = I - E is I + E + E^2 + E^3 / 4. Near convergence E is small, so this form adds small
    # corrections to Z, where the 13 / 15 / 7 form cancels terms of size ~60 (and its gradient too:
    # about two digits of float32 lost per iteration).
    e = eye - a @ z
    z = z + z @ (e @ (eye + e @ (eye + 0.25 * e)))
  return z


def _compute_dtype(x):
  """float32 for bfloat16/float16/float32 inputs (statistics in float32); float64 stays float64."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _masked_softmax(scores, visible):
  """Softmax over the last axis among `visible` entries; rows with none visible are zeros."""
  s = jnp.where(visible, scores, MASK_VALUE)
  top = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  p = jnp.where(visible, jnp.exp(s - top), 0.0)
  den = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(den > 0, den, 1.0)


def segment_landmarks(x, real, m: int):
  """Segment means of the real tokens: x [b, n, h, d] -> ([b, m, h, d] in x's dtype, valid [b, m]).

  Token of rank r among the L real ones belongs to segment floor(r * m / L) (a one-hot [b, n, m]
  membership, linear in n for fixed m); empty segments (L < m) are invalid and hold zeros.
  """
  count = jnp.sum(real, axis=1, keepdims=True, dtype=jnp.int32)  # [b, 1]
  rank = jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1
  segment = (rank * m) // jnp.maximum(count, 1)
  member = (segment[:, :, None] == jnp.arange(m)[None, None, :]) & real[:, :, None]  # [b, n, m]
  size = jnp.sum(member, axis=1)  # [b, m]
  sums = jnp.einsum('bnm,bnhd->bmhd', member.astype(x.dtype), x)
  return sums / jnp.maximum(size, 1)[:, :, None, None].astype(x.dtype), size > 0


@register('nystrom')
class Nystrom(Attention):
  """Nystromformer (Xiong et al. 2021, Sec. 3): segment-mean landmarks, iterative pseudo-inverse.

  Options: `num_landmarks` m (default 64), `pinv_iters` (default 6, the paper's). Bidirectional
  only. `reference` builds the approximate attention matrix F A^+ B explicitly ([n, n]) and
  multiplies it by V, with landmarks from an explicit [m, n] membership matrix; A^+ is the same
  `iterative_pinv` (it is the definition: the exact `jnp.linalg.pinv` differs until the iteration
  has converged, see tests/test_kernel_variants.py).
  """
  supports_pallas = False  # not a block-sparse pattern
  supports_causal = False  # landmarks average over the whole sequence (module docstring)
  num_landmarks: int = 64
  pinv_iters: int = 6

  @classmethod
  def small_options(cls, heads=2):
    return dict(num_landmarks=4)

  @classmethod
  def preset(cls, keys=512):
    return dict(num_landmarks=64)

  def validate(self):
    check_positive_int(self.name, 'num_landmarks', self.num_landmarks)
    check_positive_int(self.name, 'pinv_iters', self.pinv_iters)

  def _attend(self, q, k, v, *, padding_mask, causal, rng):
    del causal, rng  # causal=True was refused in _prepare
    real = padding_mask
    scale = q.shape[-1] ** -0.5
    dtype = _compute_dtype(q)
    q, k, v = (jnp.where(real[:, :, None, None], x, 0).astype(dtype) for x in (q, k, v))
    lq, ok = segment_landmarks(q, real, self.num_landmarks)
    lk, _ = segment_landmarks(k, real, self.num_landmarks)  # same segments: same validity
    f = _masked_softmax(jnp.einsum('bnhd,bmhd->bhnm', q, lk) * scale, ok[:, None, None, :])
    a = _masked_softmax(jnp.einsum('bmhd,blhd->bhml', lq, lk) * scale,
                        ok[:, None, :, None] & ok[:, None, None, :])
    bmat = _masked_softmax(jnp.einsum('bmhd,bnhd->bhmn', lq, k) * scale,
                           ok[:, None, :, None] & real[:, None, None, :])
    bv = jnp.einsum('bhmn,bnhd->bhmd', bmat, v)
    zbv = iterative_pinv(a, self.pinv_iters) @ bv
    return jnp.einsum('bhnm,bhmd->bnhd', f, zbv)

  def reference(self, q, k, v, *, padding_mask=None, causal=False, rng=None, params=None):
    """F A^+ B as an explicit [b, h, n, n] matrix, times V (see the class docstring)."""
    q, k, v, padding_mask, causal, rng, params = self._prepare(q, k, v, padding_mask, causal, rng,
                                                               params)
    real = padding_mask
    m, scale = self.num_landmarks, q.shape[-1] ** -0.5
    dtype = _compute_dtype(q)
    qf, kf, vf = (jnp.where(real[:, :, None, None], x, 0).astype(dtype) for x in (q, k, v))
    # Membership [b, m, n]: the real token of rank r is in segment s iff s L <= r m < (s + 1) L.
    count = jnp.sum(real, axis=1).astype(jnp.int32)[:, None, None]
    rank = (jnp.cumsum(real, axis=1) - 1).astype(jnp.int32)[:, None, :]
    s = jnp.arange(m, dtype=jnp.int32)[None, :, None]
    member = (s * count <= rank * m) & (rank * m < (s + 1) * count) & real[:, None, :]
    size = jnp.sum(member, axis=-1, keepdims=True)
    ok = size[..., 0] > 0  # [b, m]
    # Sums, then one division (as rounded in the fast path: A^+ amplifies landmark rounding).
    mean = lambda x: (jnp.einsum('bmn,bnhd->bhmd', member.astype(dtype), x)
                      / jnp.maximum(size, 1)[:, None].astype(dtype))
    lq, lk = mean(qf), mean(kf)
    softmax = _masked_softmax
    f = softmax(jnp.einsum('bnhd,bhmd->bhnm', qf, lk) * scale, ok[:, None, None, :])
    a = softmax(jnp.einsum('bhmd,bhld->bhml', lq, lk) * scale,
                ok[:, None, :, None] & ok[:, None, None, :])
    bmat = softmax(jnp.einsum('bhmd,bnhd->bhmn', lq, kf) * scale,
                   ok[:, None, :, None] & real[:, None, None, :])
    attn = f @ (iterative_pinv(a, self.pinv_iters) @ bmat)  # [b, h, n, n]
    out = jnp.einsum('bhqk,bkhd->bqhd', attn, vf)
    return jnp.where(real[:, :, None, None], out, 0).astype(q.dtype)
