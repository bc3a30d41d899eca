"""Sequence-parallel attention: the length axis split over a mesh axis, exact for every fixed pattern.

`sequence_parallel_attention(attn, q, k, v, mesh=..., axis='sequence')` runs a registered variant under
`jax.shard_map` with q, k, v sharded along their length and returns what `attn(q, k, v)` returns on one
device (forward and gradient). Each device owns the `s = n / devices` consecutive positions
`[p * s, (p + 1) * s)` of its queries, keys and values and fetches only the keys its queries can see:

  halo      a band of width w needs the w keys on either side of the shard: `ppermute` from the neighbours,
            one hop per neighbouring shard it reaches (local, dilated, the bands of longformer/strided,
            fixed's own group, bigbird's window).
  gather    a small static set of key positions every query sees (longformer's global tokens, fixed's
            summary columns, bigbird's global blocks): `all_gather` of only those rows.
  global    query rows that see every key (longformer's global tokens, bigbird's global blocks): each device
  rows      attends them over its own keys and the partial results combine by a log-sum-exp all-reduce.
  ring      keys that can be anywhere (full/chunked; strided's columns): the key/value shards travel
            round the ring (`ppermute`), partial softmaxes merged online; a custom VJP sends the key/value
            gradients round the ring too, so a device holds only its own shard and the one in flight.
  collect   bigbird's random blocks: the shards travel round the ring and each device copies out the
            blocks its layout lists (drawn once from `rng` by `BigBird.layout`, as on one device).

All partial results over disjoint key sets merge by their log-sum-exp (`blocks.merge_partials`), so the
result is exact, not approximate. Memory per device falls as 1 / devices (plus the halo, and the static
gathered rows, which do not grow with the number of devices).

The engine's scans start from fresh (device-invariant) carries, so the shard_map runs with
`check_vma=False`; the collectives used here (ppermute, all_gather, psum) then transpose correctly
because every cotangent that reaches them is per device.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from efficient_attn.attention import patterns as P
from efficient_attn.attention.api import Attention
from efficient_attn.attention.dense import MASK_VALUE
from efficient_attn.attention.blocks import (DEFAULT_BLOCK, all_blocks_layout, auto_block,
                                             fit_block, from_blocks, lse_from_blocks, pad_axis,
                                             residue_major, residue_major_inverse, round_up,
                                             to_blocks)
from efficient_attn.attention.engine import (block_sparse_attention, query_chunked_attention,
                                             run_engine)

# --------------------------------------------------------------------------------------------------
# The shard a device holds
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shard:
  """Static facts about the sharded length axis, used inside `shard_map`.

  Attributes:
    axis: the mesh axis name the length is split over.
    size: the number of devices along it.
    length: s, positions per device (the padded length is size * s).
    impl: the engine implementation ('xla' or 'pallas').
  """
  axis: str
  size: int
  length: int
  impl: str = 'xla'

  def index(self):
    """This device's position along the axis (traced int32 scalar)."""
    return jax.lax.axis_index(self.axis)

  def start(self):
    """Absolute position of this device's first row."""
    return self.index() * self.length

  def positions(self):
    """int32 [s]: absolute positions of this device's rows."""
    return self.start() + jnp.arange(self.length, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class SameGroup:
  """i // group == j // group: the fixed pattern's own group."""
  group: int

  def __call__(self, i, j, aux=()):
    return i // self.group == j // self.group


# --------------------------------------------------------------------------------------------------
# Collectives
# --------------------------------------------------------------------------------------------------


def shift(x, hops: int, sh: Shard):
  """Device p receives device (p - hops)'s x (zeros where that device does not exist).

  hops > 0 brings data from the left (earlier positions), hops < 0 from the right.
  """
  pairs = [(i, i + hops) for i in range(sh.size) if 0 <= i + hops < sh.size]
  if not pairs:
    return jnp.zeros_like(x)
  return jax.lax.ppermute(x, sh.axis, pairs)


def halo(x, left: int, right: int, sh: Shard):
  """[b, s, ...] -> [b, left + s + right, ...]: the shard with its neighbours' rows on either side.

  Row e of the result holds absolute position `p * s - left + e`; rows outside the sequence are zeros
  (so a padding mask passed through here is False there). A halo wider than a shard takes one `ppermute`
  per shard it spans; only the last hop sends a partial shard.
  """
  s = sh.length
  pieces = []
  for t in range(-(-left // s), 0, -1):
    need = min(s, left - (t - 1) * s)  # the last `need` rows of shard p - t
    pieces.append(shift(x[:, s - need:], t, sh))
  pieces.append(x)
  for t in range(1, -(-right // s) + 1):
    need = min(s, right - (t - 1) * s)  # the first `need` rows of shard p + t
    pieces.append(shift(x[:, :need], -t, sh))
  return jnp.concatenate(pieces, axis=1) if len(pieces) > 1 else x


def _cap(width: int, sh: Shard) -> int:
  """A halo never needs more than the other shards hold."""
  return min(width, (sh.size - 1) * sh.length)


def gather_positions(x, positions, sh: Shard):
  """Rows of the global sequence at static absolute `positions`, on every device.

  x: [b, s, ...] this device's shard; returns [b, len(positions), ...]. Each device contributes only its own
  listed rows to one `all_gather` (padded to the busiest device's count), so the traffic and memory are
  about len(positions) rows, whatever the sequence length.
  """
  s = sh.length
  per_shard = [[] for _ in range(sh.size)]
  where = []
  for pos in positions:
    owner = pos // s
    where.append((owner, len(per_shard[owner])))
    per_shard[owner].append(pos - owner * s)
  width = max(1, max(len(rows) for rows in per_shard))
  table = np.zeros((sh.size, width), np.int32)
  for owner, rows in enumerate(per_shard):
    table[owner, :len(rows)] = rows
  select = np.array([owner * width + rank for owner, rank in where], np.int32)
  mine = jnp.take(x, jnp.asarray(table)[sh.index()], axis=1)
  everyone = jax.lax.all_gather(mine, sh.axis, axis=1, tiled=True)  # [b, size * width, ...]
  return jnp.take(everyone, jnp.asarray(select), axis=1)


def realign(x, old: int, new: int, sh: Shard):
  """Re-cuts the sharded sequence: device p holds rows [p * old, (p + 1) * old) and gets [p * new,
  (p + 1) * new) (zeros past the end). Used to pad shards to whole blocks; fetches only the neighbouring
  shards the new range overlaps."""
  if old == new:
    return x
  first = min((p * new) // old - p for p in range(sh.size))
  last = max((p * new + new - 1) // old - p for p in range(sh.size))
  pieces = [shift(x, -t, sh) if t else x for t in range(first, last + 1)]  # shard p + t
  rows = jnp.concatenate(pieces, axis=1)  # starts at position (p + first) * old
  offset = sh.index() * new - (sh.index() + first) * old
  return jax.lax.dynamic_slice_in_dim(rows, offset, new, axis=1)


def merge(parts):
  """Like `blocks.merge_partials` but keeps the output in float32 (further merges may follow)."""
  lses = jnp.stack([lse for _, lse in parts])
  top = jnp.max(lses, axis=0)
  lse = top + jnp.log(jnp.sum(jnp.exp(lses - top), axis=0))
  out = sum(o.astype(jnp.float32) * jnp.exp(l - lse)[..., None] for o, l in parts)
  return out, lse


# --------------------------------------------------------------------------------------------------
# Building blocks: windows over a halo, global rows, the ring
# --------------------------------------------------------------------------------------------------


def sliding_attention(q, k, v, kvalid, *, qpos, kpos, lo: int, hi: int, block: int, visible=None,
                      aux=(), causal: bool, impl: str):
  """Query m may see only keys m + lo .. m + hi of the key sequence: (out, lse).

  Args:
    q: [b, nq, h, d]; k, v: [b, nk, h, d]; kvalid: bool [b, nk].
    qpos, kpos: int32 [nq], [nk] for `visible` and `causal` (any coordinates both share).
    lo, hi: static offsets of the key range (lo may be negative); `visible` refines it.
    block: query and key block size.

  Returns:
    out [b, nq, h, d] and lse float32 [b, nq, h].
  """
  first, last = lo // block, (block - 1 + hi) // block

  def layout(nq, nk):
    idx = jnp.arange(nq, dtype=jnp.int32)[:, None] + jnp.arange(first, last + 1, dtype=jnp.int32)
    valid = (idx >= 0) & (idx < nk)
    return jnp.clip(idx, 0, nk - 1)[None], valid[None]

  return run_engine(q, k, v, kvalid, qpos=qpos, kpos=kpos, causal=causal, qblock=block, kblock=block,
                    layout=layout, visible=visible, aux=aux, implementation=impl)


def halo_attention(q, k, v, mask, *, left: int, right: int, visible, causal: bool, block: int,
                   sh: Shard, aux=()):
  """Each query sees (at most) keys within `left` before and `right` after it, fetched as a halo.

  q, k, v: [b, s, h, d] this device's shard; mask: bool [b, s]. `visible` is a predicate on absolute
  positions. Returns (out [b, s, h, d], lse [b, s, h]).
  """
  reach_left, reach_right = left, 0 if causal else right
  left, right = _cap(reach_left, sh), _cap(reach_right, sh)
  ke, ve, me = (halo(x, left, right, sh) for x in (k, v, mask))
  kpos = sh.start() - left + jnp.arange(ke.shape[1], dtype=jnp.int32)
  block = fit_block(sh.length, block)
  # Query m sits at halo row m + left; a capped halo (lo < 0) already holds every existing key.
  return sliding_attention(q, ke, ve, me, qpos=sh.positions(), kpos=kpos, lo=left - reach_left,
                           hi=left + reach_right, block=block, visible=visible, aux=aux,
                           causal=causal, impl=sh.impl)


def dilated_band(q, k, v, mask, *, window: int, dilation: int, causal: bool, block: int, sh: Shard):
  """(i - j) % d == 0 and abs(i - j) <= window * d over a halo, reordered residue-major: (out, lse).

  The halo's left width is a multiple of d, so a query's residue class in the shard and its keys' class
  in the halo are the same row after `residue_major`; there the pattern is a band of `window`, and the
  class index (position // d, shifted) serves as the position for the band and for `causal`.
  """
  d, s = dilation, sh.length
  need = window * d
  left = min(need, round_up((sh.size - 1) * s, d))  # beyond that there is nothing (multiple of d)
  right = 0 if causal else min(need, (sh.size - 1) * s)
  ke, ve, me = (halo(x, left, right, sh) for x in (k, v, mask))
  qr, kr, vr = residue_major(q, d), residue_major(ke, d), residue_major(ve, d)
  mr = residue_major(me, d)
  shift_rows = left // d  # query m of a class sits at key m + left / d of the same class
  qpos = shift_rows + jnp.arange(qr.shape[1], dtype=jnp.int32)
  kpos = jnp.arange(kr.shape[1], dtype=jnp.int32)
  hi = shift_rows + (0 if causal else window)
  out, lse = sliding_attention(qr, kr, vr, mr, qpos=qpos, kpos=kpos, lo=shift_rows - window, hi=hi,
                               block=fit_block(qr.shape[1], block), visible=P.Band(window),
                               causal=causal, impl=sh.impl)
  return residue_major_inverse(out, d, s), residue_major_inverse(lse, d, s)


def global_rows(qg, qg_pos, k, v, mask, *, causal: bool, sh: Shard):
  """Rows that see every key: each device attends them over its own shard, then a log-sum-exp all-reduce.

  qg: [b, G, h, d] the same on every device; qg_pos: int32 [G] their absolute positions. k, v, mask: this
  device's shard. Returns out float32 [b, G, h, d], the same on every device.
  """
  o, lse = run_engine(qg, k, v, mask, qpos=qg_pos, kpos=sh.positions(), causal=causal,
                      qblock=fit_block(qg.shape[1], DEFAULT_BLOCK), kblock=fit_block(sh.length, DEFAULT_BLOCK),
                      layout=all_blocks_layout, implementation=sh.impl)
  # The shift only keeps exp() in range; it cancels, so no gradient needs to flow through pmax.
  top = jax.lax.pmax(jax.lax.stop_gradient(lse), sh.axis)
  total = top + jnp.log(jax.lax.psum(jnp.exp(lse - top), sh.axis))
  return jax.lax.psum(o.astype(jnp.float32) * jnp.exp(lse - total)[..., None], sh.axis)


def overwrite_rows(out, rows, positions, sh: Shard):
  """out [b, s, ...] with the rows at static absolute `positions` (sorted) taken from rows [b, G, ...]."""
  table = jnp.asarray(positions, jnp.int32)
  pos = sh.positions()
  at = jnp.clip(jnp.searchsorted(table, pos), 0, len(positions) - 1)
  hit = table[at] == pos
  picked = jnp.take(rows, at, axis=1).astype(out.dtype)
  return jnp.where(hit.reshape((1, -1) + (1,) * (out.ndim - 2)), picked, out)


def ring_attention(attend: Callable[..., Any], sh: Shard, causal: bool):
  """Ring attention over key/value shards: returns `ring(q, k, v, kvalid) -> (out f32, lse)`.

  `attend(q, k, v, kvalid, src, me) -> (out, lse)` is attention of this device's queries over the key shard
  that came from device `src` (me: this device's index), over [b, rows, h, d] arrays. The shards travel
  round the ring with `ppermute` (size - 1 hops) and the partial results merge online. The backward pass
  sends the shards round again together with their gradient accumulators, recomputing each step's partial
  result (a flash-attention-style backward through the engine's own VJP), so a device holds its own and
  one travelling key/value shard (and their gradients) in either pass: memory O(s), not O(n). With
  `causal`, shards from later devices hold no visible key and are skipped (`lax.cond`).
  """
  size, axis = sh.size, sh.axis
  ring_pairs = [(i, (i + 1) % size) for i in range(size)]

  def rotate(xs):
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis, ring_pairs), xs)

  def partial_result(q, k, v, kvalid, src, me):
    out, lse = attend(q, k, v, kvalid, src, me)
    return out.astype(jnp.float32), lse

  def step_forward(q, k, v, kvalid, src, me):
    if not causal:
      return partial_result(q, k, v, kvalid, src, me)
    shapes = jax.eval_shape(partial_result, q, k, v, kvalid, src, me)
    nothing = lambda *_: (jnp.zeros(shapes[0].shape, jnp.float32),
                          jnp.full(shapes[1].shape, MASK_VALUE, jnp.float32))
    return jax.lax.cond(src <= me, partial_result, nothing, q, k, v, kvalid, src, me)

  def forward(q, k, v, kvalid):
    me = jax.lax.axis_index(axis)
    out, lse = step_forward(q, k, v, kvalid, me, me)

    def body(carry, t):
      kv, out, lse = carry
      kv = rotate(kv)
      o_t, lse_t = step_forward(q, *kv, (me - t) % size, me)
      new_lse = jnp.logaddexp(lse, lse_t)
      out = out * jnp.exp(lse - new_lse)[..., None] + o_t * jnp.exp(lse_t - new_lse)[..., None]
      return (kv, out, new_lse), None

    (_, out, lse), _ = jax.lax.scan(body, ((k, v, kvalid), out, lse), jnp.arange(1, size))
    return out, lse

  def step_grads(q, k, v, kvalid, src, me, out, lse, dout, dlse):
    """This step's share of dq, dk, dv given the final (out, lse) and their cotangents."""
    (o_t, lse_t), vjp = jax.vjp(lambda q, k, v: partial_result(q, k, v, kvalid, src, me), q, k, v)
    # out = sum_t w_t o_t with w_t = exp(lse_t - lse): d o_t = w_t dout, d lse_t = w_t (dout.(o_t - out)
    # + dlse).
    w = jnp.exp(lse_t - lse)
    d_lse_t = w * (jnp.sum(dout * (o_t - out), axis=-1) + dlse)
    dq, dk, dv = vjp((w[..., None] * dout, d_lse_t))
    return dq.astype(jnp.float32), dk.astype(jnp.float32), dv.astype(jnp.float32)

  def step_backward(q, k, v, kvalid, src, me, *rest):
    if not causal:
      return step_grads(q, k, v, kvalid, src, me, *rest)
    nothing = lambda *_: (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
                          jnp.zeros(v.shape, jnp.float32))
    return jax.lax.cond(src <= me, step_grads, nothing, q, k, v, kvalid, src, me, *rest)

  @jax.custom_vjp
  def ring(q, k, v, kvalid):
    return forward(q, k, v, kvalid)

  def ring_fwd(q, k, v, kvalid):
    out, lse = forward(q, k, v, kvalid)
    return (out, lse), (q, k, v, kvalid, out, lse)

  def ring_bwd(residuals, cotangents):
    q, k, v, kvalid, out, lse = residuals
    dout, dlse = cotangents
    dout = dout.astype(jnp.float32)
    me = jax.lax.axis_index(axis)
    rest = (out, lse, dout, dlse)
    dq, dk, dv = step_backward(q, k, v, kvalid, me, me, *rest)

    def body(carry, t):
      kv, dkv, dq = carry
      kv, dkv = rotate((kv, dkv))
      dq_t, dk_t, dv_t = step_backward(q, *kv, (me - t) % size, me, *rest)
      return (kv, (dkv[0] + dk_t, dkv[1] + dv_t), dq + dq_t), None

    (_, (dk, dv), dq), _ = jax.lax.scan(body, ((k, v, kvalid), (dk, dv), dq), jnp.arange(1, size))
    dk, dv = rotate((dk, dv))  # one more hop brings every accumulator home
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None

  ring.defvjp(ring_fwd, ring_bwd)
  return ring


def ring_collect(per_head, shared, wanted, *, blocks_per_shard: int, sh: Shard):
  """Copies the key blocks each device's layout lists, sending the shards round the ring once.

  Args:
    per_head: tuple of [b, h, sb, ...] arrays, this device's sb blocks of the global sequence (global
      block index p * sb + local index), one per head (keys, values).
    shared: tuple of [b, sb, ...] arrays, the same for every head (the padding mask).
    wanted: int32 [h, ...]: global block indices this device needs, per head.
    blocks_per_shard: sb.

  Returns:
    (per_head, shared) with the block axis replaced by `wanted`: [b, h, *wanted.shape[1:], ...] each.
    Memory: one shard in flight plus the result; an all_gather would hold the whole sequence.
  """
  heads = wanted.shape[0]
  owner, local = wanted // blocks_per_shard, wanted % blocks_per_shard
  head_ix = jnp.arange(heads).reshape((heads,) + (1,) * (wanted.ndim - 1))
  ring_pairs = [(i, (i + 1) % sh.size) for i in range(sh.size)]

  def pick(shard):
    ph, sd = shard
    return tuple(x[:, head_ix, local] for x in ph), tuple(x[:, local] for x in sd)

  def keep(shard, found, src):
    hit = owner == src  # [h, ...]: the blocks this shard holds
    def one(got, old):
      return jnp.where(hit.reshape((1,) + hit.shape + (1,) * (got.ndim - hit.ndim - 1)), got, old)
    return jax.tree.map(one, pick(shard), found)

  me = sh.index()
  shard = (tuple(per_head), tuple(shared))
  found = keep(shard, jax.tree.map(jnp.zeros_like, pick(shard)), me)

  def body(carry, t):
    shard, found = carry
    shard = jax.tree.map(lambda x: jax.lax.ppermute(x, sh.axis, ring_pairs), shard)
    return (shard, keep(shard, found, (me - t) % sh.size)), None

  (_, found), _ = jax.lax.scan(body, (shard, found), jnp.arange(1, sh.size))
  return found


# --------------------------------------------------------------------------------------------------
# One plan per variant: a function of this device's (q, k, v, mask, *replicated) -> out [b, s, h, d]
# --------------------------------------------------------------------------------------------------


def _plan_full(attn, *, n, sh, causal, heads, rng):
  """full / chunked: ring attention. Each ring step is the engine over every key block of the shard in
  flight; `chunked` also walks its query chunks one at a time (`lax.map`), as on one device."""
  del n, heads, rng
  s = sh.length
  chunked = attn.name == 'chunked'
  qblock = fit_block(s, attn.query_chunk if chunked else DEFAULT_BLOCK)
  kblock = fit_block(s, attn.key_chunk if chunked else DEFAULT_BLOCK)

  def attend(q, k, v, kvalid, src, me):
    qpos = me * s + jnp.arange(s, dtype=jnp.int32)
    kpos = src * s + jnp.arange(s, dtype=jnp.int32)
    if not chunked:
      return run_engine(q, k, v, kvalid, qpos=qpos, kpos=kpos, causal=causal, qblock=qblock,
                        kblock=kblock, layout=all_blocks_layout, implementation=sh.impl)
    return query_chunked_attention(q, k, v, kvalid, qpos=qpos, kpos=kpos, causal=causal,
                                   query_chunk=attn.query_chunk, key_chunk=attn.key_chunk,
                                   implementation=sh.impl)

  def run(q, k, v, mask):
    return ring_attention(attend, sh, causal)(q, k, v, mask)[0]

  return run, ()


def _plan_local(attn, *, n, sh, causal, heads, rng):
  del n, heads, rng
  block = attn.block_size or auto_block(attn.window)

  def run(q, k, v, mask):
    return halo_attention(q, k, v, mask, left=attn.window, right=attn.window,
                          visible=P.Band(attn.window), causal=causal, block=block, sh=sh)[0]

  return run, ()


def _plan_dilated(attn, *, n, sh, causal, heads, rng):
  del n, rng
  per = attn._heads_per_group(heads)  # pylint: disable=protected-access
  block = attn.block_size or auto_block(attn.window)

  def run(q, k, v, mask):
    outs = []
    for g, d in enumerate(attn.dilations):
      hs = slice(g * per, (g + 1) * per)
      out, _ = dilated_band(q[:, :, hs], k[:, :, hs], v[:, :, hs], mask, window=attn.window,
                            dilation=d, causal=causal, block=block, sh=sh)
      outs.append(out)
    return jnp.concatenate(outs, axis=2)

  return run, ()


def _plan_longformer(attn, *, n, sh, causal, heads, rng):
  del heads, rng
  w = attn.window
  gpos = tuple(sorted({t for t in attn.global_tokens if t < n}))  # as the variant: later ones ignored
  block = attn.block_size or auto_block(w)

  def run(q, k, v, mask):
    band = halo_attention(q, k, v, mask, left=w, right=w, visible=P.Band(w), causal=causal,
                          block=block, sh=sh)
    if not gpos:
      return band[0]
    g_arr = jnp.asarray(gpos, jnp.int32)
    kg, vg, mg = (gather_positions(x, gpos, sh) for x in (k, v, mask))
    # The global columns beyond the band (inside it they are already counted).
    columns = run_engine(q, kg, vg, mg, qpos=sh.positions(), kpos=g_arr, causal=causal,
                         qblock=fit_block(sh.length, DEFAULT_BLOCK), kblock=fit_block(len(gpos), DEFAULT_BLOCK),
                         layout=all_blocks_layout, visible=P.MinGap(w + 1), implementation=sh.impl)
    out, _ = merge([band, columns])
    rows = global_rows(gather_positions(q, gpos, sh), g_arr, k, v, mask, causal=causal, sh=sh)
    return overwrite_rows(out, rows, gpos, sh)

  return run, ()


def _class_rows(sh: Shard, stride: int):
  """Static rows per residue class that one shard can hold: max over devices."""
  s = sh.length
  return max((p * s + s - 1) // stride - (p * s) // stride + 1 for p in range(sh.size))


def _to_classes(x, sh: Shard, stride: int, rows: int):
  """[b, s, ...] -> ([b * stride, rows, ...], inside bool [stride, rows]).

  Row r, column t holds absolute position (p * s // stride + t) * stride + r: residue classes by absolute
  position, so the classes of every shard line up and column t is the class coordinate minus p * s //
  stride. `inside` is False for cells outside this shard.
  """
  s = sh.length
  start = sh.start()
  u = (jnp.arange(rows, dtype=jnp.int32)[None, :] * stride + jnp.arange(stride, dtype=jnp.int32)[:, None]
       - start % stride)  # [stride, rows] local row of every cell
  inside = (u >= 0) & (u < s)
  got = jnp.take(x, jnp.clip(u, 0, s - 1).reshape(-1), axis=1)
  got = got.reshape((x.shape[0] * stride, rows) + x.shape[2:])
  return got, inside


def _from_classes(y, sh: Shard, stride: int, rows: int):
  """Inverse of `_to_classes`: [b * stride, rows, ...] -> [b, s, ...]."""
  u = sh.start() % stride + jnp.arange(sh.length, dtype=jnp.int32)
  flat = (u % stride) * rows + u // stride
  y = y.reshape((y.shape[0] // stride, stride * rows) + y.shape[2:])
  return jnp.take(y, flat, axis=1)


def _plan_strided(attn, *, n, sh, causal, heads, rng):
  del n, heads, rng
  l, s = attn.stride, sh.length
  block = attn.block_size or auto_block(l)
  rows = _class_rows(sh, l)
  cblock = fit_block(rows, DEFAULT_BLOCK)

  def attend(q, k, v, kvalid, src, me):
    # Positions are class coordinates (position // stride): within a class they order keys like the
    # sequence, and two steps apart means abs(i - j) >= 2 * stride, beyond the band.
    qpos = (me * s) // l + jnp.arange(rows, dtype=jnp.int32)
    kpos = (src * s) // l + jnp.arange(rows, dtype=jnp.int32)
    return run_engine(q, k, v, kvalid, qpos=qpos, kpos=kpos, causal=causal, qblock=cblock,
                      kblock=cblock, layout=all_blocks_layout, visible=P.MinGap(2), step=1,
                      implementation=sh.impl)

  def run(q, k, v, mask):
    band = halo_attention(q, k, v, mask, left=l, right=l, visible=P.Band(l), causal=causal,
                          block=block, sh=sh)
    (qc, _), (kc, _), (vc, _) = (_to_classes(x, sh, l, rows) for x in (q, k, v))
    mc, inside = _to_classes(mask, sh, l, rows)
    mc = mc & jnp.tile(inside, (q.shape[0], 1))
    out, lse = ring_attention(attend, sh, causal)(qc, kc, vc, mc)
    columns = _from_classes(out, sh, l, rows), _from_classes(lse, sh, l, rows)
    return merge([band, columns])[0]

  return run, ()


def _plan_fixed(attn, *, n, sh, causal, heads, rng):
  del heads, rng
  l, c = attn.stride, attn.summary
  summary = tuple(j for j in range(n) if j % l >= l - c)
  block = min(DEFAULT_BLOCK, auto_block(l))

  def run(q, k, v, mask):
    own = halo_attention(q, k, v, mask, left=l - 1, right=l - 1, visible=SameGroup(l),
                         causal=causal, block=block, sh=sh)
    if not summary:
      return own[0]
    ks, vs, ms = (gather_positions(x, summary, sh) for x in (k, v, mask))
    # The summary keys grow as n * summary / stride: one key block per scan step keeps memory linear.
    others = run_engine(q, ks, vs, ms, qpos=sh.positions(), kpos=jnp.asarray(summary, jnp.int32),
                        causal=causal, qblock=fit_block(sh.length, DEFAULT_BLOCK),
                        kblock=fit_block(len(summary), DEFAULT_BLOCK), layout=all_blocks_layout,
                        visible=P.OtherGroup(l), step=1, implementation=sh.impl)
    return merge([own, others])[0]

  return run, ()


def _plan_bigbird(attn, *, n, sh, causal, heads, rng):
  bs, r = attn.block_size, attn.num_random_blocks
  s = sh.length
  sb = s // bs  # the wrapper pads so that shards hold whole blocks
  nb = -(-n // bs)
  idx, valid, g = attn.layout(nb, heads, rng, causal)
  nb_pad = sh.size * sb
  idx, valid = pad_axis(idx, 1, nb_pad, 0), pad_axis(valid, 1, nb_pad, False)
  fixed = 3 + len(g)  # window slots (a - 1, a, a + 1), then the global blocks
  right = 0 if causal else bs
  g_pos = tuple(b * bs + t for b in g for t in range(bs))

  def run(q, k, v, mask, idx, valid):
    b, _, h, d = q.shape
    me = sh.index()
    own_idx = jax.lax.dynamic_slice_in_dim(idx, me * sb, sb, axis=1)  # [h, sb, K]
    own_valid = jax.lax.dynamic_slice_in_dim(valid, me * sb, sb, axis=1)
    # Window and global key blocks, the same for every head: [halo block, own blocks, halo block,
    # global blocks].
    ke, ve, mask_e = (halo(x, bs, right, sh) for x in (k, v, mask))
    kpos = sh.start() - bs + jnp.arange(ke.shape[1], dtype=jnp.int32)
    if g:
      kg, vg, mg = (gather_positions(x, g_pos, sh) for x in (k, v, mask))
      ke, ve = jnp.concatenate([ke, kg], axis=1), jnp.concatenate([ve, vg], axis=1)
      mask_e = jnp.concatenate([mask_e, mg], axis=1)
      kpos = jnp.concatenate([kpos, jnp.asarray(g_pos, jnp.int32)])
    window_blocks = 1 + sb + right // bs
    a = jnp.arange(sb, dtype=jnp.int32)[:, None]
    slot_idx = jnp.concatenate([a + jnp.arange(3, dtype=jnp.int32),
                                jnp.broadcast_to(window_blocks + jnp.arange(len(g), dtype=jnp.int32),
                                                 (sb, len(g)))], axis=1)
    slot_idx = jnp.clip(slot_idx, 0, window_blocks + len(g) - 1)
    parts = [run_engine(q, ke, ve, mask_e, qpos=sh.positions(), kpos=kpos, causal=causal, qblock=bs,
                        kblock=bs, layout=(slot_idx[None], own_valid[:1, :, :fixed]),
                        implementation=sh.impl)]
    if r:
      # Random blocks differ per head, so heads fold into the batch: every (batch, head) row has its own
      # sb * r key blocks, and an invalid slot becomes a block of masked keys. Causality needs no
      # positions: a random block is never the query's own block, and the layout dropped later ones.
      kb, vb = to_blocks(k, bs), to_blocks(v, bs)  # [b, h, sb, bs, d]
      mb = mask.reshape(b, sb, bs)
      (rk, rv), (rm,) = ring_collect((kb, vb), (mb,), own_idx[:, :, fixed:], blocks_per_shard=sb,
                                     sh=sh)  # [b, h, sb, r, bs, ...]
      rm = rm & own_valid[None, :, :, fixed:, None]
      qb = to_blocks(q, bs).reshape(b * h, 1, sb, bs, d)
      rk, rv = (x.reshape(b * h, 1, sb * r, bs, d) for x in (rk, rv))
      ridx = (jnp.arange(sb, dtype=jnp.int32)[:, None] * r + jnp.arange(r, dtype=jnp.int32))[None]
      out, lse = block_sparse_attention(qb, rk, rv, kvalid=rm.reshape(b * h, sb * r, bs),
                                        qpos=jnp.zeros((sb, bs), jnp.int32),
                                        kpos=jnp.zeros((sb * r, bs), jnp.int32), idx=ridx,
                                        valid=jnp.ones(ridx.shape, bool), implementation=sh.impl)
      out, lse = out.reshape(b, h, sb, bs, d), lse.reshape(b, h, sb, bs)
      parts.append((from_blocks(out, s), lse_from_blocks(lse, s)))
    out, _ = merge(parts)
    if g:
      rows = global_rows(gather_positions(q, g_pos, sh), jnp.asarray(g_pos, jnp.int32), k, v, mask,
                         causal=causal, sh=sh)
      out = overwrite_rows(out, rows, g_pos, sh)
    return out

  return run, (idx, valid)


_PLANS = {
    'full': _plan_full,
    'chunked': _plan_full,
    'local': _plan_local,
    'dilated': _plan_dilated,
    'longformer': _plan_longformer,
    'strided': _plan_strided,
    'fixed': _plan_fixed,
    'bigbird': _plan_bigbird,
}
# The variants with a plan, in the table's order: the one list (models and tests read it).
SUPPORTED = tuple(_PLANS)


# --------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------


def _resolve_mesh(mesh):
  if mesh is not None:
    return mesh
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or not mesh.axis_names:
    raise ValueError('sequence_parallel_attention needs a mesh: pass mesh=... or set one with '
                     'jax.set_mesh(...).')
  return mesh


def _batch_entry(x, mesh, axis):
  """The mesh axes x's batch dimension is explicitly sharded over (None if none, or if they include
  `axis`): the sequence-parallel call keeps them."""
  spec = getattr(jax.typeof(x).sharding, 'spec', None)
  if spec is None or not len(spec) or spec[0] is None:
    return None
  names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  return None if axis in names or not set(names) <= set(mesh.axis_names) else spec[0]


def _explicit_axes(mesh) -> frozenset:
  return frozenset(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                   if kind == jax.sharding.AxisType.Explicit)


def sequence_parallel_attention(attn: Attention, q, k, v, *, padding_mask=None, causal: bool = False,
                                rng=None, mesh=None, axis: str = 'sequence'):
  """`attn(q, k, v, ...)` with the length axis split over the mesh axis `axis`.

  Args:
    attn: a variant from `make_attention`; one of SUPPORTED ('lsh' is not).
    q, k, v: [batch, length, heads, head_dim] global arrays (ideally already sharded along length).
    padding_mask: bool [batch, length], True for real tokens.
    causal: query i sees only keys j <= i.
    rng: a jax.random key for bigbird (the same key gives the same pattern as `attn(...)`).
    mesh: a `jax.sharding.Mesh`; None: the mesh set with `jax.set_mesh`.
    axis: the mesh axis the length is split over.

  Returns:
    [batch, length, heads, head_dim] in q's dtype, equal to `attn(q, k, v, ...)` (zeros at padded
    queries). The length must be divisible by the axis size; bigbird shards that do not hold whole
    blocks are padded internally with masked positions.
  """
  if not isinstance(attn, Attention):
    raise ValueError(f'sequence_parallel_attention: attn must be an Attention from make_attention, '
                     f'got {type(attn).__name__}.')
  if attn.name not in _PLANS:
    raise ValueError(f'sequence_parallel_attention does not support {attn.name!r}; supported '
                     f'variants: {", ".join(SUPPORTED)}.')
  # The checks and the zeroing of padded positions of `attn(...)` itself (one mechanism for both).
  q, k, v, mask, causal, rng, _ = attn._prepare(  # pylint: disable=protected-access
      q, k, v, padding_mask, causal, rng, None)
  mesh = _resolve_mesh(mesh)
  if axis not in mesh.axis_names:
    raise ValueError(f'sequence_parallel_attention: mesh has no axis {axis!r}; its axes are '
                     f'{", ".join(mesh.axis_names)}.')
  size = mesh.shape[axis]
  b, n, heads = q.shape[:3]
  if n % size:
    raise ValueError(f'sequence_parallel_attention: length {n} is not divisible by the {size} devices '
                     f'of mesh axis {axis!r}; pad the sequence (with padding_mask False) first.')
  s = n // size
  # Bigbird needs shards of whole blocks: inside, every shard grows to a multiple of block_size (the
  # extra positions are masked) and the output is cut back.
  unit = attn.block_size if attn.name == 'bigbird' else 1
  s_run = round_up(n, size * unit) // size
  sh = Shard(axis=axis, size=size, length=s_run, impl=attn.impl)
  run, replicated = _PLANS[attn.name](attn, n=n, sh=sh, causal=causal, heads=heads, rng=rng)

  def per_device(q, k, v, m, *rep):
    q_run, k_run, v_run, m_run = (realign(x, s, s_run, sh) for x in (q, k, v, m))
    out = run(q_run, k_run, v_run, m_run, *rep).astype(q.dtype)
    return realign(out, s_run, s, sh)

  # Explicit axes become manual too: inside, every array is then a plain local one (the engine's scans
  # do not carry explicit shardings). The batch keeps its sharding; heads and head_dim are gathered
  # (per-head layouts such as bigbird's index all heads). Auto axes stay with the compiler.
  manual = _explicit_axes(mesh) | {axis}
  batch = None
  if axis in _explicit_axes(mesh):
    batch = _batch_entry(q, mesh, axis)
    place = lambda x, spec: jax.reshard(
        x, NamedSharding(mesh, spec) if isinstance(mesh, jax.sharding.Mesh) else spec)
    q, k, v = (place(jnp.asarray(x), PartitionSpec(batch, axis, None, None)) for x in (q, k, v))
    mask = place(mask, PartitionSpec(batch, axis))
  seq = PartitionSpec(batch, axis)
  sharded = jax.shard_map(per_device, mesh=mesh,
                          in_specs=(seq,) * 4 + (PartitionSpec(),) * len(replicated), out_specs=seq,
                          axis_names=manual, check_vma=False)
  # Under jit always: eager shard_map with some axes left automatic fails in jax 0.10 (inlined when the
  # caller is jitted already).
  out = jax.jit(sharded)(q, k, v, mask, *replicated)
  return jnp.where(mask[:, :, None, None], out, 0).astype(q.dtype)
