"""The shared block-sparse engine: exact attention over a list of key blocks per query block.

Every fixed-pattern variant is a *layout* for this engine, in one of three forms:

  idx[H, nq, K]         for each query block, the K key blocks it visits (H = 1, or one row per head),
  slot_valid[H, nq, K]  False for filler slots (rows visiting fewer than K blocks): read by gathers;
  Shifts(offsets)       a static band, query block a visits key blocks a + o: read as shifted slices
                        of the zero-padded key blocks, gradients returned as shifted adds;
  all_blocks_layout     every query block visits every key block: each step's key blocks are one
                        slice shared by all query blocks (a single matmul), no gather.

  visible(i, j, aux)    the variant's token-level predicate on original positions (None: all pairs of
                        the listed blocks); the same predicate builds the variant's `dense_mask`, so
                        the fast path and the reference cannot drift apart.

The engine walks the slots in steps with the online softmax (running max, running sum, rescaled
accumulator) under `lax.scan`, so memory is O(n * keys visited per step), never O(n^2). Its backward
is written by hand (flash-attention style: recompute the scores per step from the saved log-sum-exp,
add the key/value gradients back to their blocks), so nothing but q, k, v, out and lse is saved for
the backward pass. Being a `jax.custom_vjp`, it supports reverse mode only: `jax.jvp` (forward mode)
raises JAX's TypeError.

Layouts must list each key block at most once per row (`dedupe_slots`): a block listed twice would
count its keys twice. Blocked arrays are [batch, heads, num_blocks, block, head_dim].
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

import numpy as np

from efficient_attn.attention import patterns as P
from efficient_attn.attention.blocks import (AllBlocks, Shifts, all_blocks_layout, band_shifts,
                                             fit_block, from_blocks, lse_from_blocks, mask_to_blocks,
                                             pad_axis, positions, round_up, to_blocks,
                                             zero_cotangent)
from efficient_attn.attention.dense import MASK_VALUE

# Keys scored per step: large enough for efficient matmuls, small enough to bound the score buffer.
# On CPU one 128-key block per step measured fastest and leanest (2-core x86, float32, bands and
# bigbird at 8K: the score tile stays in cache and the scan keeps one step's buffers alive); other
# backends keep 1024, which amortises a scan step's fixed cost.
KEYS_PER_STEP = {'cpu': 128}
DEFAULT_KEYS_PER_STEP = 1024


def max_keys_per_step() -> int:
  return KEYS_PER_STEP.get(jax.default_backend(), DEFAULT_KEYS_PER_STEP)


def slots_per_step(num_slots: int, key_block: int, max_keys: Optional[int] = None) -> int:
  """Slots per step of an index layout: steps of at most `max_keys` keys, as even as possible."""
  steps = max(1, math.ceil(num_slots * key_block / (max_keys or max_keys_per_step())))
  return math.ceil(num_slots / steps)


def shifts_per_step(num_shifts: int, key_block: int, max_keys: Optional[int] = None) -> int:
  """Shifts per step of a band: the largest divisor of `num_shifts` within max_keys (>= 1 block)."""
  limit = max(1, (max_keys or max_keys_per_step()) // key_block)
  return max(t for t in range(1, num_shifts + 1) if num_shifts % t == 0 and t <= limit)


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


def _gather_blocks(x, idx):
  """x [b, h, nk, ...], idx [H, nq, S] (H = 1 or h) -> [b, h, nq, S, ...]."""
  if idx.shape[0] == 1:
    return x[:, :, idx[0]]
  heads = jnp.arange(x.shape[1])[:, None, None]
  return x[:, heads, idx]


def _scatter_add_blocks(acc, idx, update):
  """Inverse of `_gather_blocks`: acc [b, h, nk, ...] += update [b, h, nq, S, ...] at idx."""
  if idx.shape[0] == 1:
    return acc.at[:, :, idx[0]].add(update)
  heads = jnp.arange(acc.shape[1])[:, None, None]
  return acc.at[:, heads, idx].add(update)


def _kv(kg):
  """The einsum subscripts of a step's keys: per query block [b, h, nq, S*Bk, d] or shared by all
  query blocks [b, h, S*Bk, d]."""
  return 'bhqjd' if kg.ndim == 5 else 'bhjd'


def _step_scores(qb, kg, qpos, kpos_g, kvalid_g, aux, visible, causal, scale):
  """Scores and visibility of one step: s f32 [b, h, nq, Bq, S*Bk], vis bool broadcastable to it.

  kg [b, h, nq or -, S*Bk, d]: the step's keys (see `_kv`); kpos_g int32 [H, nq or 1, S*Bk] their
  positions; kvalid_g bool [b, H, nq or 1, S*Bk], False for padded keys and filler slots.
  """
  s = jnp.einsum(f'bhqid,{_kv(kg)}->bhqij', qb, kg, preferred_element_type=jnp.float32) * scale
  j = kpos_g[None, :, :, None, :]  # [1, H, nq, 1, S*Bk]
  i = qpos[None, None, :, :, None]  # [1, 1, nq, Bq, 1]
  vis = kvalid_g[:, :, :, None, :]  # [b, H, nq, 1, S*Bk]
  if visible is not None:
    vis = vis & visible(i, j, aux)
  if causal:
    vis = vis & (j <= i)
  return s, vis


def _split_steps(idx, valid, step):
  """[H, nq, K] -> [K/step, H, nq, step], padding K with invalid slots."""
  h, nq, k = idx.shape
  kp = round_up(k, step)
  idx = pad_axis(idx, 2, kp, 0)
  valid = pad_axis(valid, 2, kp, False)
  split = lambda x: x.reshape(h, nq, kp // step, step).transpose(2, 0, 1, 3)
  return split(idx), split(valid)


class _Keys:
  """How a layout's key blocks are read per step: `load(xs)` gives (k, v [b, h, nq, S*Bk, d] or
  [b, h, S*Bk, d], kpos [H, nq or 1, S*Bk], kvalid [b, H, nq or 1, S*Bk]) of the step `xs`, `add` puts
  a step's key gradients back into an accumulator of `zeros()`'s shape, `finish` cuts it to [b, h, nk,
  Bk, d]. `loop` scans a step function over `self.steps`."""

  def loop(self, body, carry):
    return jax.lax.scan(lambda c, xs: (body(c, xs), None), carry, self.steps)[0]

  def zeros(self):
    return jnp.zeros_like(self.kb, jnp.float32)

  def finish(self, acc):
    return acc


class _Gathered(_Keys):
  """Key blocks listed by index: `load` gathers a step's slots, `add` scatter-adds their gradients."""

  def __init__(self, kb, vb, kvalid, kpos, idx, valid, step):
    self.kb, self.vb, self.kvalid, self.kpos = kb, vb, kvalid, kpos
    self.steps = _split_steps(idx, valid, step)

  def load(self, xs):
    idx_s, valid_s = xs
    kvalid_g = self.kvalid[:, idx_s] & valid_s[None, ..., None]  # [b, H, nq, S, Bk]
    merge = lambda x: x.reshape(x.shape[:3] + (-1,) + x.shape[5:])
    return (merge(_gather_blocks(self.kb, idx_s)), merge(_gather_blocks(self.vb, idx_s)),
            self.kpos[idx_s].reshape(idx_s.shape[:2] + (-1,)), merge(kvalid_g))

  def add(self, acc, xs, update):
    """acc [b, h, nk, Bk, d] += update [b, h, nq, S*Bk, d] at the step's slots."""
    idx_s, _ = xs
    split = update.shape[:3] + idx_s.shape[-1:] + (-1,) + update.shape[-1:]
    return _scatter_add_blocks(acc, idx_s, update.reshape(split))

