"""Batch iterators: determinism, epoch permutations, process sharding, exact resume, eval padding."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from efficient_attn.data import iterators
from efficient_attn.data.splits import TokenSplit


def _split(n: int) -> TokenSplit:
  """Example i has label i (and one token), so batches reveal which examples they hold."""
  return TokenSplit(np.zeros((n, 1), np.uint8), np.ones(n, np.int32), np.arange(n), offset=1)


def _labels(batches, steps: int) -> list[np.ndarray]:
  return [b['labels'] for b in itertools.islice(batches, steps)]


def test_each_epoch_is_a_permutation_and_batches_straddle_epochs():
  n, bs = 10, 4
  stream = np.concatenate(_labels(iterators.train_batches(_split(n), bs, seed=3), 5))  # 20 = 2 epochs
  np.testing.assert_array_equal(np.sort(stream[:n]), np.arange(n))
  np.testing.assert_array_equal(np.sort(stream[n:]), np.arange(n))
  np.testing.assert_array_equal(stream[:n], iterators.epoch_permutation(n, 3, 0))
  np.testing.assert_array_equal(stream[n:], iterators.epoch_permutation(n, 3, 1))


def test_same_seed_same_stream_other_seed_other_stream():
  split = _split(50)
  a = _labels(iterators.train_batches(split, 8, seed=0), 20)
  b = _labels(iterators.train_batches(split, 8, seed=0), 20)
  c = _labels(iterators.train_batches(split, 8, seed=1), 20)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  # Successive epochs are shuffled differently.
  assert not np.array_equal(iterators.epoch_permutation(50, 0, 0), iterators.epoch_permutation(50, 0, 1))


@pytest.mark.parametrize('process_count', [2, 4])
def test_processes_together_yield_the_global_batch(process_count):
  split, bs = _split(37), 8
  full = _labels(iterators.train_batches(split, bs, seed=5), 12)
  parts = [_labels(iterators.train_batches(split, bs, seed=5, process_index=p,
                                           process_count=process_count), 12)
           for p in range(process_count)]
  for step in range(12):
    assert all(len(part[step]) == bs // process_count for part in parts)
    np.testing.assert_array_equal(np.concatenate([part[step] for part in parts]), full[step])


def test_resume_from_start_step_equals_the_uninterrupted_stream():
  split, bs = _split(23), 6
  full = _labels(iterators.train_batches(split, bs, seed=9), 30)
  for start in (0, 1, 7, 19):
    resumed = _labels(iterators.train_batches(split, bs, seed=9, start_step=start), 30 - start)
    assert all(np.array_equal(x, y) for x, y in zip(resumed, full[start:]))
  resumed = _labels(iterators.train_batches(split, bs, seed=9, start_step=11, process_index=1,
                                            process_count=2), 5)
  for k in range(5):
    np.testing.assert_array_equal(resumed[k], full[11 + k][bs // 2:])
  np.testing.assert_array_equal(
      iterators.train_indices(23, bs, seed=9, step=11, process_index=1, process_count=2),
      full[11][bs // 2:])


def test_batch_larger_than_the_split():
  stream = np.concatenate(_labels(iterators.train_batches(_split(3), 7, seed=0), 3))
  for e in range(7):
    np.testing.assert_array_equal(np.sort(stream[3 * e:3 * e + 3]), np.arange(3))


def test_eval_batches_cover_everything_once_in_order_with_weighted_filler():
  split, bs = _split(10), 4
  batches = list(iterators.eval_batches(split, bs))
  assert len(batches) == iterators.num_eval_batches(10, bs) == 3
  assert all(b['inputs'].shape == (bs, 1) for b in batches)
  weights = np.concatenate([b['weights'] for b in batches])
  labels = np.concatenate([b['labels'] for b in batches])
  assert weights.dtype == np.float32
  np.testing.assert_array_equal(weights, [1] * 10 + [0] * 2)
  np.testing.assert_array_equal(labels[weights > 0], np.arange(10))
  # Sharded: every process yields the same number of batches; together they are the global ones.
  parts = [list(iterators.eval_batches(split, bs, process_index=p, process_count=2)) for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == 3
  for k in range(3):
    for key in ('labels', 'weights'):
      np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]),
                                    batches[k][key])


@pytest.mark.parametrize('kwargs', [
    dict(batch_size=0), dict(batch_size=6, process_count=4), dict(batch_size=4, process_index=2,
                                                                  process_count=2),
    dict(batch_size=4, process_index=-1, process_count=2), dict(batch_size=4, start_step=-1),
    dict(batch_size=4, seed=-3),
])
def test_bad_arguments_raise_value_error(kwargs):
  kwargs = {'seed': 0, **kwargs}
  with pytest.raises(ValueError):
    iterators.train_batches(_split(10), **kwargs)


def test_bad_eval_arguments_and_empty_splits_raise_value_error():
  with pytest.raises(ValueError, match='divisible'):
    iterators.eval_batches(_split(10), 5, process_count=2)
  with pytest.raises(ValueError, match='empty'):
    iterators.train_batches(_split(0), 2, seed=0)
  with pytest.raises(ValueError, match='indices'):
    _split(4).get(np.array([4]))
