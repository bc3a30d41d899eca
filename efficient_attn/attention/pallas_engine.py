"""Fused block-sparse flash attention in Pallas: Triton-style GPU kernels, interpret mode on CPU.

The twin of the jnp engine (`engine.block_sparse_attention`): the same arguments and the same results,
`(out, lse)`, exact softmax attention of every query block over the key blocks its layout row lists.
Four kernels, on tiles of at most MAX_TILE rows / keys (larger layout blocks are split into tiles),
each grid flattened to one axis (see _flat_grid):

  classify  grid (query tile, layout row): labels every slot of the layout EMPTY (no visible pair:
            dropped from every walk), FULL (every pair visible: only key padding is masked) or
            PARTIAL (the token mask is evaluated), with the same mask code the other kernels use.
  forward   grid (query tile, batch*head): walks the row's key tiles -- its FULL slots, then its
            PARTIAL ones, two loops with per-row bounds, so no branch -- with the online softmax;
            writes out and the log-sum-exp (saved for the backward).
  dq        the same grid and walk: recomputes P from the saved lse and accumulates dQ.
  dk/dv     grid (key tile, batch*head): walks the *transposed* layout -- the query tiles that visit
            this key tile, a CSR list built from idx in JAX -- and accumulates dK and dV in registers.
            Each output tile has exactly one writer: no atomics, deterministic sums, O(layout) memory.

The layout is walked from a loaded index array (`slots[t]`, a scalar load per step), so per-head
layouts (bigbird) and data-dependent ones (random blocks drawn under jit) need no recompilation.
Shapes are made kernel-friendly: block and head dims are zero-padded to powers of two >= 16 (what
Triton's loads and `tl.dot` accept); padded keys are masked, padded rows and columns are cut off, so
the numbers are unchanged. A predicate that reads `aux` may index each aux leaf only as `leaf[i]` or
`leaf[j]` with the position arrays it is given (as `patterns.BandOrGlobal` does): Triton kernels have
no gather, so the leaves are gathered at the query and key positions in JAX beforehand.

On CPU the kernels run in Pallas interpret mode (chosen automatically); on GPU they are compiled by
Triton. Other backends (TPU) are refused with a clear error: see docs/kernels.md.
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

from efficient_attn.attention.blocks import zero_cotangent
from efficient_attn.attention.dense import MASK_VALUE

# Slot classes.
EMPTY, FULL, PARTIAL = 0, 1, 2

# Largest tile a kernel program owns: larger layout blocks are split into tiles of this many rows or
# keys. Inside a tile the kernels step over keys (forward, dq) or rows (dk/dv) in chunks of STEP, so
# the f32 score chunk a program holds is at most MAX_TILE x STEP. These and the Triton launch
# parameters below follow common flash-attention settings; they are NOT tuned on a GPU yet.
MAX_TILE = 128
STEP = 64
NUM_STAGES = 2


def kernel_size(n: int) -> int:
  """The padded size of a block or head dim: a power of two >= 16 (Triton tensors and `tl.dot`)."""
  return max(16, 1 << (int(n) - 1).bit_length())


def tiling(block: int) -> tuple[int, int]:
  """(tile, tiles per block) for a layout block of `block` positions padded to kernel_size."""
  padded = kernel_size(block)
  tile = min(padded, MAX_TILE)
  return tile, padded // tile


def default_interpret() -> bool:
  """Interpret mode on CPU, compiled Triton kernels on GPU; other backends raise ValueError."""
  backend = jax.default_backend()
  if backend == 'cpu':
    return True
  if backend in ('gpu', 'cuda', 'rocm'):
    return False
  raise ValueError(
      f'implementation="pallas" has Triton (GPU) kernels and an interpret mode for CPU; backend '
      f'{backend!r} is not supported. Use implementation="xla" (see docs/kernels.md).')


# --------------------------------------------------------------------------------------------------
# Walks: the layout reordered for the kernels (plain JAX, O(layout) memory)
# --------------------------------------------------------------------------------------------------


def row_walk(idx, cls):
  """The forward / dq walk of every row: its FULL key tiles first, then its PARTIAL ones.

  Args:
    idx: int32 [H, nq, K] key tiles per query tile; cls: int32 [H, nq, K] their classes.

  Returns:
    slots int32 [H, nq, K] (the live slots first, fillers after them) and bounds int32 [H, nq, 2] =
    (number of FULL slots, number of FULL + PARTIAL slots).
  """
  rank = jnp.where(cls == FULL, 0, jnp.where(cls == PARTIAL, 1, 2))
  order = jnp.argsort(rank, axis=-1, stable=True)
  slots = jnp.take_along_axis(idx, order, axis=-1).astype(jnp.int32)
  n_full = jnp.sum(cls == FULL, axis=-1)
  n_live = n_full + jnp.sum(cls == PARTIAL, axis=-1)
  return slots, jnp.stack([n_full, n_live], axis=-1).astype(jnp.int32)


def column_walk(idx, cls, num_k_tiles: int):
  """The dk/dv walk: the transposed layout in CSR form, per key tile the query tiles that visit it.

  Args:
    idx: int32 [H, nq, K] key tiles per query tile; cls: int32 [H, nq, K] their classes.
    num_k_tiles: nk.

  Returns:
    qtiles int32 [H, nq * K]: the query tile of every live (row, slot), grouped by key tile, FULL
    before PARTIAL within a group; bounds int32 [H, nk, 4] = (start, start of the PARTIAL ones, end,
    0) of each key tile's group. No [nk, nq] table: memory is that of the layout.
  """
  h, nq, k = idx.shape
  c = idx.reshape(h, nq * k)
  cls = cls.reshape(h, nq * k)
  key = jnp.where(cls == EMPTY, 2 * num_k_tiles, 2 * c + (cls == PARTIAL))
  order = jnp.argsort(key, axis=-1, stable=True)
  qtiles = (order // k).astype(jnp.int32)
  rows = jnp.arange(h)[:, None]
  count = lambda which: jnp.zeros((h, num_k_tiles), jnp.int32).at[rows, c].add(
      (cls == which).astype(jnp.int32))
  n_full, n_partial = count(FULL), count(PARTIAL)
  end = jnp.cumsum(n_full + n_partial, axis=-1)
  start = end - n_full - n_partial
  bounds = jnp.stack([start, start + n_full, end, jnp.zeros_like(end)], axis=-1)
  return qtiles, bounds.astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# Kernels. Refs: q/do/out [nq*Tq, d] and k/v [nk*Tk, d] of one batch*head; lse/dd [nq*Tq];
# kvalid int32 [nk*Tk] of its batch element; qpos [nq*Tq]; kpos [nk*Tk]; aux leaves at qpos / kpos.
# A ref of one tile (the program's own) holds [Tq, ...] or [Tk, ...] instead.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Everything static about one engine call (hashable: it keys the kernel cache)."""
  heads: int  # h
  layout_heads: int  # H: 1 (one layout for all heads) or h
  block_q: int  # query tile Tq
  block_k: int  # key tile Tk
  step_q: int  # rows per step of the dk/dv walk (divides Tq)
  step_k: int  # keys per step of the forward and dq walks (divides Tk)
  head_dim: int  # padded d
  scale: float  # 1 / sqrt(original head_dim)
  visible: Optional[Callable[..., Any]]
  aux_tree: Any  # treedef of aux
  aux_bool: tuple[bool, ...]  # per aux leaf: carried as int32, turned back into bool in the kernel
  causal: bool
  interpret: bool

  @property
  def masks_tokens(self) -> bool:
    """Whether PARTIAL slots can exist (with neither a predicate nor causal every live slot is FULL)."""
    return self.visible is not None or self.causal

  @property
  def num_aux(self) -> int:
    return len(self.aux_bool)

  def layout_row(self, bh):
    """The layout row of grid index bh = batch * heads + head."""
    return bh % self.heads if self.layout_heads > 1 else 0

  def batch(self, bh):
    return bh // self.heads

  def compiler_params(self, rows: int, cols: int):
    """Triton launch parameters for a program whose score chunk is rows x cols."""
    return plgpu.CompilerParams(num_warps=8 if rows * cols > 128 * 64 else 4, num_stages=NUM_STAGES)


