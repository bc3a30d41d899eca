"""ListOps (LRA): nested MIN / MAX / MED / SM expressions over digits; the label is the value.

The generator follows the Long Range Arena one (Tay et al. 2021, `lra_benchmarks/data/listops.py`): a
node at depth < max_depth (the root has depth 1) is an operator with probability 0.25, else a digit
0-9; an operator takes 2..max_args arguments, each a subtree one level deeper; trees are drawn until
enough have a token length strictly between min_length and max_length (the reference's rejection
rule). Operators: MIN, MAX, MED = int(median) (the floor of the mean of the two middle values for an
even count, as `int(np.median(...))`), SM = sum mod 10.

Tokens (see tokenizers.py) keep both brackets: '[MAX 2 9 ]' is the five tokens '[', 'MAX', '2', '9',
']'. The reference counts '[MAX' as one token, so for the same bounds our sequences are a little
shorter in nodes (by one token per operator); the bounds apply to the length the model sees.

Examples are unique across all three splits (train, then validation, then test are drawn, each with its
own seed `splits.split_seed(seed, split)`, skipping sequences already drawn), as in the reference's set
of trees.
Generated splits are cached as Arrow (`datasets.save_to_disk`) under `<cache_dir>/listops/<key>`, the
key a hash of every option that changes the data, so later runs load instead of regenerating.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from array import array

from absl import logging
import ml_collections
import numpy as np

from efficient_attn.data import sources, tokenizers
from efficient_attn.data.base import SPLITS, TaskData
from efficient_attn.data.registry import register_task
from efficient_attn.data.splits import TokenSplit, check_count, split_seed

# Bump when the generator's output for the same options changes: it is part of the cache key.
GENERATOR_VERSION = 1
NUM_CLASSES = 10

_OP_MIN, _OP_MAX, _OP_MED, _OP_SM = tokenizers.LISTOPS_OPERATOR_IDS
_OPEN = tokenizers.LISTOPS_OPEN_ID
_CLOSE = tokenizers.LISTOPS_CLOSE_ID
_DIGIT = tokenizers.LISTOPS_DIGIT_OFFSET


def listops_data_config(quick: bool = False, tiny: bool = False) -> ml_collections.ConfigDict:
  """Data options of ListOps; defaults are the LRA release (96K / 2K / 2K, lengths 500-2000).

  quick: 2000 / 200 / 200 trees of 100-500 tokens (seconds); tiny: 200 / 50 / 50 of those.
  """
  c = ml_collections.ConfigDict()
  c.task = 'listops'
  c.cache_dir = 'data_cache'  # generated splits are cached under <cache_dir>/listops/
  c.seed = 0  # per-split generator seeds are derived from it
  # LRA: 96K train / 2K validation / 2K test.
  c.num_train = 96_000
  c.num_validation = 2_000
  c.num_test = 2_000
  # LRA keeps trees with min_length < length < max_length tokens, padded to max_length = 2000.
  c.min_length = 500
  c.max_length = 2_000
  c.max_depth = 10  # LRA: depth of the deepest node; the root has depth 1
  c.max_args = 10  # LRA: each operator has 2..max_args arguments
  c.branch_probability = 0.25  # LRA VALUE_P: chance that a node above max_depth is an operator
  if quick or tiny:
    # A CPU smoke test: generated in a few seconds.
    c.num_train = 2_000
    c.num_validation = 200
    c.num_test = 200
    c.min_length = 100
    c.max_length = 500
  if tiny:
    c.num_train, c.num_validation, c.num_test = 200, 50, 50
  return c


def check_data_config(c) -> None:
  """Raises ValueError naming the first invalid ListOps option (`c` holds every option); generates
  nothing."""
  for name in ('num_train', 'num_validation', 'num_test', 'max_depth', 'max_length'):
    check_count(c[name], name=name, minimum=1, task='listops')
  check_count(c.min_length, name='min_length', minimum=0, task='listops')
  if c.max_length - c.min_length < 2:
    raise ValueError(f'listops: need min_length + 1 < max_length (lengths are strictly between), got '
                     f'min_length={c.min_length}, max_length={c.max_length}.')
  check_count(c.max_args, name='max_args', minimum=2, task='listops')
  if not 0.0 < float(c.branch_probability) < 1.0:
    raise ValueError(f'listops: branch_probability must be in (0, 1), got {c.branch_probability!r}.')
  check_count(c.seed, name='seed', minimum=0, task='listops')
  longest = 1  # the longest tree possible: every node above max_depth an operator with max_args
  for _ in range(c.max_depth - 1):
    longest = 3 + c.max_args * longest
    if longest > c.min_length:
      break  # long enough; a huge max_depth must not loop for ever
  if longest <= c.min_length:
    raise ValueError(f'listops: no tree of max_depth {c.max_depth} and max_args {c.max_args} is '
                     f'longer than min_length {c.min_length} (the longest has {longest} tokens).')


class _TooLong(Exception):
  """Aborts a tree as soon as it reaches max_length: unbounded trees can have billions of nodes."""


def _apply(op: int, args: list[int]) -> int:
  if op == _OP_MIN:
    return min(args)
  if op == _OP_MAX:
    return max(args)
  if op == _OP_SM:
    return sum(args) % 10
  s = sorted(args)
  n = len(s)
  return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2  # int(np.median) of digits


def _grow(rng: random.Random, depth: int, out: array, max_depth: int, max_args: int,
          branch_probability: float, limit: int) -> int:
  """Appends the tokens of a random subtree at `depth` to `out`; returns its value."""
  if depth < max_depth and rng.random() < branch_probability:
    num_args = rng.randint(2, max_args)
    op = _OP_MIN + rng.randrange(4)
    out.append(_OPEN)
    out.append(op)
    args = [_grow(rng, depth + 1, out, max_depth, max_args, branch_probability, limit)
            for _ in range(num_args)]
    out.append(_CLOSE)
    if len(out) >= limit:
      raise _TooLong
    return _apply(op, args)
  value = rng.randrange(10)
  out.append(value + _DIGIT)
  return value


def generate_example(rng: random.Random, *, min_length: int, max_length: int, max_depth: int = 10,
                     max_args: int = 10, branch_probability: float = 0.25) -> tuple[array, int]:
  """Draws trees from `rng` until one has min_length < length < max_length: (token ids, value)."""
  while True:
    out = array('B')
    try:
      value = _grow(rng, 1, out, max_depth, max_args, branch_probability, max_length)
    except _TooLong:
      continue
    if min_length < len(out) < max_length:
      return out, value


def generate_splits(c) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Generates all splits: {split: (flat uint8 token ids, int64 offsets [n + 1], uint8 labels [n])}.

  Row i of a split is ids[offsets[i]:offsets[i + 1]]. Sequences are unique across the splits.
  """
  check_data_config(c)
  seen: set[bytes] = set()
  result = {}
  for split in SPLITS:
    want = c[f'num_{split}']
    rng = random.Random(split_seed(c.seed, split))
    flat = array('B')
    offsets = [0]
    labels = array('B')
    while len(labels) < want:
      tokens, value = generate_example(
          rng, min_length=c.min_length, max_length=c.max_length, max_depth=c.max_depth,
          max_args=c.max_args, branch_probability=float(c.branch_probability))
      digest = hashlib.blake2b(tokens.tobytes(), digest_size=16).digest()
      if digest in seen:
        continue
      seen.add(digest)
      flat.extend(tokens)
      offsets.append(len(flat))
      labels.append(value)
    result[split] = (np.frombuffer(flat, np.uint8).copy(), np.asarray(offsets, np.int64),
                     np.frombuffer(labels, np.uint8).copy())
  return result


