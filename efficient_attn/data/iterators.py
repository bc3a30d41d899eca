"""Deterministic, resumable, process-sharded batch iterators over a `Split`.

Training reads an infinite stream: the concatenation of one permutation of the split per epoch, the
permutation of epoch e drawn from (seed, e) alone. Global step s takes stream positions
[s * batch_size, (s + 1) * batch_size), so a batch may straddle two epochs and no example is dropped.
Every batch is therefore a pure function of (seed, step), which makes resuming at `start_step` exact
and lets each process read only its own rows.

With `process_count` processes, `batch_size` is the global batch; process p gets rows
[p * b, (p + 1) * b) of each global batch, b = batch_size // process_count.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from efficient_attn.data.base import Split


def _check_sharding(batch_size: int, process_index: int, process_count: int) -> int:
  """Validates the arguments; returns the per-process batch size."""
  for name, value in (('batch_size', batch_size), ('process_count', process_count)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value!r}.')
  if isinstance(process_index, bool) or not isinstance(process_index, (int, np.integer)):
    raise ValueError(f'process_index must be an integer, got {process_index!r}.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index must be in [0, {process_count}), got {process_index}.')
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by process_count {process_count}.')
  return batch_size // process_count


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of epoch `epoch`: a permutation of range(num_examples) drawn from (seed, epoch)."""
  return np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)


class _StreamOrder:
  """Maps stream positions to example indices, caching the latest epoch's permutation.

  Drawing a permutation per batch would cost O(N) per step; a batch touches at most a few epochs.
  """

  def __init__(self, num_examples: int, seed: int):
    if num_examples < 1:
      raise ValueError('Cannot draw training batches from an empty split.')
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f'seed must be an integer >= 0, got {seed!r}.')
    self.num_examples = num_examples
    self.seed = seed
    self._epoch = -1
    self._perm = None

  def __call__(self, positions: np.ndarray) -> np.ndarray:
    epochs = positions // self.num_examples
    out = np.empty(positions.shape, np.int64)
    for epoch in np.unique(epochs):
      if int(epoch) != self._epoch:
        self._epoch, self._perm = int(epoch), epoch_permutation(self.num_examples, self.seed,
                                                               int(epoch))
      sel = epochs == epoch
      out[sel] = self._perm[positions[sel] % self.num_examples]
    return out


def _positions(step: int, batch_size: int, process_index: int, local: int) -> np.ndarray:
  start = step * batch_size + process_index * local
  return np.arange(start, start + local, dtype=np.int64)


def train_indices(num_examples: int, batch_size: int, *, seed: int, step: int, process_index: int = 0,
                  process_count: int = 1) -> np.ndarray:
  """The example indices (int64 [batch_size // process_count]) of this process at global `step`."""
  local = _check_sharding(batch_size, process_index, process_count)
  return _StreamOrder(num_examples, seed)(_positions(step, batch_size, process_index, local))


def train_batches(split: Split, batch_size: int, *, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Infinite training batches of this process, from global step `start_step` on.

  Each batch is `split.get` of `batch_size // process_count` indices (see the module docstring), so
  arrays have leading dimension batch_size // process_count. Validation happens at the call, not at
  the first `next`.
  """
  local = _check_sharding(batch_size, process_index, process_count)
  if isinstance(start_step, bool) or not isinstance(start_step, (int, np.integer)) or start_step < 0:
    raise ValueError(f'start_step must be an integer >= 0, got {start_step!r}.')
  order = _StreamOrder(split.num_examples, seed)

  def generate():
    step = int(start_step)
    while True:
      yield split.get(order(_positions(step, batch_size, process_index, local)))
      step += 1

  return generate()


def num_eval_batches(num_examples: int, batch_size: int) -> int:
  """Global evaluation batches needed to see every example once (the last one padded)."""
  return -(-num_examples // batch_size)


def eval_batches(split: Split, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order, as this process's rows of global batches of `batch_size`.

  The last global batch is filled up with copies of example 0 whose 'weights' are 0 (real rows have
  weight 1), so every batch has the same shape and every process yields the same number of batches,
  num_eval_batches(split.num_examples, batch_size).
  """
  local = _check_sharding(batch_size, process_index, process_count)
  n = split.num_examples
  if n < 1:
    raise ValueError('Cannot evaluate an empty split.')

  def generate():
    for b in range(num_eval_batches(n, batch_size)):
      positions = _positions(b, batch_size, process_index, local)
      real = positions < n
      batch = split.get(np.where(real, positions, 0))
      batch['weights'] = real.astype(np.float32)
      yield batch

  return generate()