class _Shifted(_Keys):
  """A static band: query block a visits key blocks a + o, o in `shifts` (those in range).

  A step's key blocks are shifted slices of the zero-padded key blocks (no gather) and their gradients
  go back as shifted adds (no scatter). The scan keeps one step's scores alive at a time.
  """

  def __init__(self, kb, vb, kvalid, kpos, shifts, step, nq):
    nk = kb.shape[2]
    self.lo = max(0, -min(shifts))
    self.nk, self.nq, self.step = nk, nq, step
    total = self.lo + max(nk, nq + max(shifts))

    def pad(x, axis, value=0):  # jnp.pad keeps x's sharding under an explicit mesh
      widths = [(0, 0)] * x.ndim
      widths[axis] = (self.lo, total - self.lo - x.shape[axis])
      return jnp.pad(x, widths, constant_values=value)

    self.kb, self.vb = pad(kb, 2), pad(vb, 2)
    self.kvalid, self.kpos = pad(kvalid, 1, False), pad(kpos, 0, -1)
    self.steps = jnp.asarray(np.asarray(shifts, np.int32).reshape(-1, step) + self.lo)

  def _window(self, x, axis, xs):
    """The blocks a + o of every query block a, slots concatenated along axis + 1."""
    parts = [jax.lax.dynamic_slice_in_dim(x, xs[t], self.nq, axis=axis) for t in range(self.step)]
    return parts[0] if self.step == 1 else jnp.concatenate(parts, axis=axis + 1)

  def load(self, xs):
    return (self._window(self.kb, 2, xs), self._window(self.vb, 2, xs),
            self._window(self.kpos, 0, xs)[None], self._window(self.kvalid, 1, xs)[:, None])

  def add(self, acc, xs, update):
    bk = update.shape[3] // self.step
    for t in range(self.step):
      part = jax.lax.slice_in_dim(update, t * bk, (t + 1) * bk, axis=3)
      acc = jax.lax.dynamic_update_slice_in_dim(
          acc, jax.lax.dynamic_slice_in_dim(acc, xs[t], self.nq, axis=2) + part, xs[t], axis=2)
    return acc

  def finish(self, acc):
    return jax.lax.slice_in_dim(acc, self.lo, self.lo + self.nk, axis=2)