def cache_key(c) -> str:
  """A hash of every option that changes the generated data (and the generator version)."""
  fields = {name: c[name] for name in ('seed', 'num_train', 'num_validation', 'num_test', 'min_length',
                                       'max_length', 'max_depth', 'max_args')}
  fields['branch_probability'] = float(c.branch_probability)
  fields['version'] = GENERATOR_VERSION
  blob = json.dumps(fields, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def cache_path(c) -> str:
  return os.path.join(os.path.expanduser(c.cache_dir), 'listops', cache_key(c))


def _save(splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: str) -> None:
  """Writes the splits as a DatasetDict to `path` atomically (a temp folder, then one rename)."""
  import datasets  # pylint: disable=g-import-not-at-top
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  features = datasets.Features({'tokens': datasets.Sequence(datasets.Value('uint8')),
                                'label': datasets.Value('uint8')})
  dd = datasets.DatasetDict()
  for split, (flat, offsets, labels) in splits.items():
    # Arrow list arrays straight from (offsets, values): no Python lists of 96K x 1000 ints.
    tokens = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat))
    dd[split] = datasets.Dataset.from_dict({'tokens': tokens, 'label': pa.array(labels)},
                                           features=features)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp-{uuid.uuid4().hex}'
  dd.save_to_disk(tmp)
  try:
    os.rename(tmp, path)
  except OSError:
    # Another process finished the same data first; its copy is identical.
    shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.isdir(path):
      raise


