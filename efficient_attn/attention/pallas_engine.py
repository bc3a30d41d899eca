"""Fused block-sparse flash attention in Pallas (Triton-style GPU kernels; interpret mode on CPU).

The same contract as the jnp engine (`engine.block_sparse_attention`): exact softmax attention of every
query block over the key blocks its layout row lists, returning `(out, lse)`. Three kernels:

  forward  grid (query block a, batch*head): walks the layout row idx[h, a, :] inside the kernel with
           the online softmax, writes out [Bq, d] and the log-sum-exp [Bq] (saved for the backward).
  dq       the same grid and walk: recomputes P from the saved lse, accumulates dQ.
  dk/dv    grid (key block c, batch*head): walks the *transposed* layout -- the query blocks that visit
           key block c, built from idx in JAX as a CSR list -- and accumulates dK and dV in registers.
           Every output block is written by exactly one program: no atomics, deterministic sums.

Before the kernels run, every (row, slot) of the layout is classified in JAX from the variant's own
predicate: *empty* (no visible pair: dropped from the walk), *full* (every pair visible: only the
key-padding mask is applied) or *partial* (the token mask is evaluated in the kernel). Each walk visits
its full slots first, then its partial ones, as two loops with per-row bounds, so no branch is needed.

Kernel-friendly shapes: block and head dims are zero-padded to powers of two >= 16 (what Triton's loads
and `tl.dot` accept); padded keys are masked and padded rows and columns are cut off afterwards, so the
numbers are unchanged. Predicates that read `aux` must index each aux leaf only as `leaf[i]` or
`leaf[j]` with the position arrays they are given (as `patterns.BandOrGlobal` does): the leaves are
gathered at the query and key positions in JAX, since Triton kernels have no gather.

On CPU the kernels run in Pallas interpret mode (chosen automatically); on GPU they lower through
Triton. TPU is not supported by these kernels (see docs/kernels.md).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from efficient_attn.attention.dense import MASK_VALUE

# Slot classes (see the module docstring).
EMPTY, FULL, PARTIAL = 0, 1, 2

# Triton launch parameters: the fastest choice depends on the block sizes and the GPU; these follow
# the usual flash-attention settings (more warps for 128 x 128 tiles) and are not tuned on hardware.
NUM_STAGES = 2


def kernel_size(n: int) -> int:
  """The padded size of a block or head dim: a power of two >= 16 (Triton tensors and `tl.dot`)."""
  return max(16, 1 << (int(n) - 1).bit_length())


def default_interpret() -> bool:
  """Interpret mode on CPU; compiled Triton kernels on GPU. Other backends raise."""
  backend = jax.default_backend()
  if backend == 'cpu':
    return True
  if backend in ('gpu', 'cuda', 'rocm'):
    return False
  raise ValueError(
      f'implementation="pallas" has Triton (GPU) kernels and an interpret mode for CPU; backend '
      f'{backend!r} is not supported. Use implementation="xla" (see docs/kernels.md).')


# --------------------------------------------------------------------------------------------------
# Layout preparation (plain JAX, O(layout) memory)
# --------------------------------------------------------------------------------------------------


def classify_slots(idx, valid, qpos, kpos, *, visible=None, aux=(), causal=False):
  """int32 [H, nq, K]: EMPTY, FULL or PARTIAL for every layout slot (key padding not included).

  Evaluates the predicate on the [Bq, Bk] pairs of every slot; the reductions fuse with the predicate,
  so no [.., Bq, Bk] array is kept. Rows of `qpos` == -1 (the engine's padding) count like real rows,
  so the result equals the jnp engine's on every row.
  """
  if visible is None and not causal:
    return jnp.where(valid, FULL, EMPTY).astype(jnp.int32)
  i = qpos[None, :, None, :, None]  # [1, nq, 1, Bq, 1]
  j = kpos[idx][:, :, :, None, :]  # [H, nq, K, 1, Bk]
  vis = jnp.ones((1, 1, 1, 1, 1), bool)
  if visible is not None:
    vis = vis & visible(i, j, aux)
  if causal:
    vis = vis & (j <= i)
  vis = jnp.broadcast_to(vis, idx.shape + (qpos.shape[1], kpos.shape[1]))
  some = jnp.any(vis, axis=(3, 4))
  every = jnp.all(vis, axis=(3, 4))
  return jnp.where(valid & some, jnp.where(every, FULL, PARTIAL), EMPTY).astype(jnp.int32)


def row_walk(idx, cls):
  """The forward/dq walk: per row its key blocks, full ones first, then partial ones.

  Returns slots int32 [H, nq, Kp] (Kp = K padded to a power of two; fillers after the live slots)
  and bounds int32 [H, nq, 2] = (number of full slots, number of full + partial slots).
  """
  rank = jnp.where(cls == FULL, 0, jnp.where(cls == PARTIAL, 1, 2))
  order = jnp.argsort(rank, axis=-1, stable=True)
  slots = jnp.take_along_axis(idx, order, axis=-1).astype(jnp.int32)
  k = idx.shape[-1]
  kp = 1 << (k - 1).bit_length()
  slots = jnp.pad(slots, ((0, 0), (0, 0), (0, kp - k)))
  n_full = jnp.sum(cls == FULL, axis=-1)
  n_live = n_full + jnp.sum(cls == PARTIAL, axis=-1)
  return slots, jnp.stack([n_full, n_live], axis=-1).astype(jnp.int32)


def column_walk(idx, cls, num_k_blocks: int):
  """The dk/dv walk: the transposed layout in CSR form, per key block the query blocks visiting it.

  Returns qblocks int32 [H, nq * K] (the query block of each live (row, slot), grouped by key block,
  full before partial within a group) and bounds int32 [H, nk, 4] = (start, start of the partial
  ones, end, 0) into it. Memory is that of the layout: no [nk, nq] table.
  """
  h, nq, k = idx.shape
  c = idx.reshape(h, nq * k)
  cls = cls.reshape(h, nq * k)
  key = jnp.where(cls == EMPTY, 2 * num_k_blocks, 2 * c + (cls == PARTIAL))
  order = jnp.argsort(key, axis=-1, stable=True)
  qblocks = (order // k).astype(jnp.int32)
  rows = jnp.arange(h)[:, None]
  count = lambda which: jnp.zeros((h, num_k_blocks), jnp.int32).at[rows, c].add(
      (cls == which).astype(jnp.int32))
  n_full, n_partial = count(FULL), count(PARTIAL)
  end = jnp.cumsum(n_full + n_partial, axis=-1)
  start = end - n_full - n_partial
  bounds = jnp.stack([start, start + n_full, end, jnp.zeros_like(end)], axis=-1)
  return qblocks, bounds.astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Everything static about one engine call (hashable: it keys the kernel cache)."""
  heads: int  # h
  layout_heads: int  # H: 1 (one layout for all heads) or h
  block_q: int  # padded Bq
  block_k: int  # padded Bk
  head_dim: int  # padded d
  scale: float  # 1 / sqrt(original head_dim)
  visible: Optional[Callable[..., Any]]
  aux_tree: Any  # treedef of aux
  aux_bool: tuple[bool, ...]  # per aux leaf: carried as int32, turned back into bool in the kernel
  causal: bool
  interpret: bool

  @property
  def masks_tokens(self) -> bool:
    """Whether partial slots can exist (without a predicate or causal every live slot is full)."""
    return self.visible is not None or self.causal

  @property
  def num_aux(self) -> int:
    return len(self.aux_bool)

  def layout_row(self, bh):
    """The layout row (head) of grid index bh = batch * heads + head."""
    return bh % self.heads if self.layout_heads > 1 else 0

  def batch(self, bh):
    return bh // self.heads

  def compiler_params(self):
    warps = 8 if self.block_q * self.block_k >= 128 * 128 else 4
    return plgpu.CompilerParams(num_warps=warps, num_stages=NUM_STAGES)


class _AtPositions:
  """An aux leaf as a predicate sees it inside a kernel: only `leaf[i]` and `leaf[j]` exist.

  `i` and `j` are the exact position arrays handed to the predicate; their values were gathered in
  JAX beforehand (Triton kernels cannot gather from an array).
  """

  def __init__(self, i, j, at_i, at_j):
    self._i, self._j, self._at_i, self._at_j = i, j, at_i, at_j

  def __getitem__(self, index):
    if index is self._i:
      return self._at_i
    if index is self._j:
      return self._at_j
    raise ValueError(
        'implementation="pallas": a predicate may read an aux leaf only as leaf[i] or leaf[j] with '
        'the position arrays it was called with; use implementation="xla" for other predicates.')

  def __getattr__(self, name):
    raise ValueError(
        f'implementation="pallas": a predicate may only index aux leaves (leaf[i], leaf[j]); it used '
        f'.{name}. Use implementation="xla" for other predicates.')


def _token_mask(cfg: KernelConfig, i, j, aux_i, aux_j):
  """The in-block mask of a partial slot: bool [Bq, Bk] (predicate and causal; not key padding).

  i: int32 [Bq, 1], j: int32 [1, Bk]; aux_i, aux_j: per aux leaf its values at i [Bq] and j [Bk].
  """
  vis = None
  if cfg.visible is not None:
    leaves = []
    for at_i, at_j, is_bool in zip(aux_i, aux_j, cfg.aux_bool):
      at_i, at_j = at_i[:, None], at_j[None, :]
      if is_bool:
        at_i, at_j = at_i != 0, at_j != 0
      leaves.append(_AtPositions(i, j, at_i, at_j))
    vis = cfg.visible(i, j, jax.tree.unflatten(cfg.aux_tree, leaves))
  if cfg.causal:
    vis = (j <= i) if vis is None else vis & (j <= i)
  return vis


def _dot(a, b, contract=(1, 0)):
  """f32 product of two tiles contracting a's dim contract[0] with b's dim contract[1]."""
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _forward_kernel(bounds_ref, slots_ref, qpos_ref, kpos_ref, kvalid_ref, q_ref, k_ref, v_ref,
                    *refs, cfg: KernelConfig):
  """One (query block, batch*head): online softmax over the row's key blocks."""
  auxq_refs, auxk_refs = refs[:cfg.num_aux], refs[cfg.num_aux:2 * cfg.num_aux]
  out_ref, lse_ref = refs[2 * cfg.num_aux:]
  bq, bk, d = cfg.block_q, cfg.block_k, cfg.head_dim
  q = q_ref[...]
  i = qpos_ref[...][:, None]
  aux_i = [r[...] for r in auxq_refs]

  def visit(t, carry, masked):
    m, l, acc = carry
    keys = pl.ds(slots_ref[t] * bk, bk)
    s = _dot(q, k_ref[keys, :], (1, 1)) * cfg.scale  # [Bq, Bk]
    vis = kvalid_ref[keys][None, :] != 0
    if masked:
      vis = vis & _token_mask(cfg, i, kpos_ref[keys][None, :], aux_i, [r[keys] for r in auxk_refs])
    s = jnp.where(vis, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(vis, jnp.exp(s - m_new[:, None]), 0.0)
    corr = jnp.exp(m - m_new)
    v = v_ref[keys, :]
    acc = corr[:, None] * acc + _dot(p.astype(v.dtype), v)
    return m_new, corr * l + jnp.sum(p, axis=1), acc

  carry = (jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32),
           jnp.zeros((bq, d), jnp.float32))
  n_full, n_live = bounds_ref[0], bounds_ref[1]
  carry = lax.fori_loop(0, n_full, functools.partial(visit, masked=False), carry)
  if cfg.masks_tokens:
    carry = lax.fori_loop(n_full, n_live, functools.partial(visit, masked=True), carry)
  m, l, acc = carry
  seen = l > 0
  safe_l = jnp.where(seen, l, 1.0)
  out_ref[...] = (acc / safe_l[:, None]).astype(out_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), MASK_VALUE)


