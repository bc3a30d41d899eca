"""Attention variants with learned weights: linformer, sinkhorn and synthesizer.

They share one weight contract (docs/attention.md):

  params = attn.init(rng, length=L, heads=h, head_dim=d)  # {name: float32 array}
  attn.param_axes()                                        # {name: logical axis names}, same keys
  out = attn(q, k, v, padding_mask=..., causal=..., params=params)

* `init` sizes the weights for sequences of up to `length` tokens (a model passes its longest
  attention length, a CLS token included). A shorter sequence uses the leading part of each
  length-sized axis (the first n columns, the first ceil(n / block_size) blocks); a longer one
  raises ValueError.
* `param_axes` gives one logical name per dimension, for the model (models/layers.py makes every
  array an `nnx.Param` carrying them) and the sharding rules (sharding.DEFAULT_RULES): 'heads'
  (split over 'tensor', like the q/k/v heads that meet these weights), 'kv' (head_dim), 'length'
  (positions) and the replicated 'attn_projected' (linformer's k), 'attn_blocks' (sinkhorn's block
  slots), 'attn_hidden' (synthesizer's hidden width) and 'attn_rank' (factorized synthesizer's
  rank).
* Every call checks `params` (the names `init` returns, shapes that fit the call's heads and
  head_dim) and raises ValueError naming what is missing or wrong.
* Padded q/k/v arrive as zeros (`Attention._prepare` zeroes them for every variant), so nothing they
  hold (huge values, NaN, inf) reaches a real position, an input gradient or a weight gradient;
  linformer zeroes them once more right before its projection, the step where it matters most.

None runs on the Pallas kernels (`supports_pallas = False`).
q, k, v: [batch, length, heads, head_dim].
"""
from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from efficient_attn.attention.api import Attention, check_positive_int, register
from efficient_attn.attention.blocks import from_blocks, mask_to_blocks, pad_axis, to_blocks
from efficient_attn.attention.dense import MASK_VALUE, dense_attention

F32 = jnp.float32


def _zero_padding(padding_mask, *xs):
  """Each x [b, n, h, d] with zeros at padded positions (so no value of theirs reaches anything)."""
  keep = padding_mask[:, :, None, None]
  return tuple(jnp.where(keep, x, jnp.zeros((), x.dtype)) for x in xs)


def _masked_softmax(logits, visible):
  """Softmax over the last axis among `visible` entries; rows with none visible give zeros."""
  logits = jnp.where(visible, logits, MASK_VALUE)
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  p = jnp.where(visible, jnp.exp(logits - top), 0.0)
  total = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(total > 0, total, 1.0)


class _Learned(Attention):
  """The shared part of the learned variants: `init` and the checks of `params`.

  Subclasses give `_shapes(length, heads, head_dim) -> {name: shape}`, `param_axes()` and
  `_init_array(name, key, shape, length, head_dim)`.
  """
  learned = True
  supports_pallas = False

  def init(self, rng, *, length: int, heads: int, head_dim: int) -> dict[str, Any]:
    for arg, value in (('length', length), ('heads', heads), ('head_dim', head_dim)):
      check_positive_int(f'{self.name}.init', arg, value)
    shapes = self._shapes(length, heads, head_dim)
    keys = jax.random.split(rng, len(shapes))
    return {name: self._init_array(name, key, shape, length, head_dim).astype(F32)
            for key, (name, shape) in zip(keys, shapes.items())}

  def _shapes(self, length, heads, head_dim) -> dict[str, tuple[int, ...]]:
    raise NotImplementedError

  def _init_array(self, name, key, shape, length, head_dim):
    raise NotImplementedError

  def _params_length(self, params) -> int:
    """The `length` the params were initialised for."""
    raise NotImplementedError

  def _checked(self, params, q) -> dict[str, jax.Array]:
    """`params` as arrays, checked against the call: names, shapes, and the sequence length."""
    if not hasattr(params, 'keys'):
      raise ValueError(f'{self.name}: params must be the dict attn.init(...) returns, got '
                       f'{type(params).__name__}.')
    expected = tuple(self.param_axes())
    missing = [k for k in expected if k not in params]
    if missing:
      raise ValueError(f'{self.name}: params lack {", ".join(map(repr, missing))}; pass the dict '
                       f'attn.init(rng, length=..., heads=..., head_dim=...) returns (names: '
                       f'{", ".join(expected)}).')
    params = {k: jnp.asarray(params[k]) for k in expected}
    _, n, heads, head_dim = q.shape
    length = self._params_length(params)
    want = self._shapes(length, heads, head_dim)
    for k in expected:
      if tuple(params[k].shape) != want[k]:
        raise ValueError(f'{self.name}: params[{k!r}] has shape {tuple(params[k].shape)}, but '
                         f'{heads} heads of head_dim {head_dim} need {want[k]}; re-create it with '
                         f'attn.init(rng, length={length}, heads={heads}, head_dim={head_dim}).')
    if n > length:
      raise ValueError(f'{self.name}: a sequence of {n} tokens is longer than the {length} the '
                       f'params were initialised for; use attn.init(rng, length={n} or more, ...).')
    return params