class _AtPositions:
  """An aux leaf as a predicate sees it inside a kernel: only `leaf[i]` and `leaf[j]` exist.

  `i` and `j` are the very position arrays handed to the predicate; the values at them were gathered
  in JAX beforehand (Triton kernels cannot gather from an array).
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
  """The mask of a PARTIAL slot: bool [rows, keys] (predicate and causal; not key padding).

  i: int32 [rows, 1], j: int32 [1, keys]; aux_i, aux_j: per aux leaf its values at i [rows] and at
  j [keys]. Returns None when there is nothing to mask.
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
  """f32 product of two tiles, contracting a's dim contract[0] with b's dim contract[1]."""
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _split_refs(cfg: KernelConfig, refs):
  """(aux refs at query positions, aux refs at key positions, output refs)."""
  n = cfg.num_aux
  return refs[:n], refs[n:2 * n], refs[2 * n:]


def _walk(cfg: KernelConfig, visit, lo_mid_hi, carry):
  """Runs visit(t, carry, masked) over the FULL slots [lo, mid), then the PARTIAL ones [mid, hi)."""
  lo, mid, hi = lo_mid_hi
  carry = lax.fori_loop(lo, mid, functools.partial(visit, masked=False), carry)
  if cfg.masks_tokens:
    carry = lax.fori_loop(mid, hi, functools.partial(visit, masked=True), carry)
  return carry