def _dq_kernel(bounds_ref, slots_ref, qpos_ref, kpos_ref, kvalid_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, dd_ref, *refs, cfg: KernelConfig):
  """One (query block, batch*head): dQ over the row's key blocks, P recomputed from the saved lse."""
  auxq_refs, auxk_refs = refs[:cfg.num_aux], refs[cfg.num_aux:2 * cfg.num_aux]
  (dq_ref,) = refs[2 * cfg.num_aux:]
  bk = cfg.block_k
  q, do = q_ref[...], do_ref[...]
  lse, dd = lse_ref[...][:, None], dd_ref[...][:, None]
  i = qpos_ref[...][:, None]
  aux_i = [r[...] for r in auxq_refs]

  def visit(t, dq, masked):
    keys = pl.ds(slots_ref[t] * bk, bk)
    k, v = k_ref[keys, :], v_ref[keys, :]
    s = _dot(q, k, (1, 1)) * cfg.scale
    vis = kvalid_ref[keys][None, :] != 0
    if masked:
      vis = vis & _token_mask(cfg, i, kpos_ref[keys][None, :], aux_i, [r[keys] for r in auxk_refs])
    p = jnp.where(vis, jnp.exp(jnp.where(vis, s - lse, MASK_VALUE)), 0.0)
    ds = p * (_dot(do, v, (1, 1)) - dd) * cfg.scale
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jnp.zeros((cfg.block_q, cfg.head_dim), jnp.float32)
  n_full, n_live = bounds_ref[0], bounds_ref[1]
  dq = lax.fori_loop(0, n_full, functools.partial(visit, masked=False), dq)
  if cfg.masks_tokens:
    dq = lax.fori_loop(n_full, n_live, functools.partial(visit, masked=True), dq)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkdv_kernel(bounds_ref, qblocks_ref, qpos_ref, kpos_ref, kvalid_ref, q_ref, k_ref, v_ref, do_ref,
                 lse_ref, dd_ref, *refs, cfg: KernelConfig):
  """One (key block, batch*head): dK and dV over the query blocks that visit this key block."""
  auxq_refs, auxk_refs = refs[:cfg.num_aux], refs[cfg.num_aux:2 * cfg.num_aux]
  dk_ref, dv_ref = refs[2 * cfg.num_aux:]
  bq = cfg.block_q
  k, v = k_ref[...], v_ref[...]
  j = kpos_ref[...][None, :]
  key_ok = kvalid_ref[...][None, :] != 0
  aux_j = [r[...] for r in auxk_refs]

  def visit(e, carry, masked):
    dk, dv = carry
    rows = pl.ds(qblocks_ref[e] * bq, bq)
    q, do = q_ref[rows, :], do_ref[rows, :]
    s = _dot(q, k, (1, 1)) * cfg.scale  # [Bq, Bk]
    vis = key_ok
    if masked:
      vis = vis & _token_mask(cfg, qpos_ref[rows][:, None], j, [r[rows] for r in auxq_refs], aux_j)
    p = jnp.where(vis, jnp.exp(jnp.where(vis, s - lse_ref[rows][:, None], MASK_VALUE)), 0.0)
    dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
    ds = p * (_dot(do, v, (1, 1)) - dd_ref[rows][:, None]) * cfg.scale
    dk = dk + _dot(ds.astype(q.dtype), q, (0, 0))
    return dk, dv

  zeros = jnp.zeros((cfg.block_k, cfg.head_dim), jnp.float32)
  start, mid, end = bounds_ref[0], bounds_ref[1], bounds_ref[2]
  carry = lax.fori_loop(start, mid, functools.partial(visit, masked=False), (zeros, zeros))
  if cfg.masks_tokens:
    carry = lax.fori_loop(mid, end, functools.partial(visit, masked=True), carry)
  dk, dv = carry
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------------------------------
# pallas_call wrappers. Arrays: q/do/out [bh, nq*Bq, d]; k/v [bh, nk*Bk, d]; lse/dd [bh, nq*Bq];
# kvalid int32 [b, nk*Bk]; qpos [nq*Bq]; kpos [nk*Bk]; aux leaves gathered at qpos / kpos.
# --------------------------------------------------------------------------------------------------