# --------------------------------------------------------------------------------------------------
# Linformer
# --------------------------------------------------------------------------------------------------


@register('linformer')
class Linformer(_Learned):
  """Linformer (Wang et al. 2020): softmax attention of every query over k projected keys/values.

  out_i = softmax_p(q_i . (E K)_p / sqrt(head_dim)) (F V)_p, with learned E, F [k, max_length]
  (`projected_length` k; shared by the heads of a layer, the paper's headwise sharing; `share_kv`:
  F = E, its key-value sharing). A sequence of n tokens uses the first n columns. Padded keys and
  values are zeroed BEFORE the projection, so they contribute nothing to E K and F V and the result
  at real positions is that of the real tokens alone. (The LRA reference code and Hugging Face's
  implementation project the padded positions along with the rest, which mixes padding into every
  projected key: a known bug that makes results depend on how much padding a batch has.)

  Bidirectional only (`supports_causal = False`): every projected key mixes all positions, future
  ones included, so causal=True raises. Memory O(n k): linear in n for a fixed k.

  params: 'E' [k, max_length] (and 'F' unless share_kv), logical axes ('attn_projected', 'length');
  initialised N(0, 1 / max_length), so a projected key has about the scale of a key (LeCun-normal
  over the sequence axis, like the dense layer over positions in the LRA code).
  """
  supports_causal = False
  projected_length: int = 256
  share_kv: bool = False

  @classmethod
  def small_options(cls, heads=2):
    return dict(projected_length=8)

  @classmethod
  def preset(cls, keys=512):
    return dict(projected_length=keys)

  def validate(self):
    check_positive_int(self.name, 'projected_length', self.projected_length)
    if not isinstance(self.share_kv, bool):
      raise ValueError(f'{self.name}: share_kv must be True or False, got {self.share_kv!r}.')

  def param_axes(self):
    axes = {'E': ('attn_projected', 'length')}
    if not self.share_kv:
      axes['F'] = ('attn_projected', 'length')
    return axes

  def _shapes(self, length, heads, head_dim):
    return {name: (self.projected_length, length) for name in self.param_axes()}

  def _init_array(self, name, key, shape, length, head_dim):
    return jax.random.normal(key, shape, F32) * length ** -0.5

  def _params_length(self, params):
    return int(params['E'].shape[-1])

  def _prepare(self, q, k, v, padding_mask, causal, rng, params):
    if causal:
      raise ValueError(
          'linformer: causal=True is not defined: each projected key E K (and value F V) is a mix '
          'of the keys at every position, future ones included, so no query can be kept from '
          'seeing the future (Wang et al. 2020 is bidirectional). Use causal=False, or a causal '
          'variant.')
    return super()._prepare(q, k, v, padding_mask, causal, rng, params)

  def _projections(self, params, q):
    params = self._checked(params, q)
    n = q.shape[1]
    e = params['E'][:, :n]
    return e, (e if self.share_kv else params['F'][:, :n])

  def _attend(self, q, k, v, *, padding_mask, causal, rng, params):
    e, f = self._projections(params, q)
    q, k, v = _zero_padding(padding_mask, q, k, v)
    # [k, n] x [b, n, h, d] -> [b, k, h, d]: the projected sequence (O(n k) memory).
    kp = jnp.einsum('pn,bnhd->bphd', e.astype(k.dtype), k, preferred_element_type=F32)
    vp = jnp.einsum('pn,bnhd->bphd', f.astype(v.dtype), v, preferred_element_type=F32)
    return dense_attention(q, kp.astype(q.dtype), vp.astype(q.dtype))

  def reference(self, q, k, v, *, padding_mask=None, causal=False, rng=None, params=None):
    """The same attention written in another order: the n x n score matrix Q K^T first, projected on
    the right by E^T, and the softmax weights turned into an explicit n x n matrix A F on V."""
    q, k, v, padding_mask, causal, rng, params = self._prepare(q, k, v, padding_mask, causal, rng,
                                                               params)
    e, f = self._projections(params, q)
    keep = padding_mask[:, :, None, None]
    q0, k0, v0 = (jnp.where(keep, x, 0).astype(F32) for x in (q, k, v))
    scores = jnp.einsum('bihd,bjhd->bhij', q0, k0) * q.shape[-1] ** -0.5  # [b, h, n, n]
    projected = jnp.einsum('bhij,pj->bhip', scores, e)  # = q_i . (E K)_p / sqrt(d)
    weights = jax.nn.softmax(projected, axis=-1)  # every projected key is visible
    on_values = jnp.einsum('bhip,pj->bhij', weights, f)  # [b, h, n, n]: weight of value j
    out = jnp.einsum('bhij,bjhd->bihd', on_values, v0)
    return jnp.where(keep, out, 0).astype(q.dtype)