def _classify_kernel(idx_ref, valid_ref, qpos_ref, kpos_ref, qreal_ref, kreal_ref, *refs,
                     cfg: KernelConfig):
  """One (query tile, layout row): EMPTY / FULL / PARTIAL for each of its slots.

  Only the caller's rows and keys count (qreal / kreal), not the kernel padding. Key padding is left
  out: it differs between batch elements, and the kernels mask it on every slot.
  """
  auxq_refs, auxk_refs, (cls_ref,) = _split_refs(cfg, refs)
  bk = cfg.block_k
  num_slots = cls_ref.shape[0]
  i = qpos_ref[...][:, None]
  aux_i = [r[...] for r in auxq_refs]
  row_real = qreal_ref[...][:, None] != 0
  slot_ids = jnp.arange(num_slots)

  def visit(t, classes):
    keys = pl.ds(idx_ref[t] * bk, bk)
    region = row_real & (kreal_ref[keys][None, :] != 0)
    vis = _token_mask(cfg, i, kpos_ref[keys][None, :], aux_i, [r[keys] for r in auxk_refs])
    count = jnp.sum(jnp.sum(jnp.where(vis & region, 1, 0), axis=1))
    size = jnp.sum(jnp.sum(jnp.where(region, 1, 0), axis=1))
    cls = jnp.where(count == size, FULL, jnp.where(count > 0, PARTIAL, EMPTY))
    cls = jnp.where((valid_ref[t] != 0) & (size > 0), cls, EMPTY)
    return jnp.where(slot_ids == t, cls, classes)

  cls_ref[...] = lax.fori_loop(0, num_slots, visit, jnp.zeros((num_slots,), jnp.int32))