def _row_specs(cfg: KernelConfig, nq: int, nk: int, kp: int, with_grads: bool):
  """in_specs of the forward / dq kernels, grid (a, bh): this program's query block, all key blocks."""
  bq, bk, d = cfg.block_q, cfg.block_k, cfg.head_dim
  q_block = pl.BlockSpec((None, bq, d), lambda a, bh: (bh, a, 0))
  k_all = pl.BlockSpec((None, nk * bk, d), lambda a, bh: (bh, 0, 0))
  q_pos = pl.BlockSpec((bq,), lambda a, bh: (a,))
  k_pos = pl.BlockSpec((nk * bk,), lambda a, bh: (0,))
  specs = [
      pl.BlockSpec((None, None, 2), lambda a, bh: (cfg.layout_row(bh), a, 0)),  # bounds
      pl.BlockSpec((None, None, kp), lambda a, bh: (cfg.layout_row(bh), a, 0)),  # slots
      q_pos, k_pos,
      pl.BlockSpec((None, nk * bk), lambda a, bh: (cfg.batch(bh), 0)),  # kvalid
      q_block, k_all, k_all,
  ]
  if with_grads:
    row = pl.BlockSpec((None, bq), lambda a, bh: (bh, a))
    specs += [q_block, row, row]  # do, lse, dd
  return specs + [q_pos] * cfg.num_aux + [k_pos] * cfg.num_aux