class _Columns(_Keys):
  """Every query block visits every key block: a step's key blocks are a slice of the key blocks,
  shared by all query blocks (one matmul over all queries, no gather); gradients go back as slice
  updates. Key blocks are padded (masked) to a multiple of the step."""

  def __init__(self, kb, vb, kvalid, kpos, step):
    self.nk, self.step = kb.shape[2], step
    total = round_up(self.nk, step)
    self.kb, self.vb = pad_axis(kb, 2, total), pad_axis(vb, 2, total)
    self.kvalid, self.kpos = pad_axis(kvalid, 1, total, False), pad_axis(kpos, 0, total, -1)
    self.steps = jnp.arange(0, total, step, dtype=jnp.int32)

  def load(self, start):
    take = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, start, self.step, axis=axis)
    merge = lambda x, axis: x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
    kvalid = take(self.kvalid, 1)
    return (merge(take(self.kb, 2), 2), merge(take(self.vb, 2), 2),
            take(self.kpos, 0).reshape(1, 1, -1), kvalid.reshape(kvalid.shape[0], 1, 1, -1))

  def add(self, acc, start, update):
    """acc [b, h, nk, Bk, d] += update [b, h, S*Bk, d] at blocks start..start+S-1."""
    old = jax.lax.dynamic_slice_in_dim(acc, start, self.step, axis=2)
    return jax.lax.dynamic_update_slice_in_dim(acc, old + update.reshape(old.shape), start, axis=2)

  def finish(self, acc):
    return jax.lax.slice_in_dim(acc, 0, self.nk, axis=2)


def _keys(static, qb, kb, vb, kvalid, kpos, idx, valid):
  _, _, step, layout = static
  if isinstance(layout, Shifts):
    return _Shifted(kb, vb, kvalid, kpos, layout.offsets, step, qb.shape[2])
  if isinstance(layout, AllBlocks):
    return _Columns(kb, vb, kvalid, kpos, step)
  return _Gathered(kb, vb, kvalid, kpos, idx, valid, step)