# --------------------------------------------------------------------------------------------------
# Sparse Sinkhorn attention
# --------------------------------------------------------------------------------------------------


def sinkhorn_balance(logits, allowed, iters: int, causal: bool):
  """Log-space Sinkhorn balancing of block-to-block logits: the soft permutation P.

  Args:
    logits: float32 [..., nb, nb], row a = the block receiving, column c = the block sorted in.
    allowed: bool, broadcastable to logits: the pairs that may be non-zero.
    iters: rounds of (row normalisation, column normalisation).
    causal: the column normalisation of row a sums over rows a' <= a only (a cumulative
      log-sum-exp), so P's row a depends on rows <= a alone (the causal Sinkhorn balancing of
      Tay et al. 2020).
  Returns:
    float32 [..., nb, nb], zero outside `allowed`.
  """
  x = jnp.where(allowed, logits, MASK_VALUE)
  for _ in range(iters):
    x = jnp.where(allowed, x - jax.nn.logsumexp(x, axis=-1, keepdims=True), MASK_VALUE)
    column = jax.lax.cumlogsumexp(x, axis=x.ndim - 2) if causal else jax.nn.logsumexp(
        x, axis=-2, keepdims=True)
    x = jnp.where(allowed, x - column, MASK_VALUE)
  return jnp.where(allowed, jnp.exp(x), 0.0)