def _forward_call(cfg: KernelConfig, q, k, v, kvalid, qpos, kpos, aux_q, aux_k, slots, bounds):
  bh, n_q, d = q.shape
  nq, nk = n_q // cfg.block_q, k.shape[1] // cfg.block_k
  return pl.pallas_call(
      functools.partial(_forward_kernel, cfg=cfg),
      out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((bh, n_q), jnp.float32)),
      grid=(nq, bh),
      in_specs=_row_specs(cfg, nq, nk, slots.shape[-1], with_grads=False),
      out_specs=(pl.BlockSpec((None, cfg.block_q, d), lambda a, b: (b, a, 0)),
                 pl.BlockSpec((None, cfg.block_q), lambda a, b: (b, a))),
      compiler_params=cfg.compiler_params(),
      interpret=cfg.interpret,
      name='block_sparse_attention_fwd',
  )(bounds, slots, qpos, kpos, kvalid, q, k, v, *aux_q, *aux_k)


def _dq_call(cfg: KernelConfig, q, k, v, do, lse, dd, kvalid, qpos, kpos, aux_q, aux_k, slots,
             bounds):
  bh, n_q, d = q.shape
  nq, nk = n_q // cfg.block_q, k.shape[1] // cfg.block_k
  return pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(nq, bh),
      in_specs=_row_specs(cfg, nq, nk, slots.shape[-1], with_grads=True),
      out_specs=pl.BlockSpec((None, cfg.block_q, d), lambda a, b: (b, a, 0)),
      compiler_params=cfg.compiler_params(),
      interpret=cfg.interpret,
      name='block_sparse_attention_dq',
  )(bounds, slots, qpos, kpos, kvalid, q, k, v, do, lse, dd, *aux_q, *aux_k)


