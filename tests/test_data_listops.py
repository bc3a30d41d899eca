"""ListOps: determinism, length bounds, labels against a direct evaluation, the on-disk cache."""
from __future__ import annotations

import numpy as np
import pytest

import efficient_attn.data as data
from efficient_attn.data import listops, tokenizers


def _config(tmp_path, **overrides):
  c = data.default_data_config('listops', quick=True)
  c.cache_dir = str(tmp_path)
  c.num_train, c.num_validation, c.num_test = 40, 10, 10
  c.min_length, c.max_length = 20, 120
  c.update(overrides)
  return c


def _evaluate(symbols: list[str], max_args: int, max_depth: int) -> int:
  """Evaluates a ListOps expression by recursive descent, checking its structure on the way."""
  ops = {'MIN': min, 'MAX': max, 'MED': lambda a: int(np.median(a)), 'SM': lambda a: sum(a) % 10}

  def node(i: int, depth: int) -> tuple[int, int]:
    assert depth <= max_depth
    if symbols[i] == '[':
      op = ops[symbols[i + 1]]
      i += 2
      args = []
      while symbols[i] != ']':
        value, i = node(i, depth + 1)
        args.append(value)
      assert 2 <= len(args) <= max_args
      return op(args), i + 1
    return int(symbols[i]), i + 1

  value, end = node(0, 1)
  assert end == len(symbols)
  return value


def test_shapes_dtypes_masks_and_label_equals_evaluation(tmp_path):
  c = _config(tmp_path)
  task = data.load_task(c)
  assert (task.kind, task.vocab_size, task.num_classes, task.max_length) == ('classify', 17, 10, 120)
  assert (task.train.num_examples, task.validation.num_examples, task.test.num_examples) == (40, 10, 10)
  for split in (task.train, task.validation, task.test):
    batch = split.get(np.arange(split.num_examples))
    assert batch['inputs'].shape == batch['mask'].shape == (split.num_examples, 120)
    assert batch['inputs'].dtype == np.int32 and batch['labels'].dtype == np.int32
    assert batch['mask'].dtype == bool
    lengths = batch['mask'].sum(1)
    assert np.all((lengths > c.min_length) & (lengths < c.max_length))
    # The mask is a prefix and exactly covers the non-pad tokens.
    np.testing.assert_array_equal(batch['mask'], np.arange(120) < lengths[:, None])
    np.testing.assert_array_equal(batch['mask'], batch['inputs'] != 0)
    for row, label in zip(batch['inputs'], batch['labels']):
      symbols = tokenizers.decode_listops(row)
      assert _evaluate(symbols, c.max_args, c.max_depth) == label


def test_labels_cover_all_classes_and_all_operators_occur(tmp_path):
  task = data.load_task(_config(tmp_path, num_train=300))
  batch = task.train.get(np.arange(300))
  assert set(np.unique(batch['labels'])) == set(range(10))
  for op in tokenizers.LISTOPS_OPERATORS:
    assert np.any(batch['inputs'] == tokenizers.LISTOPS_IDS[op])


def test_deterministic_distinct_per_split_and_seed(tmp_path):
  a = listops.generate_splits(_config(tmp_path))
  b = listops.generate_splits(_config(tmp_path))
  other = listops.generate_splits(_config(tmp_path, seed=1))
  for split in listops.SPLITS:
    for x, y in zip(a[split], b[split]):
      np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a['train'][0][:50], other['train'][0][:50])
  rows = {}
  for split, (flat, offsets, _) in a.items():
    rows[split] = {flat[s:e].tobytes() for s, e in zip(offsets[:-1], offsets[1:])}
  assert not rows['train'] & rows['validation'] and not rows['train'] & rows['test']
  assert not rows['validation'] & rows['test']
  assert len({listops.split_seed(0, s) for s in listops.SPLITS}) == 3


def test_cache_is_reused_and_keyed_by_options(tmp_path, monkeypatch):
  c = _config(tmp_path)
  first = data.load_task(c).train.get(np.arange(40))
  calls = []
  real = listops.generate_splits
  monkeypatch.setattr(listops, 'generate_splits', lambda cfg: calls.append(1) or real(cfg))
  again = data.load_task(_config(tmp_path)).train.get(np.arange(40))
  assert not calls  # loaded from disk, not regenerated
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  data.load_task(_config(tmp_path, num_test=11))  # another option: another cache entry
  assert calls == [1]
  assert listops.cache_key(_config(tmp_path)) != listops.cache_key(_config(tmp_path, max_args=5))


def test_quick_config_is_fast_and_in_bounds(tmp_path):
  c = data.default_data_config('listops', quick=True)
  c.cache_dir = str(tmp_path)
  c.num_train = 600  # a slice of the quick config, to keep the test short
  task = data.load_task(c)
  lengths = task.train.get(np.arange(600))['mask'].sum(1)
  assert lengths.min() > 100 and lengths.max() < 500


@pytest.mark.parametrize('overrides, match', [
    (dict(min_length=50, max_length=51), 'min_length'),
    (dict(max_args=1), 'max_args'),
    (dict(branch_probability=1.0), 'branch_probability'),
    (dict(max_depth=2, min_length=20), 'longer than min_length'),
    (dict(num_train=0), 'num_train'),
])
def test_bad_options_raise_value_error(tmp_path, overrides, match):
  with pytest.raises(ValueError, match=match):
    data.load_task(_config(tmp_path, **overrides))


def test_listops_tokenizer_round_trip_and_lra_spelling():
  ids = tokenizers.encode_listops('( ( [MAX 2 ) [SM 3 4 ] ) ]')
  assert tokenizers.decode_listops(ids) == ['[', 'MAX', '2', '[', 'SM', '3', '4', ']', ']']
  assert tokenizers.LISTOPS_VOCAB_SIZE == 17 and ids.min() >= 1
  with pytest.raises(ValueError, match='Unknown ListOps symbol'):
    tokenizers.encode_listops('[FIRST 1 ]')
