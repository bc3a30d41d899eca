"""Kernelized attention in linear time and memory: `linear` and `performer`.

Both replace `exp(q.k / sqrt(d))` by a dot product of feature maps `phi(q).phi(k)` (features `f` per
head), so that

  out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)        over the visible keys j

can be evaluated right to left (`kernel_attention`):

- bidirectional: `S = sum_j phi(k_j) v_j^T` ([f, d] per head) and `z = sum_j phi(k_j)` ([f]), then
  `out_i = phi(q_i) S / phi(q_i).z`: O(n f d) time, O(n f + f d) memory.
- causal: a chunked prefix sum. `lax.scan` walks chunks of `chunk_size` positions carrying S and z
  of the chunks before; inside a chunk the masked quadratic part (chunk x chunk) adds the keys
  j <= i of the query's own chunk. O(n f (d + chunk)) time; memory O(n (f + chunk)) plus one [f, d]
  state per chunk kept for the backward pass (n / chunk of them), never an [n, f, d] tensor.

Padded positions are zeroed before anything is computed (so NaN or inf there cannot leak into real
outputs or gradients); padded keys get zero features (no weight) and padded queries zero output.
All feature and prefix-sum arithmetic is float32 whatever the input dtype; outputs are in q's dtype.

`reference` is the explicit quadratic form: `A = phi(Q) phi(K)^T` masked (padding, causal), divided
by its row sums, times V (the two variants differ only in `feature_map`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from efficient_attn.attention.api import Attention, check_positive_int, register
from efficient_attn.attention.blocks import pad_axis, round_up

KERNELS = ('softmax', 'relu')
# Added to every relu feature, as the public Performer code does (google-research/performer,
# fast_attention `relu_kernel_transformation`, numerical_stabilizer=1e-3): a query whose projections
# are all negative still gets a positive normaliser.
RELU_STABILIZER = 1e-3


# --------------------------------------------------------------------------------------------------
# The shared linear-time contraction
# --------------------------------------------------------------------------------------------------


def _causal_prefix_sums(phi_q, phi_k, v, chunk_size: int):
  """Causal numerator [b, n, h, d] and normaliser [b, n, h] by a chunked prefix sum (`lax.scan`)."""
  b, n, h, f = phi_q.shape
  d = v.shape[-1]
  c = min(chunk_size, n)
  m = round_up(n, c)
  nc = m // c

  def chunks(x):  # [b, n, h, ...] -> [nc, b, c, h, ...], zero padded (zero features: no weight)
    x = pad_axis(x, 1, m)
    return jnp.moveaxis(x.reshape((b, nc, c) + x.shape[2:]), 1, 0)

  lower = jnp.tril(jnp.ones((c, c), bool))  # within a chunk: key j <= query i

  def body(carry, xs):
    s, z = carry  # [b, h, f, d], [b, h, f]: sums over the chunks before this one
    pq, pk, vc = xs
    a = jnp.where(lower, jnp.einsum('bihf,bjhf->bhij', pq, pk), 0.0)
    num = jnp.einsum('bhij,bjhd->bihd', a, vc) + jnp.einsum('bihf,bhfd->bihd', pq, s)
    den = jnp.sum(a, axis=-1).transpose(0, 2, 1) + jnp.einsum('bihf,bhf->bih', pq, z)
    s = s + jnp.einsum('bjhf,bjhd->bhfd', pk, vc)
    z = z + jnp.sum(pk, axis=1)
    return (s, z), (num, den)

  init = (jnp.zeros((b, h, f, d), jnp.float32), jnp.zeros((b, h, f), jnp.float32))
  _, (num, den) = jax.lax.scan(body, init, (chunks(phi_q), chunks(phi_k), chunks(v)))
  unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape((b, m) + x.shape[3:])[:, :n]
  return unchunk(num), unchunk(den)


def kernel_attention(phi_q, phi_k, v, *, causal: bool, chunk_size: int = 128):
  """Kernel attention in linear time: out_i = sum_j a_ij v_j / sum_j a_ij, a_ij = phi_q[i].phi_k[j].

  Args:
    phi_q, phi_k: float32 [batch, length, heads, features], non-negative; rows of padded keys
      must be zero (they then get no weight).
    v: [batch, length, heads, head_dim].
    causal: sum only over j <= i (chunked prefix sum, chunks of `chunk_size`).

  Returns:
    float32 [batch, length, heads, head_dim]; zeros where the normaliser is 0 (a query that sees no
    key, or whose features are all zero).
  """
  v = v.astype(jnp.float32)
  if causal:
    num, den = _causal_prefix_sums(phi_q, phi_k, v, chunk_size)
  else:
    s = jnp.einsum('bnhf,bnhd->bhfd', phi_k, v)
    z = jnp.sum(phi_k, axis=1)
    num = jnp.einsum('bnhf,bhfd->bnhd', phi_q, s)
    den = jnp.einsum('bnhf,bhf->bnh', phi_q, z)
  seen = den > 0
  return jnp.where(seen[..., None], num / jnp.where(seen, den, 1.0)[..., None], 0.0)


# --------------------------------------------------------------------------------------------------
# The variants
# --------------------------------------------------------------------------------------------------


def _real(x, padding_mask):
  """bool [batch, length]: the mask, or all True."""
  if padding_mask is None:
    return jnp.ones(x.shape[:2], bool)
  return jnp.asarray(padding_mask, bool)


def _zero_padded(x, real):
  """x [b, n, h, d] with padded positions set to 0 (a select: no gradient reaches their values)."""
  return jnp.where(real[:, :, None, None], x, jnp.zeros((), x.dtype))


class _Kernelized(Attention):
  """Shared fast path and reference of the kernel variants; subclasses define `feature_map`."""
  supports_pallas = False  # not a block-sparse pattern: the fused engine does not apply

  def feature_map(self, x, *, rng=None, is_query: bool = True, padding_mask=None):
    raise NotImplementedError

  def _check_chunk(self):
    check_positive_int(self.name, 'chunk_size', self.chunk_size)

  def _features(self, q, k, padding_mask, rng):
    pq = self.feature_map(q, rng=rng, is_query=True, padding_mask=padding_mask)
    pk = self.feature_map(k, rng=rng, is_query=False, padding_mask=padding_mask)
    return pq, pk

  def _attend(self, q, k, v, *, padding_mask, causal, rng):
    q, k, v = (_zero_padded(x, padding_mask) for x in (q, k, v))
    pq, pk = self._features(q, k, padding_mask, rng)
    return kernel_attention(pq, pk, v, causal=causal, chunk_size=self.chunk_size)

  def reference(self, q, k, v, *, padding_mask=None, causal=False, rng=None, params=None):
    """The explicit quadratic form: A = phi(Q) phi(K)^T [b, h, n, n] masked, row-normalised; A V."""
    q, k, v, padding_mask, causal, rng, params = self._prepare(q, k, v, padding_mask, causal, rng,
                                                               params)
    real = padding_mask
    q, k, v = (_zero_padded(x, real) for x in (q, k, v))
    pq, pk = self._features(q, k, real, rng)
    a = jnp.einsum('bqhf,bkhf->bhqk', pq, pk)
    n = q.shape[1]
    visible = real[:, None, None, :]
    if causal:
      visible = visible & jnp.tril(jnp.ones((n, n), bool))
    a = jnp.where(visible, a, 0.0)
    den = jnp.sum(a, axis=-1, keepdims=True)
    a = a / jnp.where(den > 0, den, 1.0)
    out = jnp.einsum('bhqk,bkhd->bqhd', a, v.astype(jnp.float32))
    return jnp.where(real[:, :, None, None], out, 0).astype(q.dtype)


@register('linear')
class Linear(_Kernelized):
  """Linear Transformer (Katharopoulos et al. 2020, "Transformers are RNNs", Sec. 3.2).

  phi(x) = elu(x) + 1 on the raw q and k (no 1 / sqrt(d) inside phi, as in the paper), so
  features = head_dim. `chunk_size` (causal only) is the chunk of the prefix sum: it trades the
  chunk x chunk quadratic part against the number of scan steps, and does not change the result.
  Cost: O(n d^2) time, O(n d) memory (plus n / chunk_size [d, d] states when causal).
  """
  chunk_size: int = 128

  @classmethod
  def small_options(cls, heads=2):
    return dict(chunk_size=8)

  def validate(self):
    self._check_chunk()

  def feature_map(self, x, *, rng=None, is_query: bool = True, padding_mask=None):
    """phi(x) = elu(x) + 1: [batch, length, heads, head_dim] -> float32 [..., head_dim].

    `rng` and `is_query` are unused (the map is deterministic and the same for queries and keys);
    positions where `padding_mask` is False get zero features.
    """
    del rng, is_query
    x = jnp.asarray(x)
    real = _real(x, padding_mask)
    phi = jax.nn.elu(_zero_padded(x, real).astype(jnp.float32)) + 1.0
    return jnp.where(real[:, :, None, None], phi, 0.0)


def orthonormal_columns(g):
  """The Q of the QR decomposition of g [..., d, d] with a positive diagonal of R (so Q is
  Haar-distributed for Gaussian g), by classical Gram-Schmidt applied twice per column ("CGS2",
  as accurate as Householder QR for these well-conditioned matrices).

  Plain jnp rather than jnp.linalg.qr: on CPU, several LAPACK QR calls of one program (one per
  layer, independent of each other, so run concurrently by XLA) deadlocked the training step of a
  4-layer Performer (jax 0.10.2, 2 cores); matmuls do not.
  """
  d = g.shape[-1]

  def column(j, q):
    v = jax.lax.dynamic_index_in_dim(g, j, axis=-1, keepdims=False)  # [..., d]
    for _ in range(2):  # columns >= j of q are still zero, so they project nothing away
      v = v - jnp.einsum('...ik,...k->...i', q, jnp.einsum('...ik,...i->...k', q, v))
    v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    return jax.lax.dynamic_update_index_in_dim(q, v, j, axis=-1)

  return jax.lax.fori_loop(0, d, column, jnp.zeros_like(g))


@register('performer')
class Performer(_Kernelized):
  """Performer, FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers", Sec. 2-3).

  q and k are scaled by d**-0.25 (so phi(q).phi(k) estimates exp(q.k / sqrt(d))) and projected on
  `num_features` random rows w, drawn per head: blocks of head_dim orthonormal rows (QR of Gaussian
  matrices, signs fixed so each block is Haar-distributed), each row rescaled to the norm of an
  independent Gaussian vector (chi(head_dim)-distributed): the paper's orthogonal random features.

  Options:
    num_features: m, the number of random features (default 256).
    kernel: 'softmax' (default): positive random features phi(x) = exp(w.x - |x|^2 / 2) / sqrt(m),
      an unbiased estimate of softmax attention that approaches it as m grows; 'relu': the
      generalised kernel phi(x) = relu(w.x) / sqrt(m) + 1e-3 (the Performer code's stabiliser).
    redraw: True (default): the features are drawn from `rng` at every call, so a new key redraws
      them (the model passes a fresh key at every training step, one fixed key per layer in
      evaluation: the paper's feature redrawing, at every step). False: one fixed draw (from
      `jax.random.key(0)`) for every call and every layer; `rng` is then unused and may be None.
    chunk_size: the chunk of the causal prefix sum (speed only).

  Stabilised without changing the result: the softmax features subtract, before exp, the maximum of
  their exponent, per row for queries (a per-query factor cancels in the normalised output) and over
  all real keys and features of a (batch, head) for keys (one factor for every key, which cancels
  too; it is a stop-gradient constant, and padded keys do not enter it). bfloat16 inputs are mapped
  in float32. Cost: O(n m d) time, O(n m) memory (plus n / chunk_size [m, d] states when causal).
  A key whose exponent lies ~87 below the largest one underflows to zero weight (float32 exp).
  """
  needs_rng = True
  num_features: int = 256
  kernel: str = 'softmax'
  redraw: bool = True
  chunk_size: int = 128

  @classmethod
  def small_options(cls, heads=2):
    return dict(num_features=16, chunk_size=8)

  @classmethod
  def preset(cls, keys=512):
    return dict(num_features=256)

  def validate(self):
    check_positive_int(self.name, 'num_features', self.num_features)
    if self.kernel not in KERNELS:
      raise ValueError(f'{self.name}: kernel must be one of {", ".join(map(repr, KERNELS))}, '
                       f'got {self.kernel!r}.')
    if not isinstance(self.redraw, bool):
      raise ValueError(f'{self.name}: redraw must be True or False, got {self.redraw!r}.')
    self._check_chunk()

  def _check_rng(self, rng):
    if not self.redraw and rng is None:  # one fixed draw: no key needed
      return None
    return super()._check_rng(rng)

  def projection(self, rng, heads: int, head_dim: int):
    """float32 [heads, num_features, head_dim]: orthogonal Gaussian rows, chi-distributed norms."""
    rng = self._check_rng(rng) if self.redraw else jax.random.key(0)
    m, d = self.num_features, head_dim
    blocks = -(-m // d)
    k_dir, k_norm = jax.random.split(rng)
    g = jax.random.normal(k_dir, (heads, blocks, d, d), jnp.float32)
    qm = orthonormal_columns(g)
    rows = jnp.swapaxes(qm, -1, -2).reshape(heads, blocks * d, d)[:, :m]
    norms = jnp.linalg.norm(jax.random.normal(k_norm, (heads, m, d), jnp.float32), axis=-1)
    return rows * norms[..., None]

  def feature_map(self, x, *, rng=None, is_query: bool = True, padding_mask=None):
    """FAVOR+ features: [batch, length, heads, head_dim] -> float32 [..., num_features].

    The same `rng` gives the same features (queries and keys share them); positions where
    `padding_mask` is False get zero features and, for keys, stay out of the stabilising maximum.
    """
    x = jnp.asarray(x)
    b, n, h, d = x.shape
    real = _real(x, padding_mask)
    w = self.projection(rng, h, d)
    x = _zero_padded(x, real).astype(jnp.float32) * d ** -0.25
    proj = jnp.einsum('bnhd,hmd->bnhm', x, w)
    m = self.num_features
    if self.kernel == 'relu':
      phi = jax.nn.relu(proj) / math.sqrt(m) + RELU_STABILIZER
    else:
      expo = proj - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
      if is_query:
        shift = jnp.max(expo, axis=-1, keepdims=True)
      else:
        shift = jnp.max(jnp.where(real[:, :, None, None], expo, -jnp.inf), axis=(1, 3),
                        keepdims=True)
        shift = jnp.where(jnp.isfinite(shift), shift, 0.0)  # no real key at all
      phi = jnp.exp(expo - jax.lax.stop_gradient(shift)) / math.sqrt(m)
    return jnp.where(real[:, :, None, None], phi, 0.0)
