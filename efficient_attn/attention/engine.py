"""The shared block-sparse engine: exact attention over a list of key blocks per query block.

Every fixed-pattern variant is a *layout* for this engine:

  idx[H, nq, K]         for each query block, the K key blocks it visits (H = 1, or one row per head)
  slot_valid[H, nq, K]  False for filler slots (rows visiting fewer than K blocks)
  visible(i, j, aux)    the variant's token-level predicate on original positions (None: all pairs of the
                        listed blocks); the same predicate builds the variant's `dense_mask`, so the fast path
                        and the reference cannot drift apart.

The engine walks the slots with the online softmax (running max, running sum, rescaled accumulator), so
memory is O(n * keys visited per step), never O(n^2). Its backward is written by hand (flash-attention
style: recompute the scores per slot from the saved log-sum-exp, scatter-add the key/value gradients back
to their blocks), so nothing but q, k, v, out and lse is saved for the backward pass. Being a
`jax.custom_vjp`, it supports reverse mode only: `jax.jvp` (forward mode) raises JAX's TypeError.

Layouts must list each key block at most once per row (`dedupe_slots`): a block listed twice would count
its keys twice. Blocked arrays are [batch, heads, num_blocks, block, head_dim].
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

import numpy as np

from efficient_attn.attention import patterns as P
from efficient_attn.attention.blocks import (all_blocks_layout, band_layout, fit_block, from_blocks,
                                             lse_from_blocks, mask_to_blocks, pad_axis, positions,
                                             round_up, to_blocks, zero_cotangent)
from efficient_attn.attention.dense import MASK_VALUE

# Keys scored per scan step: large enough for efficient matmuls, small enough to bound the score buffer.
MAX_KEYS_PER_STEP = 1024


def slots_per_step(num_slots: int, key_block: int, max_keys: int = MAX_KEYS_PER_STEP) -> int:
  steps = max(1, math.ceil(num_slots * key_block / max_keys))
  return math.ceil(num_slots / steps)


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


def _merge_slots(x):
  """[b, h, nq, S, Bk, ...] -> [b, h, nq, S * Bk, ...]."""
  return x.reshape(x.shape[:3] + (-1,) + x.shape[5:])


def _step_scores(qb, kg, qpos, kpos, kvalid, idx_s, valid_s, aux, visible, causal, scale):
  """Scores and visibility of one step: s f32 [b, h, nq, Bq, S*Bk], vis bool broadcastable to it."""
  s = jnp.einsum('bhqid,bhqjd->bhqij', qb, kg, preferred_element_type=jnp.float32) * scale
  kpos_g = kpos[idx_s]  # [H, nq, S, Bk]
  kvalid_g = kvalid[:, idx_s]  # [b, H, nq, S, Bk]
  slot_ok = jnp.broadcast_to(valid_s[..., None], kpos_g.shape)
  j = kpos_g.reshape(kpos_g.shape[:2] + (1, -1))[None]  # [1, H, nq, 1, S*Bk]
  i = qpos[None, None, :, :, None]  # [1, 1, nq, Bq, 1]
  vis = (kvalid_g & slot_ok[None]).reshape(kvalid_g.shape[:3] + (1, -1))  # [b, H, nq, 1, S*Bk]
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


def _forward(static, qb, kb, vb, kvalid, qpos, kpos, idx, valid, aux):
  visible, causal, step = static
  scale = qb.shape[-1] ** -0.5
  idx_steps, valid_steps = _split_steps(idx, valid, step)

  def body(carry, xs):
    m, l, acc = carry
    idx_s, valid_s = xs
    kg = _merge_slots(_gather_blocks(kb, idx_s))
    vg = _merge_slots(_gather_blocks(vb, idx_s))
    s, vis = _step_scores(qb, kg, qpos, kpos, kvalid, idx_s, valid_s, aux, visible, causal, scale)
    m_new = jnp.maximum(m, jnp.max(jnp.where(vis, s, MASK_VALUE), axis=-1))
    p = jnp.where(vis, jnp.exp(jnp.where(vis, s, MASK_VALUE) - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    l = corr * l + jnp.sum(p, axis=-1)
    acc = corr[..., None] * acc + jnp.einsum(
        'bhqij,bhqjd->bhqid', p.astype(vb.dtype), vg, preferred_element_type=jnp.float32)
    return (m_new, l, acc), None

  # Carries built *like* the inputs, so they keep the inputs' sharding under an explicit mesh.
  row = qb[..., 0]
  init = (jnp.full_like(row, MASK_VALUE, jnp.float32), jnp.zeros_like(row, jnp.float32),
          jnp.zeros_like(qb, jnp.float32))
  (m, l, acc), _ = jax.lax.scan(body, init, (idx_steps, valid_steps))
  seen = l > 0
  out = (acc / jnp.where(seen, l, 1.0)[..., None]).astype(qb.dtype)
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), MASK_VALUE)
  return out, lse


def _backward(static, residuals, cotangents):
  visible, causal, step = static
  qb, kb, vb, kvalid, qpos, kpos, idx, valid, aux, out, lse = residuals
  dout, dlse = cotangents
  d = qb.shape[-1]
  scale = d ** -0.5
  dout = dout.astype(jnp.float32)
  # D_i = sum_j P_ij dP_ij = dout_i . out_i: the softmax Jacobian's diagonal correction.
  delta = jnp.sum(dout * out.astype(jnp.float32), axis=-1)
  idx_steps, valid_steps = _split_steps(idx, valid, step)

  def body(carry, xs):
    dq, dk, dv = carry
    idx_s, valid_s = xs
    kg_blocks = _gather_blocks(kb, idx_s)
    kg = _merge_slots(kg_blocks)
    vg = _merge_slots(_gather_blocks(vb, idx_s))
    s, vis = _step_scores(qb, kg, qpos, kpos, kvalid, idx_s, valid_s, aux, visible, causal, scale)
    p = jnp.where(vis, jnp.exp(jnp.where(vis, s - lse[..., None], MASK_VALUE)), 0.0)
    dv_s = jnp.einsum('bhqij,bhqid->bhqjd', p, dout)
    dp = jnp.einsum('bhqid,bhqjd->bhqij', dout, vg, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None] + dlse[..., None]) * scale
    dq = dq + jnp.einsum('bhqij,bhqjd->bhqid', ds, kg, preferred_element_type=jnp.float32)
    dk_s = jnp.einsum('bhqij,bhqid->bhqjd', ds, qb, preferred_element_type=jnp.float32)
    unmerge = lambda x: x.reshape(kg_blocks.shape)
    dk = _scatter_add_blocks(dk, idx_s, unmerge(dk_s))
    dv = _scatter_add_blocks(dv, idx_s, unmerge(dv_s))
    return (dq, dk, dv), None

  init = (jnp.zeros_like(qb, jnp.float32), jnp.zeros_like(kb, jnp.float32),
          jnp.zeros_like(vb, jnp.float32))
  (dq, dk, dv), _ = jax.lax.scan(body, init, (idx_steps, valid_steps))
  zero_aux = jax.tree.map(zero_cotangent, aux)
  return (dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), zero_cotangent(kvalid),
          zero_cotangent(qpos), zero_cotangent(kpos), zero_cotangent(idx), zero_cotangent(valid),
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


def block_sparse_attention(qb, kb, vb, *, kvalid, qpos, kpos, idx, valid,
                           visible: Optional[Callable[..., Any]] = None, aux=(), causal: bool = False,
                           step: Optional[int] = None, implementation: str = 'xla'):
  """Exact softmax attention of every query block over its listed key blocks.

  Args:
    qb: [b, h, nq, Bq, d] query blocks.
    kb, vb: [b, h, nk, Bk, d] key/value blocks (may be a different sequence than the queries).
    kvalid: bool [b, nk, Bk], False for padded keys.
    qpos: int32 [nq, Bq], kpos: int32 [nk, Bk]: original sequence positions (for `visible` and `causal`).
    idx: int32 [H, nq, K] key blocks per query block (H = 1 or h); valid: bool [H, nq, K].
    visible: hashable predicate `visible(i, j, aux) -> bool` on broadcast position arrays, or None.
    aux: a pytree of arrays the predicate reads.
    causal: also require j <= i.
    step: slots per scan step (default: about MAX_KEYS_PER_STEP keys per step).
    implementation: 'xla' (this module) or 'pallas' (the fused kernel in pallas_engine.py).

  Returns:
    out [b, h, nq, Bq, d] in q's dtype (zeros where a query sees nothing) and
    lse float32 [b, h, nq, Bq] (log-sum-exp of the visible scores, MASK_VALUE where none).
  """
  if implementation == 'pallas':
    from efficient_attn.attention import pallas_engine  # pylint: disable=g-import-not-at-top
    return pallas_engine.block_sparse_attention(qb, kb, vb, kvalid=kvalid, qpos=qpos, kpos=kpos,
                                                idx=idx, valid=valid, visible=visible, aux=aux,
                                                causal=causal)
  if implementation != 'xla':
    raise ValueError(f'implementation must be "xla" or "pallas", got {implementation!r}.')
  if step is None:
    step = slots_per_step(idx.shape[-1], kb.shape[3])
  return _engine((visible, bool(causal), int(step)))(qb, kb, vb, kvalid, qpos, kpos, idx, valid, aux)


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
    qblock, kblock: block sizes; layout: (idx, valid) over the blocked sequences, or a function of
      (num_q_blocks, num_k_blocks) returning it.
    global_q_blocks: static query block indices that visit every key block instead of their layout row.
    implementation: 'xla' (the jnp engine) or 'pallas' (the fused kernel), see engine.py.
  """
  nq_tokens = q.shape[1]
  qb, kb, vb = to_blocks(q, qblock), to_blocks(k, kblock), to_blocks(v, kblock)
  kvalid_b = mask_to_blocks(kvalid, kblock)
  qpos_b = pad_axis(qpos, 0, qb.shape[2] * qblock, -1).reshape(-1, qblock)
  kpos_b = pad_axis(kpos, 0, kb.shape[2] * kblock, -1).reshape(-1, kblock)
  idx, valid = layout(qb.shape[2], kb.shape[2]) if callable(layout) else layout
  common = dict(kvalid=kvalid_b, kpos=kpos_b, visible=visible, aux=aux, causal=causal,
                implementation=implementation)
  out, lse = block_sparse_attention(qb, kb, vb, qpos=qpos_b, idx=idx, valid=valid, step=step, **common)
  if global_q_blocks:
    g = np.asarray(global_q_blocks)
    g_idx, g_valid = all_blocks_layout(len(g), kb.shape[2])
    g_out, g_lse = block_sparse_attention(qb[:, :, g], kb, vb, qpos=qpos_b[g], idx=g_idx,
                                          valid=g_valid, **common)
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
  idx, valid = all_blocks_layout(1, kb.shape[2])

  @jax.checkpoint
  def one_chunk(args):
    q_chunk, q_pos = args  # [b, h, qc, d], [qc]
    out, lse = block_sparse_attention(q_chunk[:, :, None], kb, vb, kvalid=kvalid_b, qpos=q_pos[None],
                                      kpos=kpos_b, idx=idx, valid=valid, causal=causal, step=1,
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
                    kblock=block, layout=lambda nq, nk: band_layout(nq, reach, 0 if causal else reach),
                    visible=P.Band(window), implementation=implementation)