def _dkdv_call(cfg: KernelConfig, q, k, v, do, lse, dd, kvalid, qpos, kpos, aux_q, aux_k, qblocks,
               bounds):
  bh, n_q, d = q.shape
  bq, bk = cfg.block_q, cfg.block_k
  nk = k.shape[1] // bk
  q_all = pl.BlockSpec((None, n_q, d), lambda c, b: (b, 0, 0))
  k_block = pl.BlockSpec((None, bk, d), lambda c, b: (b, c, 0))
  row_all = pl.BlockSpec((None, n_q), lambda c, b: (b, 0))
  q_pos = pl.BlockSpec((n_q,), lambda c, b: (0,))
  k_pos = pl.BlockSpec((bk,), lambda c, b: (c,))
  in_specs = [
      pl.BlockSpec((None, None, 4), lambda c, b: (cfg.layout_row(b), c, 0)),  # bounds
      pl.BlockSpec((None, qblocks.shape[-1]), lambda c, b: (cfg.layout_row(b), 0)),  # qblocks
      q_pos, k_pos,
      pl.BlockSpec((None, bk), lambda c, b: (cfg.batch(b), c)),  # kvalid
      q_all, k_block, k_block, q_all, row_all, row_all,
  ] + [q_pos] * cfg.num_aux + [k_pos] * cfg.num_aux
  del bq
  return pl.pallas_call(
      functools.partial(_dkdv_kernel, cfg=cfg),
      out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
      grid=(nk, bh),
      in_specs=in_specs,
      out_specs=(k_block, k_block),
      compiler_params=cfg.compiler_params(),
      interpret=cfg.interpret,
      name='block_sparse_attention_dkdv',
  )(bounds, qblocks, qpos, kpos, kvalid, q, k, v, do, lse, dd, *aux_q, *aux_k)