def _forward(static, qb, kb, vb, kvalid, qpos, kpos, idx, valid, aux):
  visible, causal = static[:2]
  scale = qb.shape[-1] ** -0.5
  keys = _keys(static, qb, kb, vb, kvalid, kpos, idx, valid)

  def body(carry, xs):
    m, l, acc = carry
    kg, vg, kpos_g, kvalid_g = keys.load(xs)
    s, vis = _step_scores(qb, kg, qpos, kpos_g, kvalid_g, aux, visible, causal, scale)
    m_new = jnp.maximum(m, jnp.max(jnp.where(vis, s, MASK_VALUE), axis=-1))
    p = jnp.where(vis, jnp.exp(jnp.where(vis, s, MASK_VALUE) - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    l = corr * l + jnp.sum(p, axis=-1)
    acc = corr[..., None] * acc + jnp.einsum(
        f'bhqij,{_kv(vg)}->bhqid', p.astype(vb.dtype), vg, preferred_element_type=jnp.float32)
    return m_new, l, acc

  # Carries built *like* the inputs, so they keep the inputs' sharding under an explicit mesh.
  row = qb[..., 0]
  init = (jnp.full_like(row, MASK_VALUE, jnp.float32), jnp.zeros_like(row, jnp.float32),
          jnp.zeros_like(qb, jnp.float32))
  m, l, acc = keys.loop(body, init)
  seen = l > 0
  out = (acc / jnp.where(seen, l, 1.0)[..., None]).astype(qb.dtype)
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), MASK_VALUE)
  return out, lse


def _backward(static, residuals, cotangents):
  visible, causal = static[:2]
  qb, kb, vb, kvalid, qpos, kpos, idx, valid, aux, out, lse = residuals
  dout, dlse = cotangents
  d = qb.shape[-1]
  scale = d ** -0.5
  dout = dout.astype(jnp.float32)
  # D_i = sum_j P_ij dP_ij = dout_i . out_i: the softmax Jacobian's diagonal correction.
  delta = jnp.sum(dout * out.astype(jnp.float32), axis=-1)
  keys = _keys(static, qb, kb, vb, kvalid, kpos, idx, valid)

  def body(carry, xs):
    dq, dk, dv = carry
    kg, vg, kpos_g, kvalid_g = keys.load(xs)
    s, vis = _step_scores(qb, kg, qpos, kpos_g, kvalid_g, aux, visible, causal, scale)
    p = jnp.where(vis, jnp.exp(jnp.where(vis, s - lse[..., None], MASK_VALUE)), 0.0)
    kv = _kv(kg)
    dv_s = jnp.einsum(f'bhqij,bhqid->{kv}', p, dout)
    dp = jnp.einsum(f'bhqid,{kv}->bhqij', dout, vg, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None] + dlse[..., None]) * scale
    dq = dq + jnp.einsum(f'bhqij,{kv}->bhqid', ds, kg, preferred_element_type=jnp.float32)
    dk_s = jnp.einsum(f'bhqij,bhqid->{kv}', ds, qb, preferred_element_type=jnp.float32)
    return dq, keys.add(dk, xs, dk_s), keys.add(dv, xs, dv_s)

  init = (jnp.zeros_like(qb, jnp.float32), keys.zeros(), keys.zeros())
  dq, dk, dv = keys.loop(body, init)
  dk, dv = keys.finish(dk), keys.finish(dv)
  zero_aux = jax.tree.map(zero_cotangent, aux)
  return (dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), zero_cotangent(kvalid),
          zero_cotangent(qpos), zero_cotangent(kpos), jax.tree.map(zero_cotangent, idx),
          jax.tree.map(zero_cotangent, valid),
          zero_aux)


@functools.lru_cache(maxsize=None)
def _engine(static):
  @jax.custom_vjp
  def run(qb, kb, vb, kvalid, qpos, kpos, idx, valid, aux):
    return _forward(static, qb, kb, vb, kvalid, qpos, kpos, idx, valid, aux)

  def fwd(qb, kb, vb, kvalid, qpos, kpos, idx, valid, aux):
    out, lse = _forward(static, qb, kb, vb, kvalid, qpos, kpos, idx, valid, aux)
    return (out, lse), (qb, kb, vb, kvalid, qpos, kpos, idx, valid, aux, out, lse)

  run.defvjp(fwd, functools.partial(_backward, static))
  return run


def auto_implementation() -> str:
  """The engine 'auto' picks on the default backend: the jnp engine until a fused kernel is proven."""
  return 'xla'


