"""The registered attention variants: each a layout (plus a predicate) for the shared block engine.

All take and return [batch, length, heads, head_dim]. Internally sequences are padded to the block size
and cut back; `padding_mask` marks real keys. Option tables: docs/attention.md.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.attention import patterns as P
from efficient_attn.attention.api import (Attention, check_nonnegative_int, check_positive_int,
                                          register)
from efficient_attn.attention.dense import dense_attention
from efficient_attn.attention.blocks import (DEFAULT_BLOCK, all_blocks_layout, auto_block,
                                             band_layout, band_shifts, dedupe_slots, fit_block,
                                             merge_partials, outside_band,
                                             pad_axis, positions, residue_major,
                                             residue_major_inverse, round_up)
from efficient_attn.attention.engine import band_attention, query_chunked_attention, run_engine

# --------------------------------------------------------------------------------------------------
# Option checks
# --------------------------------------------------------------------------------------------------


def _check_window(name, window):
  check_nonnegative_int(name, 'window', window)


def _check_block(name, block_size):
  if block_size is not None:
    check_positive_int(name, 'block_size', block_size)


# --------------------------------------------------------------------------------------------------
# full / chunked
# --------------------------------------------------------------------------------------------------


@register('full')
class Full(Attention):
  """Plain softmax attention over every pair: O(n^2) memory. The baseline."""
  quadratic = True

  def _attend(self, q, k, v, *, padding_mask, causal, rng):
    if self.impl == 'pallas':  # the trivial layout: every query block visits every key block
      n = q.shape[1]
      block = fit_block(n, DEFAULT_BLOCK)
      pos = positions(n)
      return run_engine(q, k, v, padding_mask, qpos=pos, kpos=pos, causal=causal, qblock=block,
                        kblock=block, layout=all_blocks_layout, implementation='pallas')[0]
    mask = P.with_causal(padding_mask[:, None, None, :], causal)
    return dense_attention(q, k, v, mask=mask)

  def dense_mask(self, length, *, causal=False, rng=None, heads=None):
    return P.with_causal(jnp.ones((1, length, length), bool), causal)


@register('chunked')
class Chunked(Attention):
  """Exact full attention in O(n) memory (`query_chunked_attention`)."""
  query_chunk: int = 512
  key_chunk: int = 512

  @classmethod
  def small_options(cls, heads=2):
    return dict(query_chunk=16, key_chunk=8)

  @classmethod
  def preset(cls, keys=512):
    return dict(query_chunk=512, key_chunk=512)

  def validate(self):
    check_positive_int(self.name, 'query_chunk', self.query_chunk)
    check_positive_int(self.name, 'key_chunk', self.key_chunk)

  def _attend(self, q, k, v, *, padding_mask, causal, rng):
    pos = positions(q.shape[1])
    return query_chunked_attention(q, k, v, padding_mask, qpos=pos, kpos=pos, causal=causal,
                                   query_chunk=self.query_chunk, key_chunk=self.key_chunk,
                                   implementation=self.impl)[0]

  def dense_mask(self, length, *, causal=False, rng=None, heads=None):
    return P.with_causal(jnp.ones((1, length, length), bool), causal)


# --------------------------------------------------------------------------------------------------
# local / dilated / longformer
# --------------------------------------------------------------------------------------------------


@register('local')
class Local(Attention):
  """Sliding window: query i sees keys with abs(i - j) <= window (2 * window + 1 keys).

  `block_size` only tunes speed (None: about the window, within 16..128).
  """
  window: int = 128
  block_size: Optional[int] = None

  def validate(self):
    _check_window(self.name, self.window)
    _check_block(self.name, self.block_size)

  @classmethod
  def small_options(cls, heads=2):
    return dict(window=5, block_size=8)

  @classmethod
  def preset(cls, keys=512):
    return dict(window=keys // 2)

  def _attend(self, q, k, v, *, padding_mask, causal, rng):
    block = self.block_size or auto_block(self.window)
    return band_attention(q, k, v, padding_mask, causal, window=self.window, block=block,
                          implementation=self.impl)[0]

  def dense_mask(self, length, *, causal=False, rng=None, heads=None):
    return P.with_causal(P.Band(self.window)(*P.grid(length))[None], causal)


@register('dilated')
class Dilated(Attention):
  """Dilated sliding window: (i - j) % d == 0 and abs(i - j) <= window * d.

  `dilation` is one int, or one int per head group: with D dilations, heads must be a multiple of D and
  head group g (heads g*H/D .. (g+1)*H/D - 1) uses dilation[g]. The sequence is reordered residue-major
  (positions equal mod d made contiguous), where the pattern is a plain band of `window`.
  """
  window: int = 64
  dilation: int | tuple[int, ...] = 2
  block_size: Optional[int] = None

  @classmethod
  def small_options(cls, heads=2):
    return dict(window=3, dilation=(1, 2) if heads % 2 == 0 else 3)

  @classmethod
  def preset(cls, keys=512):
    return dict(window=keys // 2, dilation=(1, 2))

  def validate(self):
    _check_window(self.name, self.window)
    _check_block(self.name, self.block_size)
    dil = self.dilations
    if not dil:
      raise ValueError(f'{self.name}: dilation must be a positive int or a non-empty tuple of them.')
    for d in dil:
      check_positive_int(self.name, 'dilation', d)

  @property
  def dilations(self) -> tuple[int, ...]:
    d = self.dilation
    return tuple(d) if isinstance(d, (tuple, list)) else (d,)

  def check_heads(self, heads):
    self._heads_per_group(heads)

  def _heads_per_group(self, heads: int) -> int:
    groups = len(self.dilations)
    if heads % groups:
      raise ValueError(f'{self.name}: {heads} heads are not divisible by the {groups} dilations '
                       f'{self.dilations}; use a number of dilations that divides the heads.')
    return heads // groups

  def _attend(self, q, k, v, *, padding_mask, causal, rng):
    n, heads = q.shape[1], q.shape[2]
    per = self._heads_per_group(heads)
    block = self.block_size or auto_block(self.window)
    outs = []
    for g, d in enumerate(self.dilations):
      hs = slice(g * per, (g + 1) * per)
      qg, kg, vg = (residue_major(x[:, :, hs], d) for x in (q, k, v))
      out, _ = band_attention(qg, kg, vg, residue_major(padding_mask, d), causal, window=self.window,
                              block=block, implementation=self.impl)
      outs.append(residue_major_inverse(out, d, n))
    return jnp.concatenate(outs, axis=2)

  def dense_mask(self, length, *, causal=False, rng=None, heads=None):
    i, j = P.grid(length)
    if len(self.dilations) == 1:
      return P.with_causal(P.Dilated(self.window, self.dilations[0])(i, j)[None], causal)
    if heads is None:
      raise ValueError(f'{self.name}: dense_mask(heads=...) is needed for per-head dilations.')
    per = self._heads_per_group(heads)
    masks = [P.Dilated(self.window, d)(i, j) for d in self.dilations for _ in range(per)]
    return P.with_causal(jnp.stack(masks), causal)


def _global_positions(name, global_tokens, length):
  """The static, sorted global positions below `length` (positions beyond a sequence are ignored)."""
  return tuple(sorted({g for g in global_tokens if g < length}))


@register('longformer')
class Longformer(Attention):
  """Sliding window plus global tokens: abs(i - j) <= window or i in G or j in G.

  Blocks holding a global token are extra key blocks of every row outside its band (the global
  columns, merged with the band by log-sum-exp) and visit every key block as query blocks (the global
  rows). `global_tokens` positions past a sequence's length are ignored. `block_size` only tunes speed.
  """
  window: int = 128
  global_tokens: tuple[int, ...] = (0,)
  block_size: Optional[int] = None

  @classmethod
  def small_options(cls, heads=2):
    return dict(window=4, global_tokens=(0, 9, 50), block_size=8)

  @classmethod
  def preset(cls, keys=512):
    return dict(window=keys // 2, global_tokens=(0,))

  def validate(self):
    _check_window(self.name, self.window)
    _check_block(self.name, self.block_size)
    if not isinstance(self.global_tokens, (tuple, list)):
      raise ValueError(f'{self.name}: global_tokens must be a tuple of positions, got '
                       f'{self.global_tokens!r}.')
    for g in self.global_tokens:
      check_nonnegative_int(self.name, 'global_tokens entry', g)

  def _is_global(self, size, length):
    marks = np.zeros(size, bool)
    marks[list(_global_positions(self.name, self.global_tokens, length))] = True
    return jnp.asarray(marks)

  def _attend(self, q, k, v, *, padding_mask, causal, rng):
    n = q.shape[1]
    block = fit_block(n, self.block_size or auto_block(self.window))
    reach = -(-self.window // block)
    gpos = _global_positions(self.name, self.global_tokens, n)
    gblocks = tuple(sorted({g // block for g in gpos}))

    right = 0 if causal else reach
    pos = positions(n)
    common = dict(qpos=pos, kpos=pos, causal=causal, qblock=block, kblock=block,
                  visible=P.BandOrGlobal(self.window), aux=self._is_global(round_up(n, block), n),
                  implementation=self.impl)
    if self.impl == 'pallas':  # one fused call: the band and the global columns in one layout
      def layout(nq, nk):
        idx, valid = band_layout(nq, reach, right)
        extra = jnp.broadcast_to(jnp.asarray(gblocks, jnp.int32), (1, nq, len(gblocks)))
        idx = jnp.concatenate([idx, extra], axis=-1)
        return idx, dedupe_slots(idx, jnp.concatenate([valid, jnp.ones(extra.shape, bool)], -1))
      return run_engine(q, k, v, padding_mask, layout=layout, global_q_blocks=gblocks, **common)[0]
    # On the jnp engine, two disjoint parts merged by their log-sum-exp: the band (static shifts, with
    # the global rows visiting every block), and the global key blocks outside each other row's band.
    band = run_engine(q, k, v, padding_mask, layout=band_shifts(reach, right), global_q_blocks=gblocks,
                      **common)
    if not gblocks:
      return band[0]
    columns = run_engine(q, k, v, padding_mask, layout=lambda nq, nk: outside_band(
        nq, gblocks, reach, right, skip_rows=gblocks), **common)
    return merge_partials([band, columns])[0]

  def dense_mask(self, length, *, causal=False, rng=None, heads=None):
    mask = P.BandOrGlobal(self.window)(*P.grid(length), self._is_global(length, length))
    return P.with_causal(mask[None], causal)


# --------------------------------------------------------------------------------------------------
# Sparse Transformer: strided / fixed
# --------------------------------------------------------------------------------------------------


@register('strided')
class Strided(Attention):
  """Sparse Transformer strided pattern: abs(i - j) <= stride or (i - j) % stride == 0.

  Two disjoint parts merged by their log-sum-exp: the band abs(i - j) <= stride, and the columns
  (i - j) % stride == 0 beyond it, which are full attention within each residue class (sequence reordered
  residue-major) excluding neighbours already in the band. With stride ~ sqrt(n) both parts see
  O(sqrt(n)) keys per query, as in the paper.
  """
  stride: int = 128
  block_size: Optional[int] = None

  @classmethod
  def small_options(cls, heads=2):
    return dict(stride=6)

  @classmethod
  def preset(cls, keys=512):
    return dict(stride=keys // 2)

  def validate(self):
    check_positive_int(self.name, 'stride', self.stride)
    _check_block(self.name, self.block_size)

  def _attend(self, q, k, v, *, padding_mask, causal, rng):
    n, l = q.shape[1], self.stride
    block = self.block_size or auto_block(l)
    band = band_attention(q, k, v, padding_mask, causal, window=l, block=block,
                          implementation=self.impl)
    qr, kr, vr = (residue_major(x, l) for x in (q, k, v))
    m = qr.shape[1]
    cblock = fit_block(m, DEFAULT_BLOCK)
    pos = positions(m)
    # Each residue class has n / stride positions: one key block per scan step keeps memory linear.
    out, lse = run_engine(qr, kr, vr, residue_major(padding_mask, l), qpos=pos, kpos=pos,
                          causal=causal, qblock=cblock, kblock=cblock, layout=all_blocks_layout,
                          visible=P.MinGap(2), step=1, implementation=self.impl)
    columns = residue_major_inverse(out, l, n), residue_major_inverse(lse, l, n)
    return merge_partials([band, columns])[0]

  def dense_mask(self, length, *, causal=False, rng=None, heads=None):
    return P.with_causal(P.Strided(self.stride)(*P.grid(length))[None], causal)


@register('fixed')
class Fixed(Attention):
  """Sparse Transformer fixed pattern: i // stride == j // stride or j % stride >= stride - summary.

  Two disjoint parts merged by their log-sum-exp: each query's own group of `stride` positions (one
  block), and the `summary` last positions of every other group, gathered into a compact key sequence.
  """
  stride: int = 128
  summary: int = 16

  @classmethod
  def small_options(cls, heads=2):
    return dict(stride=8, summary=3)

  @classmethod
  def preset(cls, keys=512):
    return dict(stride=keys // 2, summary=min(8, keys // 2))

  def validate(self):
    check_positive_int(self.name, 'stride', self.stride)
    check_positive_int(self.name, 'summary', self.summary)
    if self.summary > self.stride:
      raise ValueError(f'{self.name}: summary ({self.summary}) must be <= stride ({self.stride}).')

  def _attend(self, q, k, v, *, padding_mask, causal, rng):
    n, l, c = q.shape[1], self.stride, self.summary
    pos = positions(n)
    if l >= n:  # one group holds the whole sequence: plain attention.
      block = fit_block(n, l)
      return run_engine(q, k, v, padding_mask, qpos=pos, kpos=pos, causal=causal, qblock=block,
                        kblock=block, layout=band_shifts(0, 0), implementation=self.impl)[0]
    own = run_engine(q, k, v, padding_mask, qpos=pos, kpos=pos, causal=causal, qblock=l, kblock=l,
                     layout=band_shifts(0, 0), implementation=self.impl)
    groups = -(-n // l)

    def summary_of(x):  # [b, n, ...] -> [b, groups * c, ...]: the last c positions of every group.
      x = pad_axis(x, 1, groups * l)
      x = x.reshape((x.shape[0], groups, l) + x.shape[2:])[:, :, l - c:]
      return x.reshape((x.shape[0], groups * c) + x.shape[3:])

    ks, vs, ms = summary_of(k), summary_of(v), summary_of(padding_mask)
    spos = summary_of(pos[None])[0]
    # The summary keys grow as n * summary / stride: one key block per scan step keeps memory linear.
    others = run_engine(q, ks, vs, ms, qpos=pos, kpos=spos, causal=causal, qblock=fit_block(n, DEFAULT_BLOCK),
                        kblock=fit_block(ks.shape[1], DEFAULT_BLOCK), layout=all_blocks_layout,
                        visible=P.OtherGroup(l), step=1, implementation=self.impl)
    return merge_partials([own, others])[0]

  def dense_mask(self, length, *, causal=False, rng=None, heads=None):
    return P.with_causal(P.Fixed(self.stride, self.summary)(*P.grid(length))[None], causal)


# --------------------------------------------------------------------------------------------------
# BigBird
# --------------------------------------------------------------------------------------------------


def random_blocks(rng, heads: int, num_blocks: int, num_random: int, excluded):
  """Per head and query block, `num_random` distinct key blocks drawn uniformly outside `excluded`.

  Draws inside JAX (so each call with a new key gives a new pattern, even under jit) in O(heads *
  num_blocks * num_random) memory: the t-th draw picks a rank among the blocks still allowed and maps it
  to a block index by stepping over the earlier picks and the excluded blocks in ascending order.

  Args:
    rng: a jax.random key.
    excluded: (idx, valid) [num_blocks, E] blocks each row already sees (window, global).
  Returns:
    idx int32 [heads, num_blocks, num_random] and valid bool (False where too few blocks are left).
  """
  ex_idx, ex_valid = excluded
  if num_random == 0:  # window and global blocks only: nothing to draw (and no key needed)
    return (jnp.zeros((heads, num_blocks, 0), jnp.int32), jnp.zeros((heads, num_blocks, 0), bool))
  ex_valid = dedupe_slots(ex_idx, ex_valid)
  sentinel = num_blocks + num_random + ex_idx.shape[-1]  # above any rank or block
  ex_sorted = jnp.sort(jnp.where(ex_valid, ex_idx, sentinel), axis=-1)
  allowed = num_blocks - jnp.sum(ex_valid, axis=-1)  # [nb]
  u = jax.random.uniform(rng, (heads, num_blocks, num_random))
  picks = []
  for t in range(num_random):
    left = jnp.maximum(allowed - t, 1)[None]
    rank = jnp.minimum(jnp.floor(u[..., t] * left).astype(jnp.int32), left - 1)
    if picks:
      earlier = jnp.sort(jnp.stack(picks, -1), axis=-1)
      for s in range(t):
        rank = rank + (rank >= earlier[..., s])
    picks.append(rank)
  blocks = jnp.stack(picks, -1)
  for e in range(ex_sorted.shape[-1]):
    blocks = blocks + (blocks >= ex_sorted[None, :, e, None])
  valid = jnp.arange(num_random)[None, None, :] < allowed[None, :, None]
  return jnp.clip(blocks, 0, num_blocks - 1).astype(jnp.int32), jnp.broadcast_to(valid, blocks.shape)


@register('bigbird')
class BigBird(Attention):
  """BigBird (ITC): block window of 3, global blocks, random blocks per head and query block.

  With a = i // block_size, b = j // block_size: abs(a - b) <= 1 or a in G or b in G or b in R[h, a].
  R holds `num_random_blocks` distinct blocks per head and query block drawn from `rng`, outside the
  window and global blocks (fewer when not enough remain). `global_blocks` are block indices; negative
  ones count from the end (default first and last). The layout is exact at block level, so the engine
  needs no token predicate; `dense_mask` expands the same layout. `num_random_blocks=0` leaves the
  window and the global blocks, a fixed pattern: `rng` may then be omitted.
  """
  needs_rng = True
  block_size: int = 64
  num_random_blocks: int = 3
  global_blocks: tuple[int, ...] = (0, -1)

  @classmethod
  def small_options(cls, heads=2):
    return dict(block_size=8, num_random_blocks=2)

  @classmethod
  def preset(cls, keys=512):
    return dict(block_size=64, num_random_blocks=max(1, keys // 64 - 5))

  def validate(self):
    check_positive_int(self.name, 'block_size', self.block_size)
    check_nonnegative_int(self.name, 'num_random_blocks', self.num_random_blocks)
    if not isinstance(self.global_blocks, (tuple, list)):
      raise ValueError(f'{self.name}: global_blocks must be a tuple of block indices, got '
                       f'{self.global_blocks!r}.')
    for g in self.global_blocks:
      if isinstance(g, bool) or not isinstance(g, int):
        raise ValueError(f'{self.name}: global_blocks entries must be ints, got {g!r}.')

  def _check_rng(self, rng):
    if rng is None and self.num_random_blocks == 0:
      return None
    return super()._check_rng(rng)

  def _globals(self, num_blocks):
    return tuple(sorted({g % num_blocks for g in self.global_blocks if -num_blocks <= g < num_blocks}))

  def layout(self, num_blocks: int, heads: int, rng, causal: bool = False):
    """(idx [heads, nb, K], valid, global query blocks) for a sequence of `num_blocks` blocks."""
    g = self._globals(num_blocks)
    window_idx, window_valid = band_layout(num_blocks, 1, 1)
    g_idx = jnp.broadcast_to(jnp.asarray(g, jnp.int32), (1, num_blocks, len(g)))
    fixed_idx = jnp.concatenate([window_idx, g_idx], axis=-1)[0]
    fixed_valid = jnp.concatenate([window_valid, jnp.ones(g_idx.shape, bool)], axis=-1)[0]
    fixed_valid = dedupe_slots(fixed_idx, fixed_valid)
    r_idx, r_valid = random_blocks(rng, heads, num_blocks, self.num_random_blocks,
                                   (fixed_idx, fixed_valid))
    shape = (heads, num_blocks, fixed_idx.shape[-1])
    idx = jnp.concatenate([jnp.broadcast_to(fixed_idx, shape), r_idx], axis=-1)
    valid = jnp.concatenate([jnp.broadcast_to(fixed_valid, shape), r_valid], axis=-1)
    if causal:  # blocks wholly after the query block can hold nothing visible: skip their work.
      valid = valid & (idx <= jnp.arange(num_blocks)[None, :, None])
    return idx, valid, g

  def _attend(self, q, k, v, *, padding_mask, causal, rng):
    n, heads, bs = q.shape[1], q.shape[2], self.block_size
    nb = -(-n // bs)
    idx, valid, g = self.layout(nb, heads, rng, causal)
    pos = positions(n)
    common = dict(qpos=pos, kpos=pos, causal=causal, qblock=bs, kblock=bs, implementation=self.impl)
    if self.impl == 'pallas':  # one fused call over the whole layout
      return run_engine(q, k, v, padding_mask, layout=(idx, valid), global_q_blocks=g, **common)[0]
    # On the jnp engine, two disjoint parts merged by their log-sum-exp: the block window (the
    # layout's first 3 slots) as static shifts, with the global rows visiting every block; the global
    # and random blocks of the other rows by index.
    window = run_engine(q, k, v, padding_mask, layout=band_shifts(1, 0 if causal else 1),
                        global_q_blocks=g, **common)
    if idx.shape[-1] == 3:
      return window[0]
    other_rows = np.ones(nb, bool)
    other_rows[list(g)] = False
    rest = (idx[..., 3:], valid[..., 3:] & jnp.asarray(other_rows)[None, :, None])
    return merge_partials([window, run_engine(q, k, v, padding_mask, layout=rest, **common)])[0]

  def dense_mask(self, length, *, causal=False, rng=None, heads=None):
    self._check_rng(rng)
    if heads is None:
      raise ValueError(f'{self.name}: dense_mask(heads=...) is needed (random blocks are per head).')
    nb = -(-length // self.block_size)
    idx, valid, g = self.layout(nb, heads, rng)
    h_ix = jnp.arange(heads)[:, None, None]
    a_ix = jnp.arange(nb)[None, :, None]
    blocks = jnp.zeros((heads, nb, nb), jnp.int32).at[h_ix, a_ix, idx].add(valid.astype(jnp.int32)) > 0
    if g:
      blocks = blocks.at[:, jnp.asarray(g)].set(True)
    tok = jnp.arange(length) // self.block_size
    return P.with_causal(blocks[:, tok][:, :, tok], causal)


# --------------------------------------------------------------------------------------------------
# block_local (LRA's "Local Attention")
# --------------------------------------------------------------------------------------------------


@register('block_local')
class BlockLocal(Attention):
  """Non-overlapping chunks: query i sees the keys of its chunk, i // block_size == j // block_size.

  LRA's "Local Attention" (Tay et al. 2021; long-range-arena `models/local/local_attention.py`):
  the sequence is cut into contiguous chunks of `block_size` and each chunk attends only to itself,
  so a query sees at most `block_size` keys and chunks never exchange information. (The reference
  module's reshape to [batch, block_size, num_blocks, ...] grouped strided tokens instead of
  contiguous ones; this is the contiguous pattern the paper describes.) Default 128 (the reference
  module defaults to 20): one engine block, a full matmul tile. On the engine it is the
  block-diagonal layout: query block a visits key block a, with no token predicate.
  """
  block_size: int = 128

  @classmethod
  def small_options(cls, heads=2):
    return dict(block_size=8)

  @classmethod
  def preset(cls, keys=512):
    return dict(block_size=keys)

  def validate(self):
    check_positive_int(self.name, 'block_size', self.block_size)

  def _attend(self, q, k, v, *, padding_mask, causal, rng):
    n = q.shape[1]
    # block_size >= n: one chunk holds the whole sequence, and one (smaller) block suffices.
    block = fit_block(n, self.block_size)
    pos = positions(n)
    return run_engine(q, k, v, padding_mask, qpos=pos, kpos=pos, causal=causal, qblock=block,
                      kblock=block, layout=band_shifts(0, 0), implementation=self.impl)[0]

  def dense_mask(self, length, *, causal=False, rng=None, heads=None):
    return P.with_causal(P.SameBlock(self.block_size)(*P.grid(length))[None], causal)