def _zero_cotangent(x):
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return jnp.zeros(x.shape, jax.dtypes.float0)


@functools.lru_cache(maxsize=None)
def _fused(cfg: KernelConfig):
  """The differentiable kernel call for `cfg`: (q, k, v, *ints) -> (out, lse), custom VJP."""

  @jax.custom_vjp
  def run(q, k, v, kvalid, qpos, kpos, aux_q, aux_k, walks):
    slots, row_bounds, _, _ = walks
    return _forward_call(cfg, q, k, v, kvalid, qpos, kpos, aux_q, aux_k, slots, row_bounds)

  def fwd(q, k, v, kvalid, qpos, kpos, aux_q, aux_k, walks):
    slots, row_bounds, _, _ = walks
    out, lse = _forward_call(cfg, q, k, v, kvalid, qpos, kpos, aux_q, aux_k, slots, row_bounds)
    return (out, lse), (q, k, v, kvalid, qpos, kpos, aux_q, aux_k, walks, out, lse)

  def bwd(residuals, cotangents):
    q, k, v, kvalid, qpos, kpos, aux_q, aux_k, walks, out, lse = residuals
    dout, dlse = cotangents
    slots, row_bounds, qblocks, col_bounds = walks
    # D_i = dout_i . out_i is the softmax Jacobian's diagonal term; an lse cotangent enters with the
    # opposite sign (d lse / d s = P), so the kernels only need dd = D - dlse.
    dd = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - dlse
    dout = dout.astype(q.dtype)
    args = (kvalid, qpos, kpos, aux_q, aux_k)
    dq = _dq_call(cfg, q, k, v, dout, lse, dd, *args, slots, row_bounds)
    dk, dv = _dkdv_call(cfg, q, k, v, dout, lse, dd, *args, qblocks, col_bounds)
    zero = lambda tree: jax.tree.map(_zero_cotangent, tree)
    return (dq, dk, dv, zero(kvalid), zero(qpos), zero(kpos), zero(aux_q), zero(aux_k), zero(walks))

  run.defvjp(fwd, bwd)
  return run


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _check_shapes(qb, kb, vb, kvalid, qpos, kpos, idx, valid):
  if qb.ndim != 5 or kb.ndim != 5:
    raise ValueError(f'pallas engine: qb and kb must be [b, h, blocks, block, d], got {qb.shape} '
                     f'and {kb.shape}.')
  b, h, nq, bq, d = qb.shape
  if kb.shape != vb.shape or kb.shape[:2] != (b, h) or kb.shape[-1] != d:
    raise ValueError(f'pallas engine: kb and vb must be [{b}, {h}, nk, Bk, {d}] alike, got '
                     f'{kb.shape} and {vb.shape}.')
  nk, bk = kb.shape[2:4]
  expected = dict(kvalid=((b, nk, bk), kvalid), qpos=((nq, bq), qpos), kpos=((nk, bk), kpos))
  for name, (shape, x) in expected.items():
    if tuple(x.shape) != shape:
      raise ValueError(f'pallas engine: {name} must have shape {shape}, got {tuple(x.shape)}.')
  if idx.ndim != 3 or idx.shape[1] != nq or idx.shape[0] not in (1, h) or valid.shape != idx.shape:
    raise ValueError(f'pallas engine: idx and valid must be [1 or {h}, {nq}, K] alike, got '
                     f'{idx.shape} and {valid.shape}.')


def _pad_blocks(x, block: int, dim: int):
  """[b, h, n, B, d] -> [b * h, n * block, dim], zero padded in the block and the head dim."""
  b, h, n, bsz, d = x.shape
  x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, block - bsz), (0, dim - d)))
  return x.reshape(b * h, n * block, dim)