def _forward_kernel(bounds_ref, slots_ref, qpos_ref, kpos_ref, kvalid_ref, q_ref, k_ref, v_ref,
                    *refs, cfg: KernelConfig):
  """One (query tile, batch*head): online softmax over the key tiles of its row."""
  auxq_refs, auxk_refs, (out_ref, lse_ref) = _split_refs(cfg, refs)
  bq, sk = cfg.block_q, cfg.step_k
  q = q_ref[...]
  i = qpos_ref[...][:, None]
  aux_i = [r[...] for r in auxq_refs]

  def visit(t, carry, masked):
    for u in range(cfg.block_k // sk):  # static steps through the key tile
      m, l, acc = carry
      keys = pl.ds(slots_ref[t] * cfg.block_k + u * sk, sk)
      s = _dot(q, k_ref[keys, :], (1, 1)) * cfg.scale  # [Tq, sk]
      vis = kvalid_ref[keys][None, :] != 0
      if masked:
        vis = vis & _token_mask(cfg, i, kpos_ref[keys][None, :], aux_i, [r[keys] for r in auxk_refs])
      s = jnp.where(vis, s, MASK_VALUE)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      p = jnp.where(vis, jnp.exp(s - m_new[:, None]), 0.0)
      corr = jnp.exp(m - m_new)
      v = v_ref[keys, :]
      carry = (m_new, corr * l + jnp.sum(p, axis=1),
               corr[:, None] * acc + _dot(p.astype(v.dtype), v))
    return carry

  carry = (jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32),
           jnp.zeros((bq, cfg.head_dim), jnp.float32))
  m, l, acc = _walk(cfg, visit, (0, bounds_ref[0], bounds_ref[1]), carry)
  seen = l > 0
  safe_l = jnp.where(seen, l, 1.0)
  out_ref[...] = (acc / safe_l[:, None]).astype(out_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), MASK_VALUE)


