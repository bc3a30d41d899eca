"""ListOps: determinism, length bounds, labels against a direct evaluation, the on-disk cache, and
LRA's TSV files read with LRA's tokens (checked against a reference of LRA's input pipeline)."""
from __future__ import annotations

import csv
import logging
import os
import random
import re

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
  ops = {'[MIN': min, '[MAX': max, '[MED': lambda a: int(np.median(a)),
         '[SM': lambda a: sum(a) % 10}

  def node(i: int, depth: int) -> tuple[int, int]:
    assert depth <= max_depth
    if symbols[i] in ops:
      op = ops[symbols[i]]
      i += 1
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
  # LRA's 15 words + padding + the out-of-vocabulary id LRA's encoder reserves.
  assert (task.kind, task.vocab_size, task.num_classes, task.max_length) == (
      'classify', 17, 10, 120)
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
  ids = tokenizers.encode_listops('( ( ( [MAX 2 ) ( ( ( [SM 3 ) 4 ) ] ) ) ] )')
  assert tokenizers.decode_listops(ids) == ['[MAX', '2', '[SM', '3', '4', ']', ']']
  assert tokenizers.LISTOPS_VOCAB_SIZE == 17 and ids.min() >= 1 and ids.max() <= 15
  for bad in ('[FIRST 1 ]', '[ MAX 1 2 ]', 'MAX'):  # not LRA's words: an error, not an unknown id
    with pytest.raises(ValueError, match='Unknown ListOps token'):
      tokenizers.encode_listops(bad)


# --- LRA's files and tokens ----------------------------------------------------------------------
# What LRA's code does, written out here independently of efficient_attn (we cannot run tensorflow):
# the generator lra_benchmarks/data/listops.py builds a tree as nested pairs and prints it with
# to_string; lra_benchmarks/listops/input_pipeline.py reads the TSV, renames ']' to 'X', deletes
# parentheses, builds its vocabulary as the set of whitespace-separated words of the first 1002
# validation rows, and encodes with tfds' TokenTextEncoder: words mixing alphanumeric and other
# characters ('[MIN') are reserved tokens split out first, the rest is split at \W+, and a word's id
# is its index in the vocabulary list + 1 (0 is padding; one more id for unknown words).

_LRA_OPS = ('[MIN', '[MAX', '[MED', '[SM')


def _lra_tree(rng: random.Random, depth: int, max_depth: int, max_args: int):
  """(tree, length, value) with the LRA generator's rules; a tree is a digit or nested pairs."""
  if depth >= max_depth or rng.random() > 0.25:
    value = rng.randrange(10)
    return value, 1, value
  args = [_lra_tree(rng, depth + 1, max_depth, max_args) for _ in range(rng.randint(2, max_args))]
  op = rng.choice(_LRA_OPS)
  tree = (op, args[0][0])
  for sub in args[1:]:
    tree = (tree, sub[0])
  values = [v for _, _, v in args]
  value = {'[MIN': min, '[MAX': max, '[MED': lambda a: int(np.median(a)),
           '[SM': lambda a: int(np.sum(a)) % 10}[op](values)
  return (tree, ']'), 2 + sum(n for _, n, _ in args), value


def _lra_to_string(tree) -> str:
  if isinstance(tree, (str, int)):
    return str(tree)
  return '( ' + _lra_to_string(tree[0]) + ' ' + _lra_to_string(tree[1]) + ' )'


def _lra_rows(seed: int, count: int, min_length: int,
             max_length: int) -> list[tuple[str, int, int]]:
  rng = random.Random(seed)
  rows = []
  while len(rows) < count:
    tree, length, value = _lra_tree(rng, 1, 10, 10)
    if min_length < length < max_length:
      rows.append((_lra_to_string(tree), value, length))
  return rows


def _write_lra_tsv(path, rows) -> None:
  # LRA's write_to_file: csv.writer with a tab delimiter (and csv's '\r\n' line ends), a header.
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f, delimiter='\t')
    writer.writerow(['Source', 'Target'])
    writer.writerows([source, value] for source, value, _ in rows)


def _lra_rename(source: str) -> str:
  return source.replace(']', 'X').replace('(', '').replace(')', '')


def _lra_vocabulary(val_sources: list[str]) -> list[str]:
  words = set()
  for i, source in enumerate(val_sources):
    words.update(_lra_rename(source).split())  # tensorflow_text.WhitespaceTokenizer
    if i > 1000:
      break
  return list(words)  # LRA: list(set(...)), in the set's (per-process hash) order


def _lra_encode(source: str, vocabulary: list[str]) -> list[int]:
  reserved = [w for w in vocabulary if len([p for p in re.split(r'(\W+)', w) if p]) > 1]
  pattern = re.compile('(' + '|'.join(re.escape(w) for w in reserved) + ')')
  words = []
  for part in pattern.split(_lra_rename(source)):
    words.extend([part] if part in reserved else re.split(r'\W+', part))
  index = {w: i for i, w in enumerate(vocabulary)}
  return [index.get(w, len(vocabulary)) + 1 for w in words if w]


@pytest.fixture
def lra_dir(tmp_path):
  folder = tmp_path / 'lra_release' / 'listops-1000'
  folder.mkdir(parents=True)
  rows = {}
  for seed, (split, name) in enumerate(listops.LRA_FILES.items()):
    rows[split] = _lra_rows(seed, {'train': 40, 'validation': 30, 'test': 20}[split], 20, 120)
    _write_lra_tsv(folder / name, rows[split])
  return folder, rows