def block_sparse_attention(qb, kb, vb, *, kvalid, qpos, kpos, idx, valid,
                           visible: Optional[Callable[..., Any]] = None, aux=(), causal: bool = False,
                           interpret: Optional[bool] = None):
  """The fused-kernel twin of `engine.block_sparse_attention` (same arguments and results).

  Args:
    qb: [b, h, nq, Bq, d] query blocks.
    kb, vb: [b, h, nk, Bk, d] key/value blocks.
    kvalid: bool [b, nk, Bk], False for padded keys.
    qpos: int32 [nq, Bq], kpos: int32 [nk, Bk]: original positions (for `visible` and `causal`).
    idx: int32 [H, nq, K] key blocks per query block (H = 1 or h); valid: bool [H, nq, K]. Each key
      block at most once per row (see engine.dedupe_slots).
    visible: hashable predicate `visible(i, j, aux)` or None. Inside the kernels it may read an aux
      leaf only as `leaf[i]` / `leaf[j]`; aux leaves must be 1-D arrays indexed by position.
    aux: a pytree of such arrays.
    causal: also require j <= i.
    interpret: run the kernels in Pallas interpret mode (None: on CPU only).

  Returns:
    out [b, h, nq, Bq, d] in q's dtype (zeros where a query sees nothing) and lse float32
    [b, h, nq, Bq] (MASK_VALUE where a query sees nothing); differentiable in qb, kb, vb (and through
    lse), by the dq and dk/dv kernels.
  """
  _check_shapes(qb, kb, vb, kvalid, qpos, kpos, idx, valid)
  if interpret is None:
    interpret = default_interpret()
  b, h, nq, bq, d = qb.shape
  nk, bk = kb.shape[2:4]
  qpos, kpos = jnp.asarray(qpos, jnp.int32), jnp.asarray(kpos, jnp.int32)
  idx, valid = jnp.asarray(idx, jnp.int32), jnp.asarray(valid, bool)
  leaves, aux_tree = jax.tree.flatten(aux)
  leaves = [jnp.asarray(x) for x in leaves]
  for x in leaves:
    if x.ndim != 1:
      raise ValueError(f'pallas engine: aux leaves must be 1-D arrays indexed by position, got one '
                       f'of shape {x.shape}.')

  cls = classify_slots(idx, valid, qpos, kpos, visible=visible, aux=aux, causal=causal)
  slots, row_bounds = row_walk(idx, cls)
  qblocks, col_bounds = column_walk(idx, cls, nk)

  bq2, bk2, d2 = kernel_size(bq), kernel_size(bk), kernel_size(d)
  cfg = KernelConfig(heads=h, layout_heads=idx.shape[0], block_q=bq2, block_k=bk2, head_dim=d2,
                     scale=float(d) ** -0.5, visible=visible, aux_tree=aux_tree,
                     aux_bool=tuple(x.dtype == jnp.bool_ for x in leaves), causal=bool(causal),
                     interpret=bool(interpret))
  qpos_k = jnp.pad(qpos, ((0, 0), (0, bq2 - bq)), constant_values=-1).reshape(-1)
  kpos_k = jnp.pad(kpos, ((0, 0), (0, bk2 - bk)), constant_values=-1).reshape(-1)
  kvalid_k = jnp.pad(jnp.asarray(kvalid, jnp.int32), ((0, 0), (0, 0), (0, bk2 - bk)))
  carry = lambda x: x.astype(jnp.int32) if x.dtype == jnp.bool_ else x
  aux_q = tuple(carry(x[qpos_k]) for x in leaves)
  aux_k = tuple(carry(x[kpos_k]) for x in leaves)

  out, lse = _fused(cfg)(_pad_blocks(qb, bq2, d2), _pad_blocks(kb, bk2, d2), _pad_blocks(vb, bk2, d2),
                         kvalid_k.reshape(b, nk * bk2), qpos_k, kpos_k, aux_q, aux_k,
                         (slots, row_bounds, qblocks, col_bounds))
  out = out.reshape(b, h, nq, bq2, d2)[:, :, :, :bq, :d]
  lse = lse.reshape(b, h, nq, bq2)[:, :, :, :bq]
  return out, lse