def _dq_kernel(bounds_ref, slots_ref, qpos_ref, kpos_ref, kvalid_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, dd_ref, *refs, cfg: KernelConfig):
  """One (query tile, batch*head): dQ over the key tiles of its row, P recomputed from the lse."""
  auxq_refs, auxk_refs, (dq_ref,) = _split_refs(cfg, refs)
  sk = cfg.step_k
  q, do = q_ref[...], do_ref[...]
  lse, dd = lse_ref[...][:, None], dd_ref[...][:, None]
  i = qpos_ref[...][:, None]
  aux_i = [r[...] for r in auxq_refs]

  def visit(t, dq, masked):
    for u in range(cfg.block_k // sk):
      keys = pl.ds(slots_ref[t] * cfg.block_k + u * sk, sk)
      k, v = k_ref[keys, :], v_ref[keys, :]
      s = _dot(q, k, (1, 1)) * cfg.scale
      vis = kvalid_ref[keys][None, :] != 0
      if masked:
        vis = vis & _token_mask(cfg, i, kpos_ref[keys][None, :], aux_i, [r[keys] for r in auxk_refs])
      p = jnp.where(vis, jnp.exp(jnp.where(vis, s - lse, MASK_VALUE)), 0.0)
      ds = p * (_dot(do, v, (1, 1)) - dd) * cfg.scale
      dq = dq + _dot(ds.astype(k.dtype), k)
    return dq

  dq = jnp.zeros((cfg.block_q, cfg.head_dim), jnp.float32)
  dq = _walk(cfg, visit, (0, bounds_ref[0], bounds_ref[1]), dq)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkdv_kernel(bounds_ref, qtiles_ref, qpos_ref, kpos_ref, kvalid_ref, q_ref, k_ref, v_ref, do_ref,
                 lse_ref, dd_ref, *refs, cfg: KernelConfig):
  """One (key tile, batch*head): dK and dV over the query tiles that visit this key tile."""
  auxq_refs, auxk_refs, (dk_ref, dv_ref) = _split_refs(cfg, refs)
  sq = cfg.step_q
  k, v = k_ref[...], v_ref[...]
  j = kpos_ref[...][None, :]
  key_ok = kvalid_ref[...][None, :] != 0
  aux_j = [r[...] for r in auxk_refs]

  def visit(e, carry, masked):
    for u in range(cfg.block_q // sq):  # static steps through the query tile
      dk, dv = carry
      rows = pl.ds(qtiles_ref[e] * cfg.block_q + u * sq, sq)
      q, do = q_ref[rows, :], do_ref[rows, :]
      s = _dot(q, k, (1, 1)) * cfg.scale  # [sq, Tk]
      vis = key_ok
      if masked:
        vis = vis & _token_mask(cfg, qpos_ref[rows][:, None], j, [r[rows] for r in auxq_refs], aux_j)
      p = jnp.where(vis, jnp.exp(jnp.where(vis, s - lse_ref[rows][:, None], MASK_VALUE)), 0.0)
      ds = p * (_dot(do, v, (1, 1)) - dd_ref[rows][:, None]) * cfg.scale
      carry = (dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv + _dot(p.astype(do.dtype), do, (0, 0)))
    return carry

  zeros = jnp.zeros((cfg.block_k, cfg.head_dim), jnp.float32)
  dk, dv = _walk(cfg, visit, (bounds_ref[0], bounds_ref[1], bounds_ref[2]), (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------------------------------
# pallas_call wrappers. Arrays: q/do/out [bh, nq*Tq, d]; k/v [bh, nk*Tk, d]; lse/dd [bh, nq*Tq];
# kvalid int32 [b, nk*Tk]; qpos [nq*Tq]; kpos [nk*Tk]; aux leaves gathered at qpos / kpos.
# --------------------------------------------------------------------------------------------------


def _flat_grid(num_fast: int, num_slow: int):
  """A 1-D grid over (fast, slow) pairs and a BlockSpec maker whose index maps take (fast, slow).

  One grid axis (CUDA's x, up to 2**31 - 1 programs) lifts the 65535 limit of the others, which
  batch * heads can exceed (strided attention folds the stride into the batch); fast-varying tiles
  keep neighbouring programs on neighbouring tiles of one head, which share key tiles in L2.
  """

  def spec(block_shape, index_map):
    return pl.BlockSpec(block_shape, lambda g: index_map(g % num_fast, g // num_fast))

  return (num_fast * num_slow,), spec


def classify_slots(cfg: KernelConfig, idx, valid, qpos, kpos, aux_q, aux_k, qreal, kreal):
  """int32 [H, nq, K]: EMPTY, FULL or PARTIAL for every slot of a tile layout (key padding excluded).

  A kernel over (query tile, layout row) evaluates the token mask pair by pair in registers, so
  nothing of size [.., Tq, Tk] reaches memory, and uses the very mask code of the other kernels, so
  the classes cannot disagree with the masks applied. Rows at position -1 (the callers' padding)
  count like real rows: the result matches the jnp engine on every row.

  Args:
    cfg: the kernel configuration.
    idx, valid: int32 / bool [H, nq, K], the tile layout.
    qpos, kpos, aux_q, aux_k: as for the kernels.
    qreal, kreal: int32 [nq * Tq], [nk * Tk]: 1 for the caller's rows / keys, 0 for kernel padding.
  """
  num_rows, nq, k = idx.shape
  if not cfg.masks_tokens:  # with neither a predicate nor causal every listed slot is FULL
    return jnp.where(valid, FULL, EMPTY).astype(jnp.int32)
  grid, spec = _flat_grid(nq, num_rows)
  slots = spec((None, None, k), lambda a, r: (r, a, 0))
  q_pos = spec((cfg.block_q,), lambda a, r: (a,))
  k_pos = spec((kpos.shape[0],), lambda a, r: (0,))
  return pl.pallas_call(
      functools.partial(_classify_kernel, cfg=cfg),
      out_shape=jax.ShapeDtypeStruct(idx.shape, jnp.int32),
      grid=grid,
      in_specs=[slots, slots, q_pos, k_pos, q_pos, k_pos] + [q_pos] * cfg.num_aux
               + [k_pos] * cfg.num_aux,
      out_specs=slots,
      compiler_params=cfg.compiler_params(cfg.block_q, cfg.block_k),
      interpret=cfg.interpret,
      name='block_sparse_attention_classify',
  )(idx, valid.astype(jnp.int32), qpos, kpos, qreal, kreal, *aux_q, *aux_k)


def _row_specs(cfg: KernelConfig, spec, num_keys: int, num_slots: int, with_grads: bool):
  """in_specs of the forward / dq kernels, grid (a, bh): the program's query tile, all key tiles."""
  bq, d = cfg.block_q, cfg.head_dim
  q_tile = spec((None, bq, d), lambda a, bh: (bh, a, 0))
  k_all = spec((None, num_keys, d), lambda a, bh: (bh, 0, 0))
  q_pos = spec((bq,), lambda a, bh: (a,))
  k_pos = spec((num_keys,), lambda a, bh: (0,))
  specs = [
      spec((None, None, 2), lambda a, bh: (cfg.layout_row(bh), a, 0)),  # bounds
      spec((None, None, num_slots), lambda a, bh: (cfg.layout_row(bh), a, 0)),  # slots
      q_pos, k_pos,
      spec((None, num_keys), lambda a, bh: (cfg.batch(bh), 0)),  # kvalid
      q_tile, k_all, k_all,
  ]
  if with_grads:
    row = spec((None, bq), lambda a, bh: (bh, a))
    specs += [q_tile, row, row]  # do, lse, dd
  return specs + [q_pos] * cfg.num_aux + [k_pos] * cfg.num_aux


def _forward_call(cfg: KernelConfig, q, k, v, kvalid, qpos, kpos, aux_q, aux_k, slots, bounds):
  bh, num_q, d = q.shape
  grid, spec = _flat_grid(num_q // cfg.block_q, bh)
  return pl.pallas_call(
      functools.partial(_forward_kernel, cfg=cfg),
      out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((bh, num_q), jnp.float32)),
      grid=grid,
      in_specs=_row_specs(cfg, spec, k.shape[1], slots.shape[-1], with_grads=False),
      out_specs=(spec((None, cfg.block_q, d), lambda a, b: (b, a, 0)),
                 spec((None, cfg.block_q), lambda a, b: (b, a))),
      compiler_params=cfg.compiler_params(cfg.block_q, cfg.step_k),
      interpret=cfg.interpret,
      name='block_sparse_attention_fwd',
  )(bounds, slots, qpos, kpos, kvalid, q, k, v, *aux_q, *aux_k)


def _dq_call(cfg: KernelConfig, q, k, v, do, lse, dd, kvalid, qpos, kpos, aux_q, aux_k, slots,
             bounds):
  bh, num_q, d = q.shape
  grid, spec = _flat_grid(num_q // cfg.block_q, bh)
  return pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=grid,
      in_specs=_row_specs(cfg, spec, k.shape[1], slots.shape[-1], with_grads=True),
      out_specs=spec((None, cfg.block_q, d), lambda a, b: (b, a, 0)),
      compiler_params=cfg.compiler_params(cfg.block_q, cfg.step_k),
      interpret=cfg.interpret,
      name='block_sparse_attention_dq',
  )(bounds, slots, qpos, kpos, kvalid, q, k, v, do, lse, dd, *aux_q, *aux_k)


def _dkdv_call(cfg: KernelConfig, q, k, v, do, lse, dd, kvalid, qpos, kpos, aux_q, aux_k, qtiles,
               bounds):
  """grid (c, bh): the program's key tile, all query tiles."""
  bh, num_q, d = q.shape
  bk = cfg.block_k
  grid, spec = _flat_grid(k.shape[1] // bk, bh)
  q_all = spec((None, num_q, d), lambda c, b: (b, 0, 0))
  k_tile = spec((None, bk, d), lambda c, b: (b, c, 0))
  row_all = spec((None, num_q), lambda c, b: (b, 0))
  q_pos = spec((num_q,), lambda c, b: (0,))
  k_pos = spec((bk,), lambda c, b: (c,))
  in_specs = [
      spec((None, None, 4), lambda c, b: (cfg.layout_row(b), c, 0)),  # bounds
      spec((None, qtiles.shape[-1]), lambda c, b: (cfg.layout_row(b), 0)),  # qtiles
      q_pos, k_pos,
      spec((None, bk), lambda c, b: (cfg.batch(b), c)),  # kvalid
      q_all, k_tile, k_tile, q_all, row_all, row_all,
  ] + [q_pos] * cfg.num_aux + [k_pos] * cfg.num_aux
  return pl.pallas_call(
      functools.partial(_dkdv_kernel, cfg=cfg),
      out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
      grid=grid,
      in_specs=in_specs,
      out_specs=(k_tile, k_tile),
      compiler_params=cfg.compiler_params(cfg.step_q, bk),
      interpret=cfg.interpret,
      name='block_sparse_attention_dkdv',
  )(bounds, qtiles, qpos, kpos, kvalid, q, k, v, do, lse, dd, *aux_q, *aux_k)


@functools.lru_cache(maxsize=None)
def _fused(cfg: KernelConfig):
  """The differentiable kernel call for `cfg`: (q, k, v, side inputs) -> (out, lse), custom VJP.

  Residuals are q, k, v, out and lse (plus the integer side inputs): nothing of size n x keys.
  """

  def forward(q, k, v, kvalid, qpos, kpos, aux_q, aux_k, walks):
    slots, row_bounds, _, _ = walks
    return _forward_call(cfg, q, k, v, kvalid, qpos, kpos, aux_q, aux_k, slots, row_bounds)

  @jax.custom_vjp
  def run(*args):
    return forward(*args)

  def fwd(*args):
    out, lse = forward(*args)
    return (out, lse), args + (out, lse)

  def bwd(residuals, cotangents):
    q, k, v, kvalid, qpos, kpos, aux_q, aux_k, walks, out, lse = residuals
    dout, dlse = cotangents
    slots, row_bounds, qtiles, col_bounds = walks
    # D_i = dout_i . out_i is the softmax Jacobian's diagonal term; an lse cotangent enters with the
    # opposite sign (d lse / d s = P), so the kernels only need dd = D - dlse.
    dd = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - dlse
    dout = dout.astype(q.dtype)
    side = (kvalid, qpos, kpos, aux_q, aux_k)
    dq = _dq_call(cfg, q, k, v, dout, lse, dd, *side, slots, row_bounds)
    dk, dv = _dkdv_call(cfg, q, k, v, dout, lse, dd, *side, qtiles, col_bounds)
    zero = lambda tree: jax.tree.map(zero_cotangent, tree)
    return (dq, dk, dv) + tuple(zero(x) for x in residuals[3:9])

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
    raise ValueError(f'pallas engine: kb and vb must both be [{b}, {h}, nk, Bk, {d}], got '
                     f'{kb.shape} and {vb.shape}.')
  nk, bk = kb.shape[2:4]
  expected = dict(kvalid=((b, nk, bk), kvalid), qpos=((nq, bq), qpos), kpos=((nk, bk), kpos))
  for name, (shape, x) in expected.items():
    if tuple(x.shape) != shape:
      raise ValueError(f'pallas engine: {name} must have shape {shape}, got {tuple(x.shape)}.')
  if idx.ndim != 3 or idx.shape[1] != nq or idx.shape[0] not in (1, h) or valid.shape != idx.shape:
    raise ValueError(f'pallas engine: idx and valid must both be [1 or {h}, {nq}, K], got '
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
    kb, vb: [b, h, nk, Bk, d] key/value blocks (may be a different sequence than the queries).
    kvalid: bool [b, nk, Bk], False for padded keys.
    qpos: int32 [nq, Bq], kpos: int32 [nk, Bk]: original positions (for `visible` and `causal`).
    idx: int32 [H, nq, K] key blocks per query block (H = 1 or h); valid: bool [H, nq, K]. Each key
      block at most once per row (see blocks.dedupe_slots).
    visible: hashable predicate `visible(i, j, aux) -> bool` or None. Inside the kernels it may read
      an aux leaf only as `leaf[i]` / `leaf[j]` with the arrays it is given.
    aux: a pytree of 1-D arrays indexed by position.
    causal: also require j <= i.
    interpret: run the kernels in Pallas interpret mode (None: on CPU only).

  Returns:
    out [b, h, nq, Bq, d] in q's dtype (zeros where a query sees nothing) and lse float32
    [b, h, nq, Bq] (MASK_VALUE where a query sees nothing); differentiable in qb, kb, vb, through
    both outputs, by the dq and dk/dv kernels.
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

  (tq, rq), (tk, rk), d_pad = tiling(bq), tiling(bk), kernel_size(d)
  cfg = KernelConfig(heads=h, layout_heads=idx.shape[0], block_q=tq, block_k=tk,
                     step_q=min(tq, STEP), step_k=min(tk, STEP), head_dim=d_pad,
                     scale=float(d) ** -0.5, visible=visible, aux_tree=aux_tree,
                     aux_bool=tuple(x.dtype == jnp.bool_ for x in leaves), causal=bool(causal),
                     interpret=bool(interpret))
  # Side inputs at tile granularity: positions and key validity padded like the blocks (position -1,
  # invalid), aux leaves gathered at every query and key position. A block of r tiles becomes r
  # consecutive tiles: its layout row is repeated for each of its query tiles, and each key slot
  # becomes r key-tile slots; slots are padded to a power of two (fillers are invalid).
  qpos_t = jnp.pad(qpos, ((0, 0), (0, tq * rq - bq)), constant_values=-1).reshape(-1)
  kpos_t = jnp.pad(kpos, ((0, 0), (0, tk * rk - bk)), constant_values=-1).reshape(-1)
  kvalid_t = jnp.pad(jnp.asarray(kvalid, jnp.int32), ((0, 0), (0, 0), (0, tk * rk - bk)))
  as_kernel_input = lambda x: lax.stop_gradient(x.astype(jnp.int32) if x.dtype == jnp.bool_ else x)
  aux_q = tuple(as_kernel_input(x[qpos_t]) for x in leaves)
  aux_k = tuple(as_kernel_input(x[kpos_t]) for x in leaves)
  num_layouts, _, num_slots = idx.shape
  idx = (idx[..., None] * rk + jnp.arange(rk, dtype=jnp.int32)).reshape(num_layouts, nq, -1)
  valid = jnp.repeat(valid, rk, axis=-1)
  idx, valid = jnp.repeat(idx, rq, axis=1), jnp.repeat(valid, rq, axis=1)
  slot_pad = ((0, 0), (0, 0), (0, (1 << (num_slots * rk - 1).bit_length()) - num_slots * rk))
  idx, valid = jnp.pad(idx, slot_pad), jnp.pad(valid, slot_pad)

  real = lambda n, size, tiled: jnp.pad(jnp.ones((n, size), jnp.int32),
                                       ((0, 0), (0, tiled - size))).reshape(-1)
  cls = classify_slots(cfg, idx, valid, qpos_t, kpos_t, aux_q, aux_k, real(nq, bq, tq * rq),
                       real(nk, bk, tk * rk))
  walks = row_walk(idx, cls) + column_walk(idx, cls, nk * rk)
  out, lse = _fused(cfg)(_pad_blocks(qb, tq * rq, d_pad), _pad_blocks(kb, tk * rk, d_pad),
                         _pad_blocks(vb, tk * rk, d_pad), kvalid_t.reshape(b, -1), qpos_t, kpos_t,
                         aux_q, aux_k, walks)
  out = out.reshape(b, h, nq, tq * rq, d_pad)[:, :, :, :bq, :d]
  lse = lse.reshape(b, h, nq, tq * rq)[:, :, :, :bq]
  return out, lse
