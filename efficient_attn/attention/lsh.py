"""Reformer LSH attention (`lsh`): angular hashing, sort, chunked attention, rounds merged by log-sum-exp.

Per round r (of `num_hashes`), every position is hashed to a bucket by a random rotation, the sequence is
sorted by (bucket, position), cut into chunks of `bucket_size`, and each chunk attends to itself and the
previous chunk (the first chunk's previous one is the last: the Reformer's wrap-around). The rounds are then
merged with weights `softmax_r(lse_r)`, which is exactly dense attention with `log C[i, j]` added to the
scores, `C[i, j]` the number of rounds in which key j is visible to query i (`LSHAttention.dense_bias`).

Memory is linear in the length: the largest arrays hold `num_hashes * length * 2 * bucket_size` scores.
The permutations are a `jax.custom_vjp` (gathers both ways), so `lsh` supports reverse-mode autodiff
only: `jax.jvp` raises JAX's TypeError.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from efficient_attn.attention.api import Attention, check_causal, check_positive_int, register
from efficient_attn.attention.dense import MASK_VALUE


# -- the permutation, with a gather in both directions ----------------------------------------------


@jax.custom_vjp
def _permute(x, idx, inv_idx):
  """Gathers rows: `x[..., idx, :]`.

  Args:
    x: [..., n, f].
    idx: int [..., n], a permutation of range(n) along the last axis.
    inv_idx: int [..., n], its inverse (`idx[inv_idx] == range(n)`).

  Returns:
    [..., n, f] with row t equal to x's row idx[t].
  """
  return jnp.take_along_axis(x, idx[..., None], axis=-2)


def _permute_fwd(x, idx, inv_idx):
  return _permute(x, idx, inv_idx), (idx, inv_idx)


def _permute_bwd(res, g):
  # The transpose of a permutation is its inverse: a gather, where autodiff of a gather emits a scatter.
  idx, inv_idx = res
  return jnp.take_along_axis(g, inv_idx[..., None], axis=-2), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


# -- hashing --------------------------------------------------------------------------------------


def _bucket_of(x, rotations):
  """Angular LSH: `argmax([xR, -xR])`.

  Args:
    x: float32 [b, h, m, d].
    rotations: float32 [h, r, d, nb // 2].

  Returns:
    int32 [b, h, r, m] in [0, nb).
  """
  xr = jnp.einsum('bhmd,hrdk->bhrmk', x, rotations)
  # argmax over the concatenation [xR, -xR] without building it; ties resolve to the first index, as
  # argmax over the concatenation would.
  top, bottom = jnp.max(xr, -1), jnp.min(xr, -1)
  return jnp.where(top >= -bottom, jnp.argmax(xr, -1), xr.shape[-1] + jnp.argmin(xr, -1)).astype(jnp.int32)


def _hash(k, real, rotations, bucket_size):
  """Buckets of every position in every round; padded positions get bucket nb, after every real one.

  Args:
    k: [b, h, n_pad, d] keys (any float dtype; hashed in float32), n_pad a multiple of bucket_size.
    real: bool [b, n_pad], False at user and internal padding.
    rotations: float32 [h, r, d, nb // 2].
    bucket_size: the chunk length.

  Returns:
    int32 [b, h, r, n_pad] in [0, nb].
  """
  b, h, n_pad, d = k.shape
  r, nb = rotations.shape[1], 2 * rotations.shape[-1]
  x = jax.lax.stop_gradient(k).astype(jnp.float32)
  # Unit-normalised keys, as in the shared-QK Reformer. The argmax is invariant to positive scaling, so
  # this only keeps the projection well scaled.
  x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-30))
  chunks = n_pad // bucket_size
  # The projection is [n_pad, nb / 2] per head and round; with nb ~ n / bucket_size it is quadratic in n.
  # Hash `group` chunks at a time so that one step never exceeds one round's scores ([n_pad, 2 * bucket]).
  group = max(1, (4 * chunks * bucket_size) // nb)
  if group >= chunks:
    buckets = _bucket_of(x, rotations)
  else:
    xs = jnp.moveaxis(x.reshape(b, h, chunks, bucket_size, d), 2, 0)  # [chunks, b, h, bucket, d]
    buckets = jax.lax.map(lambda xc: _bucket_of(xc, rotations), xs, batch_size=group)
    buckets = jnp.moveaxis(buckets, 0, 3).reshape(b, h, r, n_pad)  # [chunks, b, h, r, bucket] -> ...
  return jnp.where(real[:, None, None, :], buckets, nb)


# -- attention within chunks ----------------------------------------------------------------------


def _chunk_attention(q, k, v, q_pos, k_pos, k_real, causal):
  """Softmax attention of each query chunk over its key window, with the LSH visibility rules.

  Args:
    q: [..., bucket, d] sorted queries, chunked.
    k, v: [..., w, d] each chunk's keys (own chunk, then the previous chunk when there are several).
    q_pos: int [..., bucket], original positions of the queries.
    k_pos: int [..., w], original positions of the keys.
    k_real: bool [..., w], False for padded keys.
    causal: keys only at original positions j <= i.

  Returns:
    (out float32 [..., bucket, d], lse float32 [..., bucket]); a query that sees nothing gets out = 0 and
    lse = MASK_VALUE.
  """
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum('...qd,...kd->...qk', q, k, preferred_element_type=jnp.float32) * scale
  is_self = q_pos[..., :, None] == k_pos[..., None, :]
  other = k_real[..., None, :] & ~is_self
  if causal:
    other = other & (k_pos[..., None, :] <= q_pos[..., :, None])
  # A query sees itself only when nothing else is visible to it in this round (the Reformer's self-mask,
  # made exact): its own key is then the only one.
  visible = other | (is_self & k_real[..., None, :] & ~jnp.any(other, -1, keepdims=True))
  scores = jnp.where(visible, scores, MASK_VALUE)
  row_max = jax.lax.stop_gradient(jnp.max(scores, -1, keepdims=True))
  p = jnp.where(visible, jnp.exp(scores - row_max), 0.0)
  total = jnp.sum(p, -1, keepdims=True)
  seen = total > 0
  safe_total = jnp.where(seen, total, 1.0)
  out = jnp.einsum('...qk,...kd->...qd', (p / safe_total).astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  lse = jnp.where(seen, row_max + jnp.log(safe_total), MASK_VALUE)[..., 0]
  return out, lse


def _heads_major(x, padding_mask, n_pad):
  """[b, n, h, d] -> [b, h, n_pad, d], padded rows zeroed so that their values (even NaN) cannot leak."""
  x = jnp.where(padding_mask[:, :, None, None], x, jnp.zeros((), x.dtype))
  x = jnp.pad(x, ((0, 0), (0, n_pad - x.shape[1]), (0, 0), (0, 0)))
  return jnp.transpose(x, (0, 2, 1, 3))


@register('lsh')
class LSHAttention(Attention):
  """Reformer LSH attention, multi-round, with an exact dense equivalent (`dense_bias`).

  Options:
    bucket_size: chunk length: after sorting, each chunk of `bucket_size` queries attends to its own chunk
      and the previous one (2 * bucket_size keys). Lengths are padded internally to a multiple of it.
    num_hashes: hashing rounds; their outputs are merged by their log-sum-exp, so a key seen in several
      rounds counts that many times (no de-duplication, as in the Reformer).
    num_buckets: even number of hash buckets (angular LSH gives `argmax([xR, -xR])`, so twice the rotation
      width). None: the number of chunks rounded up to even (at least 2), so that a bucket holds about one
      chunk on average, the Reformer's choice.

  Hashing: our q and k are separate, so position i is hashed by its key k_i (unit-normalised); query i is
  routed with its own key, and attends the keys whose directions fall near k_i's. With shared QK (q = k)
  this is the Reformer exactly. Rotations are drawn from `rng` per head and per round, shared across the
  batch. Padded positions hash to an extra last bucket, so they sort after every real token and the
  chunking of the real tokens never depends on them.
  """

  needs_rng = True
  supports_pallas = False  # data-dependent chunks: the jnp path only
  bucket_size: int = 64
  num_hashes: int = 2

  @classmethod
  def small_options(cls, heads=2):
    return dict(bucket_size=8, num_hashes=2)

  @classmethod
  def preset(cls, keys=512):
    return dict(bucket_size=max(8, keys // 4), num_hashes=2)
  num_buckets: int | None = None

  def validate(self) -> None:
    check_positive_int('lsh', 'bucket_size', self.bucket_size)
    check_positive_int('lsh', 'num_hashes', self.num_hashes)
    nb = self.num_buckets
    if nb is not None and (isinstance(nb, bool) or not isinstance(nb, int) or nb < 2 or nb % 2):
      raise ValueError(f'lsh: num_buckets must be None or an even integer >= 2, got {nb!r}.')

  # -- shared by the fast path and the dense definition --------------------------------------------

  def _layout(self, n: int) -> tuple[int, int, int]:
    """(padded length, number of chunks, number of buckets) for a sequence of length n."""
    chunks = -(-n // self.bucket_size)
    nb = self.num_buckets if self.num_buckets is not None else max(2, chunks + chunks % 2)
    return chunks * self.bucket_size, chunks, nb

  def _sort_order(self, k, real, rng, nb):
    """The per-round permutations sorting by (bucket, position).

    Args:
      k: [b, h, n_pad, d] keys, heads-major.
      real: bool [b, n_pad].
      rng: jax.random key.
      nb: number of buckets.

    Returns:
      (perm, inv), int32 [b, h, r, n_pad]: perm[t] is the original position at sorted slot t; inv its inverse.
    """
    h, d = k.shape[1], k.shape[3]
    rotations = jax.random.normal(rng, (h, self.num_hashes, d, nb // 2), jnp.float32)
    buckets = _hash(k, real, rotations, self.bucket_size)
    # Stable: equal buckets keep position order.
    perm = jnp.argsort(buckets, axis=-1, stable=True).astype(jnp.int32)
    inv = jnp.argsort(perm, axis=-1).astype(jnp.int32)
    return perm, inv

  # -- fast path -------------------------------------------------------------------------------------

  def _attend(self, q, k, v, *, padding_mask, causal, rng):
    b, n, h, d = q.shape
    bs, r = self.bucket_size, self.num_hashes
    n_pad, chunks, nb = self._layout(n)
    real = jnp.pad(padding_mask, ((0, 0), (0, n_pad - n)))  # internal padding is not real
    q, k, v = (_heads_major(x, padding_mask, n_pad) for x in (q, k, v))
    perm, inv = self._sort_order(k, real, rng, nb)

    def sort(x):  # [b, h, n_pad, d] -> [b, h, r, chunks, bucket, d]
      x = jnp.broadcast_to(x[:, :, None], (b, h, r, n_pad, d))
      return _permute(x, perm, inv).reshape(b, h, r, chunks, bs, d)

    qs, ks, vs = sort(q), sort(k), sort(v)
    q_pos = perm.reshape(b, h, r, chunks, bs)
    k_real = jnp.take_along_axis(jnp.broadcast_to(real[:, None, None, :], perm.shape), perm, -1)
    k_real = k_real.reshape(b, h, r, chunks, bs)
    k_pos = q_pos
    if chunks > 1:  # with one chunk, "the previous chunk" is the chunk itself: no second copy.

      def look_back(x):  # [b, h, r, chunks, bucket, ...] -> [b, h, r, chunks, 2 * bucket, ...]
        return jnp.concatenate([x, jnp.roll(x, 1, axis=3)], axis=4)

      ks, vs, k_pos, k_real = look_back(ks), look_back(vs), look_back(k_pos), look_back(k_real)
    out, lse = _chunk_attention(qs, ks, vs, q_pos, k_pos, k_real, causal)

    # Back to original order, then merge the rounds with weights softmax_r(lse_r).
    out = _permute(out.reshape(b, h, r, n_pad, d), inv, perm)
    lse = _permute(lse.reshape(b, h, r, n_pad, 1), inv, perm)
    weights = jax.nn.softmax(lse, axis=2)  # [b, h, r, n_pad, 1]; uniform (over zeros) where nothing is seen
    out = jnp.sum(weights * out, axis=2)  # [b, h, n_pad, d]
    return jnp.transpose(out[:, :, :n], (0, 2, 1, 3))

  # -- dense definition ----------------------------------------------------------------------------

  def dense_bias(self, q, k, *, causal: bool = False, rng=None, padding_mask=None):
    """The exact O(n^2) equivalent of `attn(q, k, v, causal=causal, rng=rng, padding_mask=padding_mask)`.

    Args:
      q: [b, n, h, d] (only its shape is used; the pattern depends on k alone).
      k: [b, n, h, d] keys, hashed exactly as the fast path hashes them.
      causal: as in the call.
      rng: the same key as in the call.
      padding_mask: optional bool [b, n], the one passed to the call. It matters twice: padded tokens sort
        last (so they change nothing for the real ones), and padded keys and the rows of padded queries get
        MASK_VALUE here, so that `dense_attention` with this bias also gives zeros at padded queries.

    Returns:
      float32 [b, h, n, n]: `log C[i, j]`, C the number of rounds in which key j is visible to query i,
      and MASK_VALUE where C == 0.
    """
    padding_mask = self._check_inputs(q, k, k, padding_mask)
    rng = self._check_rng(rng)
    causal = check_causal(self.name, causal)
    b, n = k.shape[:2]
    if padding_mask is None:
      padding_mask = jnp.ones((b, n), bool)
    n_pad, chunks, nb = self._layout(n)
    real = jnp.pad(padding_mask, ((0, 0), (0, n_pad - n)))
    _, inv = self._sort_order(_heads_major(k, padding_mask, n_pad), real, rng, nb)
    chunk = (inv // self.bucket_size)[..., :n]  # [b, h, r, n]: each position's chunk in each round
    ci, cj = chunk[..., :, None], chunk[..., None, :]
    near = ci == cj
    if chunks > 1:
      near = near | (cj == (ci - 1) % chunks)
    pos = jnp.arange(n)
    is_self = pos[:, None] == pos[None, :]
    key_real = padding_mask[:, None, None, None, :]
    other = near & key_real & ~is_self
    if causal:
      other = other & (pos[None, :] <= pos[:, None])
    visible = other | (is_self & key_real & ~jnp.any(other, -1, keepdims=True))
    visible = visible & padding_mask[:, None, None, :, None]  # padded queries: all-masked rows
    count = jnp.sum(visible, axis=2)  # over rounds: [b, h, n, n]
    return jnp.where(count > 0, jnp.log(jnp.maximum(count, 1).astype(jnp.float32)),
                     MASK_VALUE).astype(jnp.float32)