def block_sparse_attention(qb, kb, vb, *, kvalid, qpos, kpos, idx=None, valid=None, layout=None,
                           visible: Optional[Callable[..., Any]] = None, aux=(), causal: bool = False,
                           step: Optional[int] = None, implementation: str = 'xla'):
  """Exact softmax attention of every query block over its listed key blocks.

  Args:
    qb: [b, h, nq, Bq, d] query blocks.
    kb, vb: [b, h, nk, Bk, d] key/value blocks (may be a different sequence than the queries).
    kvalid: bool [b, nk, Bk], False for padded keys.
    qpos: int32 [nq, Bq], kpos: int32 [nk, Bk]: original sequence positions (for `visible` and `causal`).
    idx: int32 [H, nq, K] key blocks per query block (H = 1 or h); valid: bool [H, nq, K].
    layout: instead of idx/valid, a static layout from blocks.py: `Shifts` (a band, read as shifted
      slices of the key blocks) or `all_blocks_layout` (read as slices shared by all query blocks).
    visible: hashable predicate `visible(i, j, aux) -> bool` on broadcast position arrays, or None.
    aux: a pytree of arrays the predicate reads.
    causal: also require j <= i.
    step: slots (or shifts) per step (default: about `max_keys_per_step()` keys per step).
    implementation: 'xla' (this module) or 'pallas' (the fused kernel in pallas_engine.py).

  Returns:
    out [b, h, nq, Bq, d] in q's dtype (zeros where a query sees nothing) and
    lse float32 [b, h, nq, Bq] (log-sum-exp of the visible scores, MASK_VALUE where none).
  """
  if (layout is None) == (idx is None or valid is None):
    raise ValueError('block_sparse_attention: pass either idx and valid, or a static layout.')
  if layout is not None and not isinstance(layout, (Shifts, AllBlocks)):
    raise ValueError(f'block_sparse_attention: layout must be a blocks.Shifts or '
                     f'blocks.all_blocks_layout, got {layout!r}.')
  if implementation == 'pallas':
    from efficient_attn.attention import pallas_engine  # pylint: disable=g-import-not-at-top
    if layout is not None:
      idx, valid = layout(qb.shape[2], kb.shape[2])
    return pallas_engine.block_sparse_attention(qb, kb, vb, kvalid=kvalid, qpos=qpos, kpos=kpos,
                                                idx=idx, valid=valid, visible=visible, aux=aux,
                                                causal=causal)
  if implementation != 'xla':
    raise ValueError(f'implementation must be "xla" or "pallas", got {implementation!r}.')
  if isinstance(layout, Shifts):
    step = shifts_per_step(len(layout.offsets), kb.shape[3]) if step is None else step
    if len(layout.offsets) % step:
      raise ValueError(f'block_sparse_attention: step ({step}) must divide the '
                       f'{len(layout.offsets)} shifts.')
  elif step is None:
    step = slots_per_step(kb.shape[2] if layout is not None else idx.shape[-1], kb.shape[3])
  if layout is not None:
    idx = valid = ()
  run = _engine((visible, bool(causal), int(step), layout))
  return run(qb, kb, vb, kvalid, qpos, kpos, idx, valid, aux)


# --------------------------------------------------------------------------------------------------
# The engine on whole sequences
# --------------------------------------------------------------------------------------------------


