"""Token-level pattern predicates, shared by the fast paths and by `dense_mask`.

Each predicate is a frozen (hashable) dataclass called as `pred(i, j, aux) -> bool` on broadcastable
integer position arrays (query i, key j, on the unpadded sequence). The engine evaluates it on the key
blocks a layout gathers; `dense_mask` evaluates it on the full [length, length] grid. One definition, two
uses: the fast path and the reference cannot drift apart.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Band:
  """abs(i - j) <= window (local attention)."""
  window: int

  def __call__(self, i, j, aux=()):
    return jnp.abs(i - j) <= self.window


@dataclasses.dataclass(frozen=True)
class Dilated:
  """(i - j) % dilation == 0 and abs(i - j) <= window * dilation."""
  window: int
  dilation: int

  def __call__(self, i, j, aux=()):
    return ((i - j) % self.dilation == 0) & (jnp.abs(i - j) <= self.window * self.dilation)


@dataclasses.dataclass(frozen=True)
class BandOrGlobal:
  """Longformer: abs(i - j) <= window or i in G or j in G; aux = bool [>= length] marking G."""
  window: int

  def __call__(self, i, j, aux):
    is_global = aux
    return (jnp.abs(i - j) <= self.window) | is_global[i] | is_global[j]


@dataclasses.dataclass(frozen=True)
class Strided:
  """Sparse Transformer strided: abs(i - j) <= stride or (i - j) % stride == 0."""
  stride: int

  def __call__(self, i, j, aux=()):
    return (jnp.abs(i - j) <= self.stride) | ((i - j) % self.stride == 0)


@dataclasses.dataclass(frozen=True)
class MinGap:
  """abs(i - j) >= gap: the strided pattern's column part minus what its band already covers."""
  gap: int

  def __call__(self, i, j, aux=()):
    return jnp.abs(i - j) >= self.gap


@dataclasses.dataclass(frozen=True)
class Fixed:
  """Sparse Transformer fixed: i // stride == j // stride or j % stride >= stride - summary."""
  stride: int
  summary: int

  def __call__(self, i, j, aux=()):
    return (i // self.stride == j // self.stride) | (j % self.stride >= self.stride - self.summary)


@dataclasses.dataclass(frozen=True)
class SameBlock:
  """i // block == j // block: non-overlapping chunks (LRA's local attention, `block_local`)."""
  block: int

  def __call__(self, i, j, aux=()):
    return i // self.block == j // self.block


@dataclasses.dataclass(frozen=True)
class OtherGroup:
  """i // group != j // group: the fixed pattern's summary columns minus the query's own group."""
  group: int

  def __call__(self, i, j, aux=()):
    return i // self.group != j // self.group


def grid(length: int):
  """Query and key position grids [length, 1] and [1, length] for `dense_mask`."""
  pos = jnp.arange(length, dtype=jnp.int32)
  return pos[:, None], pos[None, :]


def with_causal(mask, causal: bool):
  """mask [..., n, n] intersected with j <= i when causal."""
  if not causal:
    return mask
  n = mask.shape[-1]
  return mask & jnp.tril(jnp.ones((n, n), bool))