def _load(path: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  import datasets  # pylint: disable=g-import-not-at-top
  dd = datasets.load_from_disk(path)
  out = {}
  for split in SPLITS:
    table = dd[split].data.table
    tokens = table.column('tokens').combine_chunks()
    offsets = tokens.offsets.to_numpy().astype(np.int64)
    # flatten() (unlike .values) honours a sliced array's start, hence offsets - offsets[0].
    out[split] = (tokens.flatten().to_numpy(zero_copy_only=False).astype(np.uint8, copy=False),
                  offsets - offsets[0], table.column('label').to_numpy().astype(np.uint8))
  return out


def load_or_generate(c) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """The splits of config `c` from the cache, generating and caching them on a miss."""
  check_data_config(c)
  path = cache_path(c)
  with sources.quiet_datasets():
    if os.path.isdir(path):
      return _load(path)
    logging.info('Generating ListOps (%d / %d / %d examples); caching at %s', c.num_train,
                 c.num_validation, c.num_test, path)
    splits = generate_splits(c)
    _save(splits, path)
  return splits


def pad_rows(flat: np.ndarray, offsets: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Ragged rows (flat values + offsets) to (codes [n, width] zero-padded, lengths int32 [n])."""
  lengths = np.diff(offsets).astype(np.int32)
  if lengths.size and lengths.max() > width:
    raise ValueError(f'A row of length {lengths.max()} does not fit width {width}.')
  codes = np.zeros((lengths.size, width), flat.dtype)
  # A boolean-mask assignment fills the True cells in row-major order, i.e. row by row from the
  # flat values (index arrays would take 8 bytes per token: 800 MB for ListOps' 100M tokens).
  codes[np.arange(width) < lengths[:, None]] = flat
  return codes, lengths


@register_task('listops', config=listops_data_config)
def load_listops(c) -> TaskData:
  """ListOps TaskData: inputs [N, max_length] ListOps ids, labels in 0..9."""
  splits = load_or_generate(c)
  built = {}
  for split, (flat, offsets, labels) in splits.items():
    codes, lengths = pad_rows(flat, offsets, c.max_length)
    built[split] = TokenSplit(codes, lengths, labels, offset=0)
  return TaskData(train=built['train'], validation=built['validation'], test=built['test'],
                  vocab_size=tokenizers.LISTOPS_VOCAB_SIZE, num_classes=NUM_CLASSES,
                  kind='classify', max_length=c.max_length)
