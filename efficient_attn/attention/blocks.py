"""Block utilities shared by the engines, the variants and sequence parallelism.

Sequences are [batch, length, heads, head_dim]; blocked arrays are [batch, heads, num_blocks, block,
head_dim]. A *layout* lists, per query block, the key blocks it visits: `idx[H, nq, K]` with
`valid[H, nq, K]` (H = 1, or one row per head). Nothing here depends on an engine, so the jnp engine
(`engine.py`) and the Pallas kernels (`pallas_engine.py`) both import it and not each other.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

# The block size of the patterns that do not choose their own (full, chunked key blocks, the strided
# columns, the fixed summaries): 128 keys fill a CPU/GPU matmul tile while a [128, 128] score tile stays small.
DEFAULT_BLOCK = 128


# --------------------------------------------------------------------------------------------------
# Sequence <-> blocks
# --------------------------------------------------------------------------------------------------


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pad_axis(x, axis: int, new_size: int, value=0):
  pad = new_size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def to_blocks(x, block: int):
  """[b, n, h, d] -> [b, h, n_pad / block, block, d], zero padded at the end."""
  b, n, h, d = x.shape
  x = pad_axis(x, 1, round_up(n, block))
  return x.reshape(b, -1, block, h, d).transpose(0, 3, 1, 2, 4)


def from_blocks(xb, length: int):
  """[b, h, nb, block, d] -> [b, length, h, d] (drops the padding)."""
  b, h, nb, block, d = xb.shape
  return xb.transpose(0, 2, 3, 1, 4).reshape(b, nb * block, h, d)[:, :length]


def mask_to_blocks(mask, block: int):
  """bool [b, n] -> [b, n_pad / block, block], False on padding."""
  b, n = mask.shape
  return pad_axis(mask, 1, round_up(n, block), False).reshape(b, -1, block)


def block_positions(num_blocks: int, block: int):
  """int32 [num_blocks, block]: the sequence position of every block slot."""
  return jnp.arange(num_blocks * block, dtype=jnp.int32).reshape(num_blocks, block)


def fit_block(length: int, block: int) -> int:
  """The block actually used: `block`, or less for sequences shorter than one block (multiple of 8)."""
  return min(block, round_up(length, 8))


def auto_block(window: int) -> int:
  """A block size for band patterns: about the window, within [16, 128]."""
  return min(DEFAULT_BLOCK, max(16, 1 << max(0, math.ceil(math.log2(max(window, 1))))))


def lse_from_blocks(lse, length: int):
  """[b, h, nb, block] -> [b, length, h]."""
  b, h, nb, block = lse.shape
  return lse.transpose(0, 2, 3, 1).reshape(b, nb * block, h)[:, :length]


def positions(length: int):
  return jnp.arange(length, dtype=jnp.int32)


# --------------------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------------------


def dedupe_slots(idx, valid):
  """Marks every slot that repeats an earlier valid slot of its row as invalid. idx, valid: [..., K]."""
  k = idx.shape[-1]
  same = idx[..., :, None] == idx[..., None, :]  # [..., K, K]
  earlier = jnp.tril(jnp.ones((k, k), bool), -1)  # [t, s]: s < t
  repeated = jnp.any(same & earlier & valid[..., None, :], axis=-1)
  return valid & ~repeated


@dataclasses.dataclass(frozen=True)
class AllBlocks:
  """Every query block visits every key block. A static layout: the jnp engine reads each step's key
  blocks as one slice shared by all query blocks; called as `all_blocks_layout(nq, nk)` it gives the
  index arrays idx, valid [1, nq, nk]."""

  def __call__(self, num_q_blocks: int, num_k_blocks: int):
    idx = jnp.broadcast_to(jnp.arange(num_k_blocks, dtype=jnp.int32),
                           (1, num_q_blocks, num_k_blocks))
    return idx, jnp.ones(idx.shape, bool)


all_blocks_layout = AllBlocks()


def band_layout(num_blocks: int, left: int, right: int):
  """Query block a visits key blocks a-left..a+right (clipped): idx, valid [1, nb, left+right+1]."""
  return band_shifts(left, right)(num_blocks, num_blocks)


@dataclasses.dataclass(frozen=True)
class Shifts:
  """A static band layout: query block a visits key blocks a + o for o in `offsets` (those in range).

  The jnp engine reads it as shifted slices of the key blocks (no gather, no scatter-add); called as
  `Shifts(offsets)(nq, nk)` it gives the same layout as index arrays (idx, valid) [1, nq, len(offsets)].
  """
  offsets: tuple[int, ...]

  def __post_init__(self):
    offsets = tuple(int(o) for o in self.offsets)
    if not offsets or len(set(offsets)) != len(offsets):  # a repeated block would count twice
      raise ValueError(f'Shifts: offsets must be distinct ints, at least one, got {self.offsets!r}.')
    object.__setattr__(self, 'offsets', offsets)

  def __call__(self, num_q_blocks: int, num_k_blocks: int):
    a = jnp.arange(num_q_blocks, dtype=jnp.int32)[:, None]
    idx = a + jnp.asarray(self.offsets, jnp.int32)[None, :]
    valid = (idx >= 0) & (idx < num_k_blocks)
    return jnp.clip(idx, 0, num_k_blocks - 1)[None], valid[None]


def band_shifts(left: int, right: int) -> Shifts:
  """Query block a visits key blocks a-left..a+right: the band of `band_layout` as `Shifts`."""
  return Shifts(tuple(range(-left, right + 1)))


def outside_band(num_blocks: int, columns, left: int, right: int, skip_rows=()):
  """Every query block a visits the key blocks `columns` outside its band a-left..a+right.

  The complement of `band_shifts(left, right)` within `columns` (global key blocks), so the two parts
  never count a block twice; rows in `skip_rows` visit nothing. idx, valid [1, num_blocks, len(columns)].
  """
  a = np.arange(num_blocks)[:, None]
  cols = np.asarray(columns, np.int32)[None, :]
  valid = ((cols < a - left) | (cols > a + right)) & ~np.isin(a, list(skip_rows))
  return (jnp.asarray(np.broadcast_to(cols, valid.shape))[None], jnp.asarray(valid)[None])


# --------------------------------------------------------------------------------------------------
# Reorderings and merges
# --------------------------------------------------------------------------------------------------


def residue_major(x, d: int):
  """Reorders a sequence so that positions with equal `i % d` are contiguous.

  [b, n, ...] -> [b * d, ceil(n / d), ...]: row `b * d + r` holds positions r, r + d, r + 2d, ... So a
  pattern that only links positions d apart becomes local in the new order (dilated, strided).
  """
  b, n = x.shape[:2]
  m = -(-n // d)
  x = pad_axis(x, 1, m * d)
  x = x.reshape((b, m, d) + x.shape[2:]).swapaxes(1, 2)
  return x.reshape((b * d, m) + x.shape[3:])


def residue_major_inverse(x, d: int, length: int):
  """Inverse of `residue_major`: [b * d, m, ...] -> [b, length, ...]."""
  bd, m = x.shape[:2]
  x = x.reshape((bd // d, d, m) + x.shape[2:]).swapaxes(1, 2)
  return x.reshape((bd // d, m * d) + x.shape[3:])[:, :length]


def merge_partials(parts):
  """Combines attention results over disjoint key sets: [(out, lse), ...] -> (out, lse).

  Each part is a softmax over its own keys; the union's softmax reweights them by exp(lse_p - lse).
  """
  if len(parts) == 1:
    return parts[0]
  lses = jnp.stack([lse for _, lse in parts])
  lse = jnp.max(lses, axis=0) + jnp.log(jnp.sum(jnp.exp(lses - jnp.max(lses, axis=0)), axis=0))
  out = sum(o.astype(jnp.float32) * jnp.exp(l - lse)[..., None] for o, l in parts)
  return out.astype(parts[0][0].dtype), lse


def zero_cotangent(x):
  """The zero cotangent of a custom-VJP input: zeros for floats, float0 for ints and bools."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return jnp.zeros(x.shape, jax.dtypes.float0)