@register('sinkhorn')
class Sinkhorn(_Learned):
  """Sparse Sinkhorn attention (Tay et al. 2020): own block plus a soft-sorted block, one softmax.

  The sequence is cut into blocks of `block_size` (the last one padded). A sorting net turns each
  block's summary s_a (the mean of its real keys) into logits over the blocks, R[h, a, c] =
  s_a . W[h, :, c]; `sinkhorn_iters` rounds of log-space row/column normalisation of R /
  `temperature` give a soft permutation P [nb, nb] per head and example. The sorted key/value blocks
  are P @ blocks (block a's sorted block is sum_c P[a, c] block_c). Each query block attends to its
  own block and to its sorted block under one softmax (the paper's local + sorted attention):
  2 * block_size keys per query, O(n * block_size) memory (plus nb^2 per head for P). No Gumbel
  noise: deterministic, no rng.

  Padding: padded keys are zeros inside the blocks (they add nothing to a sorted block) and are left
  out of the summaries; blocks without a real token take no part in the balancing; the own-block
  keys are masked, and a sorted slot is visible when some sortable block has a real key there.

  causal=True (the paper's causal Sinkhorn balancing): block a can only sort in blocks c < a (its
  own block would mix its future positions into every slot), the column normalisation runs over rows
  <= a, the summary of block a is the mean of the real keys at positions <= a * block_size (what its
  first query may see), and its own block is causally masked. Block 0 has nothing to sort in.

  params: 'sort' [heads, head_dim, ceil(max_length / block_size)], logical axes
  ('heads', 'kv', 'attn_blocks'), initialised N(0, 1 / head_dim); a sequence uses the first
  ceil(n / block_size) columns.
  """
  block_size: int = 64
  sinkhorn_iters: int = 5
  temperature: float = 0.75

  @classmethod
  def small_options(cls, heads=2):
    return dict(block_size=8)

  @classmethod
  def preset(cls, keys=512):
    return dict(block_size=max(1, keys // 2))

  def validate(self):
    check_positive_int(self.name, 'block_size', self.block_size)
    check_positive_int(self.name, 'sinkhorn_iters', self.sinkhorn_iters)
    t = self.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or not math.isfinite(t):
      raise ValueError(f'{self.name}: temperature must be a positive number, got {t!r}.')

  def param_axes(self):
    return {'sort': ('heads', 'kv', 'attn_blocks')}

  def _shapes(self, length, heads, head_dim):
    return {'sort': (heads, head_dim, -(-length // self.block_size))}

  def _init_array(self, name, key, shape, length, head_dim):
    return jax.random.normal(key, shape, F32) * head_dim ** -0.5

  def _params_length(self, params):
    return int(params['sort'].shape[-1]) * self.block_size

  def _attend(self, q, k, v, *, padding_mask, causal, rng, params):
    n, d, bs = q.shape[1], q.shape[-1], self.block_size
    sort = self._checked(params, q)['sort']
    nb = -(-n // bs)
    qb, kb, vb = to_blocks(q, bs), to_blocks(k, bs), to_blocks(v, bs)  # [b, h, nb, bs, d]
    real = mask_to_blocks(padding_mask, bs)  # [b, nb, bs]
    if causal:  # mean of the real keys at positions <= a * bs (the block's first position).
      kpad = pad_axis(k.astype(F32), 1, nb * bs)
      total = jnp.cumsum(kpad, axis=1)[:, ::bs]  # [b, nb, h, d]
      count = jnp.cumsum(pad_axis(padding_mask, 1, nb * bs, False).astype(F32), axis=1)[:, ::bs]
      summary = jnp.moveaxis(total / jnp.maximum(count, 1.0)[:, :, None, None], 1, 2)
    else:  # mean of the block's real keys (the padded ones are zeros already).
      count = jnp.sum(real, axis=-1).astype(F32)  # [b, nb]
      summary = jnp.sum(kb.astype(F32), axis=3) / jnp.maximum(count, 1.0)[:, None, :, None]
    logits = jnp.einsum('bhad,hdc->bhac', summary, sort[:, :, :nb]) / self.temperature
    has_real = jnp.any(real, axis=-1)  # [b, nb]
    allowed = has_real[:, :, None] & has_real[:, None, :]
    if causal:
      allowed = allowed & jnp.tri(nb, k=-1, dtype=bool)[None]
    perm = sinkhorn_balance(logits, allowed[:, None], self.sinkhorn_iters, causal)  # [b, h, nb, nb]
    sk = jnp.einsum('bhac,bhctd->bhatd', perm, kb.astype(F32))  # the sorted blocks
    sv = jnp.einsum('bhac,bhctd->bhatd', perm, vb.astype(F32))
    slot_ok = jnp.einsum('bac,bct->bat', allowed.astype(F32), real.astype(F32)) > 0  # [b, nb, bs]

    scale = d ** -0.5
    local = jnp.einsum('bhaid,bhajd->bhaij', qb, kb, preferred_element_type=F32) * scale
    sorted_ = jnp.einsum('bhaid,bhajd->bhaij', qb.astype(F32), sk) * scale
    local_ok = real[:, None, :, None, :]  # [b, 1, nb, 1, bs]
    if causal:
      local_ok = local_ok & jnp.tri(bs, dtype=bool)  # own block: key slot <= query slot
    visible = jnp.concatenate([jnp.broadcast_to(local_ok, local.shape),
                               jnp.broadcast_to(slot_ok[:, None, :, None, :], sorted_.shape)], -1)
    p = _masked_softmax(jnp.concatenate([local, sorted_], axis=-1), visible)
    out = (jnp.einsum('bhaij,bhajd->bhaid', p[..., :bs].astype(vb.dtype), vb,
                      preferred_element_type=F32)
           + jnp.einsum('bhaij,bhajd->bhaid', p[..., bs:], sv))
    return from_blocks(out.astype(q.dtype), n)

  def reference(self, q, k, v, *, padding_mask=None, causal=False, rng=None, params=None):
    """The same definition as one explicit n x n attention matrix (dense, token level).

    Summaries through an explicit averaging matrix, the causal column normalisation through an
    explicit [a, a', c] sum, sorted-slot scores as P-weighted sums of the n x n scores Q K^T, and
    the output as A V with A[i, j] = local weight + sorted weight of slot (j mod block) *
    P[a(i), a(j)].
    """
    q, k, v, padding_mask, causal, rng, params = self._prepare(q, k, v, padding_mask, causal, rng,
                                                               params)
    sort = self._checked(params, q)['sort']
    b, n, h, d = q.shape
    bs = self.block_size
    nb = -(-n // bs)
    m = nb * bs
    pm = pad_axis(padding_mask, 1, m, False)
    q0, k0, v0 = (pad_axis(jnp.where(padding_mask[:, :, None, None], x, 0).astype(F32), 1, m)
                  for x in (q, k, v))
    pos = jnp.arange(m)
    block = pos // bs
    first = jnp.arange(nb) * bs
    # Summaries: s[a] = sum_j avg[a, j] k_j.
    if causal:
      member = pos[None, :] <= first[:, None]
    else:
      member = block[None, :] == jnp.arange(nb)[:, None]
    member = member[None] & pm[:, None, :]  # [b, nb, m]
    avg = member / jnp.maximum(jnp.sum(member, -1, keepdims=True), 1)
    summary = jnp.einsum('baj,bjhd->bhad', avg, k0)
    logits = jnp.einsum('bhad,hdc->bhac', summary, sort[:, :, :nb]) / self.temperature
    # The balancing, written out.
    own = block[None, :] == jnp.arange(nb)[:, None]
    has_real = jnp.any(own[None] & pm[:, None, :], axis=-1)  # [b, nb]
    a_ix, c_ix = jnp.arange(nb)[:, None], jnp.arange(nb)[None, :]
    allowed = has_real[:, :, None] & has_real[:, None, :] & ((c_ix < a_ix) if causal else True)
    allowed = allowed[:, None]  # [b, 1, nb, nb]
    x = jnp.where(allowed, logits, -jnp.inf)
    for _ in range(self.sinkhorn_iters):
      x = jnp.where(allowed, x - _logsumexp_finite(x, axis=-1, keepdims=True), -jnp.inf)
      if causal:  # col[a, c] = log sum_{a' <= a} exp(x[a', c])
        upto = (jnp.arange(nb)[None, :] <= jnp.arange(nb)[:, None])  # [a, a']
        stacked = jnp.where(upto[:, :, None], x[..., None, :, :], -jnp.inf)  # [b, h, a, a', c]
        col = _logsumexp_finite(stacked, axis=-2)
      else:
        col = _logsumexp_finite(x, axis=-2, keepdims=True)
      x = jnp.where(allowed, x - col, -jnp.inf)
    perm = jnp.where(allowed, jnp.exp(x), 0.0)  # [b, h, nb, nb]

    scores = jnp.einsum('bihd,bjhd->bhij', q0, k0) * d ** -0.5  # [b, h, m, m]
    local_ok = (block[:, None] == block[None, :])[None, None] & pm[:, None, None, :]
    if causal:
      local_ok = local_ok & (pos[None, :] <= pos[:, None])
    p_rows = perm[:, :, block]  # [b, h, m, nb]: P[a(i), c]
    sorted_scores = jnp.einsum('bhic,bhict->bhit', p_rows, scores.reshape(b, h, m, nb, bs))
    slot_ok = jnp.einsum('bac,bct->bat', allowed[:, 0].astype(F32),
                         pm.reshape(b, nb, bs).astype(F32))[:, block] > 0  # [b, m, bs]
    both = jnp.concatenate([jnp.where(local_ok, scores, -jnp.inf),
                            jnp.where(slot_ok[:, None], sorted_scores, -jnp.inf)], axis=-1)
    top = jnp.max(jnp.where(jnp.isfinite(both), both, MASK_VALUE), -1, keepdims=True)
    w = jnp.where(jnp.isfinite(both), jnp.exp(both - jax.lax.stop_gradient(top)), 0.0)
    w = w / jnp.maximum(jnp.sum(w, -1, keepdims=True), 1e-37)
    slot = pos % bs
    attn = w[..., :m] + jnp.take(w[..., m:], slot, axis=-1) * perm[:, :, block][:, :, :, block]
    out = jnp.einsum('bhij,bjhd->bihd', attn, v0)[:, :n]
    return jnp.where(padding_mask[:, :, None, None], out, 0).astype(q.dtype)


def _finite_max(x, axis):
  """max over `axis` (keepdims) ignoring -inf; 0 where everything is -inf."""
  top = jnp.max(x, axis=axis, keepdims=True)
  return jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))


def _logsumexp_finite(x, axis, keepdims=False):
  """log sum exp over `axis` of x with -inf entries; -inf where all are."""
  top = _finite_max(x, axis)
  total = jnp.sum(jnp.where(jnp.isfinite(x), jnp.exp(x - top), 0.0), axis=axis, keepdims=True)
  out = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + top, -jnp.inf)
  return out if keepdims else jnp.squeeze(out, axis)


# --------------------------------------------------------------------------------------------------
# Synthesizer
# --------------------------------------------------------------------------------------------------

SYNTHESIZER_MODES = ('dense', 'random', 'factorized_random')


@register('synthesizer')
class Synthesizer(_Learned):
  """Synthesizer (Tay et al. 2021): attention weights synthesized without q.k, times V.

  `mode`:
    'dense': logits B[i, :] = W2 relu(W1 q_i + b1) + b2 from each token's query vector (per head; W1
      [head_dim, head_dim], W2 [head_dim, max_length]; the paper's Dense Synthesizer on the head's
      query).
    'random': a learned [heads, max_length, max_length] logit matrix, the same for every input.
    'factorized_random': B = R1 R2^T with R1, R2 [heads, max_length, `rank`].
  A sequence of n tokens uses the leading n x n part. Softmax over the visible keys (real, and
  j <= i under causal=True), then the weights times V. `max_length`: the size of the logit tables
  (None: the `length` given to `init`, which must not exceed it).

  Quadratic by design (`quadratic = True`): the logits are [n, n] per head, O(n^2) memory like
  'full'.

  params (logical axes): 'dense' -> 'w1' [h, d, d] ('heads', 'kv', 'attn_hidden'), 'b1' [h, d]
  ('heads', 'attn_hidden'), 'w2' [h, d, L] ('heads', 'attn_hidden', 'length'), 'b2' [h, L]
  ('heads', 'length'); 'random' -> 'logits' [h, L, L] ('heads', 'length', 'length');
  'factorized_random' -> 'r1', 'r2' [h, L, rank] ('heads', 'length', 'attn_rank').
  """
  quadratic = True
  mode: str = 'dense'
  max_length: Optional[int] = None
  rank: int = 8

  @classmethod
  def small_options(cls, heads=2):
    return dict(mode='dense')

  def validate(self):
    if self.mode not in SYNTHESIZER_MODES:
      modes = ', '.join(map(repr, SYNTHESIZER_MODES))
      raise ValueError(f'{self.name}: mode must be one of {modes}, got {self.mode!r}.')
    if self.max_length is not None:
      check_positive_int(self.name, 'max_length', self.max_length)
    check_positive_int(self.name, 'rank', self.rank)

  def param_axes(self):
    if self.mode == 'dense':
      return {'w1': ('heads', 'kv', 'attn_hidden'), 'b1': ('heads', 'attn_hidden'),
              'w2': ('heads', 'attn_hidden', 'length'), 'b2': ('heads', 'length')}
    if self.mode == 'random':
      return {'logits': ('heads', 'length', 'length')}
    return {'r1': ('heads', 'length', 'attn_rank'), 'r2': ('heads', 'length', 'attn_rank')}

  def init(self, rng, *, length, heads, head_dim):
    if self.max_length is not None:
      if isinstance(length, int) and length > self.max_length:
        raise ValueError(f'{self.name}: init(length={length}) exceeds the option max_length='
                         f'{self.max_length}; raise max_length or leave it None.')
      length = self.max_length
    return super().init(rng, length=length, heads=heads, head_dim=head_dim)

  def _shapes(self, length, heads, head_dim):
    h, d, r = heads, head_dim, self.rank
    return {'dense': {'w1': (h, d, d), 'b1': (h, d), 'w2': (h, d, length), 'b2': (h, length)},
            'random': {'logits': (h, length, length)},
            'factorized_random': {'r1': (h, length, r), 'r2': (h, length, r)}}[self.mode]

  def _init_array(self, name, key, shape, length, head_dim):
    if name in ('b1', 'b2'):
      return jnp.zeros(shape, F32)
    # Weights of unit-variance logits: fan-in scaling, and rank**-0.25 on each factor of R1 R2^T.
    std = {'w1': head_dim ** -0.5, 'w2': head_dim ** -0.5, 'logits': 1.0,
           'r1': self.rank ** -0.25, 'r2': self.rank ** -0.25}[name]
    return jax.random.normal(key, shape, F32) * std

  def _params_length(self, params):
    return int(params[{'dense': 'b2', 'random': 'logits', 'factorized_random': 'r1'}[self.mode]]
               .shape[1])

  def _logits(self, params, q):
    """float32 logits [b or 1, h, n, n] from the checked params and (zero-padded) q."""
    n = q.shape[1]
    if self.mode == 'dense':
      hidden = jax.nn.relu(jnp.einsum('bihd,hde->bhie', q.astype(F32), params['w1'])
                           + params['b1'][None, :, None, :])
      return (jnp.einsum('bhie,hej->bhij', hidden, params['w2'][:, :, :n])
              + params['b2'][None, :, None, :n])
    if self.mode == 'random':
      return params['logits'][None, :, :n, :n]
    return jnp.einsum('hir,hjr->hij', params['r1'][:, :n], params['r2'][:, :n])[None]

  def _attend(self, q, k, v, *, padding_mask, causal, rng, params):
    params = self._checked(params, q)
    logits = self._logits(params, q)
    n = q.shape[1]
    visible = padding_mask[:, None, None, :]
    if causal:
      visible = visible & jnp.tri(n, dtype=bool)
    # dense_attention with the synthesized logits as its bias and a zero q.k term (head_dim-1
    # zeros).
    zeros = jnp.zeros(q.shape[:3] + (1,), q.dtype)
    return dense_attention(zeros, zeros, v, bias=logits, mask=visible)

  def reference(self, q, k, v, *, padding_mask=None, causal=False, rng=None, params=None):
    """The explicit weights: each query row's logits B[i, j] built token by token from the params,
    normalised over its visible keys, then A V."""
    q, k, v, padding_mask, causal, rng, params = self._prepare(q, k, v, padding_mask, causal, rng,
                                                               params)
    params = self._checked(params, q)
    b, n, h, _ = q.shape
    keep = padding_mask[:, :, None, None]
    q0, v0 = (jnp.where(keep, x, 0).astype(F32) for x in (q, v))
    if self.mode == 'dense':
      hidden = jnp.maximum(jnp.einsum('bihd,hde->bihe', q0, params['w1']) + params['b1'], 0.0)
      logits = jnp.einsum('bihe,hej->bhij', hidden, params['w2']) + params['b2'][None, :, None]
      logits = logits[..., :n]
    elif self.mode == 'random':
      logits = jnp.broadcast_to(params['logits'][:, :n, :n], (b, h, n, n))
    else:
      r1, r2 = params['r1'][:, :n], params['r2'][:, :n]
      logits = jnp.broadcast_to(jnp.sum(r1[:, :, None, :] * r2[:, None, :, :], -1), (b, h, n, n))
    visible = jnp.broadcast_to(padding_mask[:, None, None, :], logits.shape)
    if causal:
      visible = visible & (jnp.arange(n)[None, :] <= jnp.arange(n)[:, None])
    weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, -1, keepdims=True))) * visible
    weights = weights / jnp.maximum(jnp.sum(weights, -1, keepdims=True), 1e-37)
    out = jnp.einsum('bhij,bjhd->bihd', weights, v0)
    return jnp.where(keep, out, 0).astype(q.dtype)