def run_engine(q, k, v, kvalid, *, qpos, kpos, causal, qblock, kblock, layout, visible=None, aux=(),
               global_q_blocks=(), step=None, implementation='xla'):
  """Runs the block engine on sequences and returns (out [b, nq, h, d], lse [b, nq, h]).

  Args:
    q: [b, nq, h, d]; k, v: [b, nk, h, d] (the key sequence may differ from the query sequence).
    kvalid: bool [b, nk], False for padded keys.
    qpos, kpos: int32 [nq], [nk]: original positions for `visible` and `causal`.
    qblock, kblock: block sizes; layout: (idx, valid) over the blocked sequences, a function of
      (num_q_blocks, num_k_blocks) returning it, or a static layout (`Shifts`, `all_blocks_layout`).
    global_q_blocks: static query block indices that visit every key block instead of their layout row.
    implementation: 'xla' (the jnp engine) or 'pallas' (the fused kernel), see engine.py.
  """
  nq_tokens = q.shape[1]
  qb, kb, vb = to_blocks(q, qblock), to_blocks(k, kblock), to_blocks(v, kblock)
  kvalid_b = mask_to_blocks(kvalid, kblock)
  qpos_b = pad_axis(qpos, 0, qb.shape[2] * qblock, -1).reshape(-1, qblock)
  kpos_b = pad_axis(kpos, 0, kb.shape[2] * kblock, -1).reshape(-1, kblock)
  common = dict(kvalid=kvalid_b, kpos=kpos_b, visible=visible, aux=aux, causal=causal,
                implementation=implementation)
  if isinstance(layout, (Shifts, AllBlocks)):
    rows = dict(layout=layout)
  else:
    idx, valid = layout(qb.shape[2], kb.shape[2]) if callable(layout) else layout
    rows = dict(idx=idx, valid=valid)
  out, lse = block_sparse_attention(qb, kb, vb, qpos=qpos_b, step=step, **rows, **common)
  if global_q_blocks:
    g = np.asarray(global_q_blocks)
    g_out, g_lse = block_sparse_attention(qb[:, :, g], kb, vb, qpos=qpos_b[g],
                                          layout=all_blocks_layout, **common)
    # Put the global rows in place with a static gather (a scatter's output sharding is ambiguous
    # under an explicit mesh): block a reads row a of `out`, or its row in `g_out` if a is global.
    rows = np.arange(qb.shape[2])
    rows[g] = qb.shape[2] + np.arange(len(g))
    out = jnp.concatenate([out, g_out], axis=2)[:, :, rows]
    lse = jnp.concatenate([lse, g_lse], axis=2)[:, :, rows]
  return from_blocks(out, nq_tokens), lse_from_blocks(lse, nq_tokens)


def query_chunked_attention(q, k, v, kvalid, *, qpos, kpos, causal, query_chunk, key_chunk,
                            implementation='xla'):
  """Exact attention of every query over every key, one query chunk at a time: (out, lse).

  `lax.map` over query chunks (each under `jax.checkpoint`); inside, the block engine's online softmax
  over key chunks. Lengths that are not multiples of the chunks are padded and masked, never clamped.
  Shapes as in `run_engine`; memory O(query_chunk * key_chunk) per step.
  """
  nq_tokens = q.shape[1]
  qc, kc = fit_block(nq_tokens, query_chunk), fit_block(k.shape[1], key_chunk)
  kb, vb, kvalid_b = to_blocks(k, kc), to_blocks(v, kc), mask_to_blocks(kvalid, kc)
  kpos_b = pad_axis(kpos, 0, kb.shape[2] * kc, -1).reshape(-1, kc)
  qb = to_blocks(q, qc)
  qpos_b = pad_axis(qpos, 0, qb.shape[2] * qc, -1).reshape(-1, qc)

  @jax.checkpoint
  def one_chunk(args):
    q_chunk, q_pos = args  # [b, h, qc, d], [qc]
    out, lse = block_sparse_attention(q_chunk[:, :, None], kb, vb, kvalid=kvalid_b, qpos=q_pos[None],
                                      kpos=kpos_b, layout=all_blocks_layout, causal=causal, step=1,
                                      implementation=implementation)
    return out[:, :, 0], lse[:, :, 0]

  out, lse = jax.lax.map(one_chunk, (jnp.moveaxis(qb, 2, 0), qpos_b))  # [nq, b, h, qc, ...]
  return (from_blocks(jnp.moveaxis(out, 0, 2), nq_tokens),
          lse_from_blocks(jnp.moveaxis(lse, 0, 2), nq_tokens))


def band_attention(q, k, v, padding_mask, causal, *, window, block, implementation='xla'):
  """Local attention abs(i - j) <= window over one sequence: (out, lse)."""
  n = q.shape[1]
  block = fit_block(n, block)
  reach = -(-window // block)
  pos = positions(n)
  return run_engine(q, k, v, padding_mask, qpos=pos, kpos=pos, causal=causal, qblock=block,
                    kblock=block, layout=band_shifts(reach, 0 if causal else reach),
                    visible=P.Band(window), implementation=implementation)