def test_lra_tsv_loads_via_path_with_lra_token_ids(tmp_path, lra_dir):
  folder, rows = lra_dir
  assert open(folder / 'basic_train.tsv', 'rb').read().startswith(b'Source\tTarget\r\n( ')
  c = _config(tmp_path, path=str(tmp_path), num_train=1000, num_validation=1000, num_test=1000,
              min_length=0, max_length=200)
  task = data.load_task(c)  # found under <path>/lra_release/listops-1000
  assert task.vocab_size == tokenizers.LISTOPS_VOCAB_SIZE == 17
  lra_vocabulary = _lra_vocabulary([s for s, _, _ in rows['validation']])
  assert len(lra_vocabulary) == 15  # 10 digits, 4 operators, 'X' for ']'
  # LRA's vocab_size: its words + padding + the out-of-vocabulary id (the largest id _lra_encode gives).
  assert task.vocab_size == len(lra_vocabulary) + 2
  # Our fixed order, in LRA's spelling of ']'.
  ours_in_lra_words = [w.replace(']', 'X') for w in tokenizers.LISTOPS_TOKENS]
  assert sorted(ours_in_lra_words) == sorted(lra_vocabulary)
  to_ours = {}  # LRA's id -> ours: LRA numbers its words in set order, so one fixed bijection
  for split, split_rows in rows.items():
    batch = getattr(task, split).get(np.arange(len(split_rows)))
    for (source, value, length), ids, mask, label in zip(split_rows, batch['inputs'], batch['mask'],
                                                          batch['labels']):
      ours = ids[mask].tolist()
      assert ours == _lra_encode(source, ours_in_lra_words)
      lra = _lra_encode(source, lra_vocabulary)
      assert len(ours) == len(lra) == length  # LRA's generator counts its tokens
      for a, b in zip(lra, ours):
        assert to_ours.setdefault(a, b) == b
      assert label == value
  assert len(set(to_ours.values())) == len(to_ours) == 15


def test_lra_tsv_caps_filters_and_caches(tmp_path, lra_dir, monkeypatch, caplog):
  folder, rows = lra_dir
  c = _config(tmp_path, path=str(folder), num_train=10, num_validation=1000, num_test=1000,
              min_length=30, max_length=100)
  with caplog.at_level(logging.INFO):
    task = data.load_task(c)
  lengths = {s: np.array([n for _, _, n in rows[s]]) for s in rows}
  keep = {s: ((n > 30) & (n < 100)).sum() for s, n in lengths.items()}
  assert (task.train.num_examples, task.validation.num_examples, task.test.num_examples) == (
      10, keep['validation'], keep['test'])
  assert any('not strictly between min_length 30' in r.getMessage() for r in caplog.records)
  encoded = {tuple(tokenizers.encode_listops(s)) for s, _, _ in rows['train']}
  batch = task.train.get(np.arange(10))
  for ids, mask in zip(batch['inputs'], batch['mask']):
    assert tuple(ids[mask]) in encoded and 30 < mask.sum() < 100
  monkeypatch.setattr(listops, 'read_tsv', lambda *a: pytest.fail('reread'))
  again = data.load_task(c).train.get(np.arange(10))
  np.testing.assert_array_equal(again['inputs'], batch['inputs'])


def test_lra_tsv_errors(tmp_path, lra_dir):
  folder, _ = lra_dir
  with pytest.raises(data.DataUnavailableError, match='basic_train.tsv.*lra_release.gz'):
    data.load_task(_config(tmp_path, path=str(tmp_path / 'absent')))
  with pytest.raises(ValueError, match='min_length'):  # no row fits
    data.load_task(_config(tmp_path, path=str(folder), min_length=150, max_length=200))
  bad = tmp_path / 'bad.tsv'
  bad.write_text('Source\tTarget\n[MAX 1 2 ]\t2\n[MAX 1 2 ] [FIRST 3 ]\t3\n')
  with pytest.raises(ValueError, match=r"bad.tsv:3: unknown token '\[FIRST'"):
    listops.read_tsv(str(bad))
  bad.write_text('[MAX 1 2 ]\t2\n')
  with pytest.raises(ValueError, match='header naming'):
    listops.read_tsv(str(bad))
  # Columns are found by name, blank lines skipped, as LRA's csv reader does.
  bad.write_text('Target\tSource\r\n7\t( ( ( [MAX 1 ) 7 ) ] )\r\n\r\n')
  flat, offsets, labels = listops.read_tsv(str(bad))
  assert tokenizers.decode_listops(flat) == ['[MAX', '1', '7', ']'] and labels.tolist() == [7]


def test_generated_lengths_are_lra_lengths(tmp_path):
  """The generator's trees, printed as LRA prints them, have LRA lengths strictly in the bounds."""
  c = _config(tmp_path, num_train=30, num_validation=5, num_test=5, min_length=30, max_length=90)
  splits = listops.generate_splits(c)
  listops.write_lra_files(splits, str(tmp_path / 'files'))
  with open(tmp_path / 'files' / 'basic_val.tsv', newline='') as f:
    val = [row[0] for row in list(csv.reader(f, delimiter='\t'))[1:]]
  vocabulary = _lra_vocabulary(val)
  for split, (flat, offsets, labels) in splits.items():
    with open(tmp_path / 'files' / listops.LRA_FILES[split], newline='') as f:
      written = list(csv.reader(f, delimiter='\t'))[1:]
    assert len(written) == len(labels)
    for (source, target), start, end, label in zip(written, offsets[:-1], offsets[1:], labels):
      lra = _lra_encode(source, vocabulary)
      assert 30 < len(lra) < 90 and len(lra) == end - start
      assert int(target) == label
    # Read back through `path`, the same ids.
    np.testing.assert_array_equal(listops.read_tsv(
        os.path.join(tmp_path, 'files', listops.LRA_FILES[split]))[0], flat)
