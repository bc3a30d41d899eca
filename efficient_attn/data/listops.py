"""ListOps (LRA): nested MIN / MAX / MED / SM expressions over digits; the label is the value.

Two sources, chosen by `config.data.path`:
- unset (the default): generated offline with the rules of the LRA generator (Tay et al. 2021,
  `lra_benchmarks/data/listops.py`): a node at depth < max_depth (the root has depth 1) is an
  operator with probability 0.25, else a digit 0-9; an operator takes 2..max_args arguments, each a
  subtree one level deeper; trees are drawn until enough have a length strictly between min_length
  and max_length. Operators: MIN, MAX, MED = int(median) (the floor of the mean of the two middle
  values for an even count, as `int(np.median(...))`), SM = sum mod 10.
- a folder: the LRA release's files `basic_train.tsv`, `basic_val.tsv`, `basic_test.tsv`
  (`lra_release/listops-1000`, or what the LRA generator writes), read as LRA's
  `lra_benchmarks/listops/input_pipeline.py` reads them: tab-separated with a header naming the
  columns `Source` (the expression, with the parentheses of printed nested tuples) and `Target`
  (the value). Each split keeps only the rows of length strictly between min_length and max_length
  (with the defaults 500 / 2000, every row of the release, which LRA's generator filtered the same
  way) and is then capped at num_train / num_validation / num_test (a seeded random subset).

Tokens are LRA's (tokenizers.py): parentheses dropped, one token per word, an operator with its
bracket: '( ( [MAX 2 ) 9 ) ] )' is the four tokens '[MAX', '2', '9', ']'. A length is a count of
these tokens, which is also the length the LRA generator filters on (2 per operator, 1 per digit).

Generated examples are unique across all three splits (train, then validation, then test are
drawn, each with its own seed `splits.split_seed(seed, split)`, skipping sequences already drawn),
as in the reference's set of trees. Generated splits and tokenised TSV files are cached as Arrow
(`datasets.save_to_disk`) under `<cache_dir>/listops/<key>`, the key a hash of every option that
changes the data (for files: their paths, sizes and modification times), so later runs load at
once.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
import uuid
from array import array

from absl import logging
import ml_collections
from ml_collections import config_dict
import numpy as np

from efficient_attn.data import sources, tokenizers
from efficient_attn.data.base import SPLITS, TaskData
from efficient_attn.data.registry import register_task
from efficient_attn.data.sources import DataUnavailableError
from efficient_attn.data.splits import (TokenSplit, check_count, check_labels, limit_examples,
                                        split_seed)

# Bump when the generator's output (or the tokenisation) for the same options changes: it is part of
# the cache key. 2: LRA's tokens ('[MAX' one token), lengths counted in them.
GENERATOR_VERSION = 2
# Bump when the TSV reader's output for the same files changes (part of the files' cache key).
READER_VERSION = 1
NUM_CLASSES = 10
# The LRA release's files (LRA's default task name 'basic') and where the release keeps them.
LRA_FILES = {'train': 'basic_train.tsv', 'validation': 'basic_val.tsv', 'test': 'basic_test.tsv'}
LRA_DIR = 'listops-1000'
LRA_URL = 'https://storage.googleapis.com/long-range-arena/lra_release.gz'

_OP_MIN, _OP_MAX, _OP_MED, _OP_SM = tokenizers.LISTOPS_OPERATOR_IDS
_CLOSE = tokenizers.LISTOPS_CLOSE_ID
_DIGIT = tokenizers.LISTOPS_DIGIT_OFFSET


def listops_data_config(quick: bool = False, tiny: bool = False) -> ml_collections.ConfigDict:
  """Data options of ListOps; defaults are the LRA release (96K / 2K / 2K, lengths 500-2000).

  quick: 2000 / 200 / 200 trees of 100-500 tokens (seconds); tiny: 200 / 50 / 50 of those.
  """
  c = ml_collections.ConfigDict()
  c.task = 'listops'
  c.cache_dir = 'data_cache'  # generated and read splits are cached under <cache_dir>/listops/
  # A folder with LRA's basic_{train,val,test}.tsv (lra_release/listops-1000, or its parent). Unset:
  # generate. With files, num_* cap each split and min/max_length filter rows; the generator's other
  # options are then unused.
  c.path = config_dict.placeholder(str)
  c.seed = 0  # per-split generator seeds are derived from it
  # LRA: 96K train / 2K validation / 2K test (the sizes of its release).
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
  if c.get('path') is not None and not isinstance(c.path, str):
    raise ValueError(f'listops: config.data.path must be a folder holding '
                     f'{", ".join(LRA_FILES.values())} (or unset, to generate), got {c.path!r}.')
  if c.get('path'):
    return  # the generator's options below are not used
  longest = 1  # the longest tree possible: every node above max_depth an operator with max_args
  for _ in range(c.max_depth - 1):
    longest = 2 + c.max_args * longest  # '[OP', the arguments, ']'
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
    out.append(op)  # '[MIN' etc.: the operator and its bracket are one token, as in LRA
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
  """The generated splits of config `c` from the cache, generating and caching them on a miss."""
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


# --- The LRA release's TSV files ------------------------------------------------------------------

_WHITESPACE = np.zeros(256, bool)
_WHITESPACE[list(b' \t\n\r\x0b\x0c')] = True
_KEY_WIDTH = 4  # the longest token ('[MIN') has 4 bytes; shorter ones are keyed padded with spaces
_KEYS = np.array([int.from_bytes(tok.encode().ljust(_KEY_WIDTH), 'little')
                  for tok in tokenizers.LISTOPS_TOKENS], np.uint32)
_KEY_ORDER = np.argsort(_KEYS)
_CHUNK_ROWS = 2048  # rows tokenised per numpy pass: bounds the temporaries (~100 MB)


def _tokenize_rows(sources_: list[str], *, path: str, line_numbers: list[int]
                   ) -> tuple[np.ndarray, np.ndarray]:
  """LRA's token ids of expressions: (flat uint8 ids, int64 lengths [n]); ValueError for a word that
  is not a ListOps token or an empty row, naming the file and line.

  Vectorised over all rows at once (Python per token would take minutes for the 100M tokens of the
  release): parentheses are deleted as LRA does, and each whitespace-separated word is looked up by
  its first four bytes and its length.
  """
  blob = '\n'.join(sources_).encode('utf-8').translate(None, b'()')
  n = len(blob)
  raw = np.frombuffer(blob + b' ' * _KEY_WIDTH, np.uint8)
  space = _WHITESPACE[raw]
  word = ~space[:n]
  starts = np.flatnonzero(word & np.concatenate([[True], space[:n - 1]]))
  ends = np.flatnonzero(word & space[1:n + 1]) + 1
  lengths = ends - starts
  window = raw[starts[:, None] + np.arange(_KEY_WIDTH)]
  window = np.where(np.arange(_KEY_WIDTH) < lengths[:, None], window, ord(' ')).astype(np.uint32)
  keys = (window << (8 * np.arange(_KEY_WIDTH, dtype=np.uint32))).sum(axis=1, dtype=np.uint32)
  pos = np.minimum(np.searchsorted(_KEYS[_KEY_ORDER], keys), len(_KEYS) - 1)
  index = _KEY_ORDER[pos]
  known = (_KEYS[index] == keys) & (lengths <= _KEY_WIDTH)
  newlines = np.concatenate([[0], np.cumsum(raw[:n] == ord('\n'))])
  row_of = newlines[starts]  # the row of each word: the newlines before it
  if not known.all():
    bad = int(np.flatnonzero(~known)[0])
    text = blob[starts[bad]:ends[bad]].decode('utf-8', 'replace')
    raise ValueError(f'listops: {path}:{line_numbers[row_of[bad]]}: unknown token {text[:30]!r} in '
                     f'the Source column; valid tokens: {" ".join(tokenizers.LISTOPS_TOKENS)}.')
  counts = np.bincount(row_of, minlength=len(sources_)).astype(np.int64)
  if counts.size and counts.min() == 0:
    raise ValueError(f'listops: {path}:{line_numbers[int(np.argmin(counts))]}: empty Source.')
  return (index + tokenizers.LISTOPS_DIGIT_OFFSET).astype(np.uint8), counts


def _parse_target(text: str, path: str, line_no: int) -> int:
  try:
    return int(text)
  except ValueError:
    raise ValueError(f'listops: {path}:{line_no}: Target {text[:20]!r} is not an integer '
                     '0..9.') from None


def read_tsv(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One LRA ListOps TSV file: (flat uint8 token ids, int64 offsets [n + 1], uint8 labels [n]).

  Read as LRA's input pipeline does (a csv file with tab delimiters and a header naming `Source` and
  `Target`, in any order and among other columns); blank lines are skipped.
  """
  sources_, labels, lines = [], [], []
  flats, counts = [], []
  with open(path, newline='', encoding='utf-8') as f:
    reader = csv.reader(f, delimiter='\t')
    header = next(reader, None)
    if not header or 'Source' not in header or 'Target' not in header:
      raise ValueError(f'listops: {path}: the first line must be the header naming the '
                       f'tab-separated columns Source and Target (as LRA writes it), got '
                       f'{header!r}.')
    source_col, target_col = header.index('Source'), header.index('Target')
    for row in reader:
      if not row or not ''.join(row).strip():
        continue
      if len(row) != len(header):
        raise ValueError(f'listops: {path}:{reader.line_num}: {len(row)} tab-separated fields, '
                         f'the header has {len(header)}.')
      sources_.append(row[source_col])
      labels.append(_parse_target(row[target_col], path, reader.line_num))
      lines.append(reader.line_num)
      if len(sources_) == _CHUNK_ROWS or len(labels) == 1:  # the first row alone: fail fast
        flat, count = _tokenize_rows(sources_, path=path, line_numbers=lines)
        flats.append(flat)
        counts.append(count)
        sources_, lines = [], []
  if sources_:
    flat, count = _tokenize_rows(sources_, path=path, line_numbers=lines)
    flats.append(flat)
    counts.append(count)
  if not labels:
    raise ValueError(f'listops: {path} holds no examples.')
  offsets = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
  labels = check_labels(np.asarray(labels, np.int64), task='listops', num_classes=NUM_CLASSES)
  return np.concatenate(flats), offsets, labels


def find_lra_dir(path: str) -> str:
  """The folder under `path` (itself, `listops-1000/` or `lra_release/listops-1000/`) holding LRA's
  three ListOps files; if none, DataUnavailableError (one line: what to download, where to put it).
  """
  root = os.path.expanduser(path)
  candidates = [root, os.path.join(root, LRA_DIR), os.path.join(root, 'lra_release', LRA_DIR)]
  for folder in candidates:
    if all(os.path.isfile(os.path.join(folder, name)) for name in LRA_FILES.values()):
      return folder
  missing = [n for n in LRA_FILES.values() if not os.path.isfile(os.path.join(root, n))]
  dest = os.path.abspath(root)
  raise DataUnavailableError(
      f'listops: missing {", ".join(missing)} in {dest!r} (also looked in {LRA_DIR}/ and '
      f'lra_release/{LRA_DIR}/ there). These are the LRA release files: on a machine with network '
      f'access run `curl {LRA_URL} -o lra_release.tar.gz && tar xzf lra_release.tar.gz` and copy '
      f'lra_release/{LRA_DIR} here as {dest} (or set config.data.path to the folder holding the '
      f'files; unset it to generate ListOps instead).')


def _files_key(folder: str) -> str:
  """A hash of what identifies the files' content cheaply: their paths, sizes and mtimes."""
  fields = {'version': READER_VERSION, 'tokens': list(tokenizers.LISTOPS_TOKENS)}
  for split, name in LRA_FILES.items():
    stat = os.stat(os.path.join(folder, name))
    fields[split] = [os.path.abspath(os.path.join(folder, name)), stat.st_size, stat.st_mtime_ns]
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def load_lra_files(c) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Every row of the TSV files under `c.path`, tokenised (cached under <cache_dir>/listops/)."""
  folder = find_lra_dir(c.path)
  path = os.path.join(os.path.expanduser(c.cache_dir), 'listops', f'lra-{_files_key(folder)}')
  with sources.quiet_datasets():
    if os.path.isdir(path):
      return _load(path)
    logging.info('ListOps: tokenising %s; caching at %s', folder, path)
    splits = {split: read_tsv(os.path.join(folder, name)) for split, name in LRA_FILES.items()}
    _save(splits, path)
  return splits


def select_rows(flat: np.ndarray, offsets: np.ndarray, labels: np.ndarray, keep: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The rows at sorted indices `keep` of ragged rows (flat values, offsets [n + 1], labels [n])."""
  lengths = np.diff(offsets)
  mask = np.zeros(lengths.size, bool)
  mask[keep] = True
  if mask.all():
    return flat, offsets, labels
  flat = flat[np.repeat(mask, lengths)]
  return flat, np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int64), labels[keep]


def _filter_files(c, splits):
  """Rows of min_length < length < max_length, then each split capped at num_<split>."""
  out = {}
  for tag, (split, (flat, offsets, labels)) in enumerate(splits.items()):
    lengths = np.diff(offsets)
    fits = np.flatnonzero((lengths > c.min_length) & (lengths < c.max_length))
    if fits.size < lengths.size:
      logging.info('ListOps: %d of %d %s rows of %s are not strictly between min_length %d and '
                   'max_length %d tokens; skipped.', lengths.size - fits.size, lengths.size, split,
                   LRA_FILES[split], c.min_length, c.max_length)
    if not fits.size:
      raise ValueError(
          f'listops: no {split} row of {c.path} is strictly between config.data.min_length='
          f'{c.min_length} and config.data.max_length={c.max_length} tokens (its rows have '
          f'{lengths.min()}..{lengths.max()}); set them to include the files\' lengths.')
    keep = limit_examples(fits, int(c[f'num_{split}']), int(c.seed), tag)
    out[split] = select_rows(flat, offsets, labels, keep)
  return out


def _tokens_with_parentheses(ids: np.ndarray) -> list[str]:
  """The words LRA's generator prints for the tree of token ids `ids` (its `to_string`): an operator
  node with arguments A1..An is '( ' * (n + 1) + '[OP A1 ) A2 ) ... An ) ] )'."""
  stack: list[list] = [[None, []]]  # [operator token, token lists of its arguments so far]
  for i in ids.tolist():
    token = tokenizers.LISTOPS_TOKENS[i - 1]
    if i in tokenizers.LISTOPS_OPERATOR_IDS:
      stack.append([token, []])
    elif i == _CLOSE:
      op, args = stack.pop()
      words = ['('] * (len(args) + 1) + [op]
      for arg in args:
        words += arg + [')']
      stack[-1][1].append(words + [']', ')'])
    else:
      stack[-1][1].append([token])
  if len(stack) != 1 or len(stack[0][1]) != 1:
    raise ValueError('Token ids do not form one ListOps tree.')
  return stack[0][1][0]


def write_lra_files(splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                    folder: str) -> None:
  """Writes splits (as `generate_splits` returns them) as LRA's generator writes its files:
  `<folder>/basic_{train,val,test}.tsv`, readable by LRA's own input pipeline and by `path`."""
  os.makedirs(folder, exist_ok=True)
  for split, (flat, offsets, labels) in splits.items():
    with open(os.path.join(folder, LRA_FILES[split]), 'w', newline='', encoding='utf-8') as f:
      writer = csv.writer(f, delimiter='\t')  # csv's default '\r\n' line ends, as LRA's files
      writer.writerow(['Source', 'Target'])
      for start, end, label in zip(offsets[:-1], offsets[1:], labels):
        writer.writerow([' '.join(_tokens_with_parentheses(flat[start:end])), int(label)])


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
  """ListOps TaskData: inputs [N, max_length] ListOps ids (LRA's tokens), labels in 0..9."""
  check_data_config(c)
  splits = _filter_files(c, load_lra_files(c)) if c.path else load_or_generate(c)
  built = {}
  for split, (flat, offsets, labels) in splits.items():
    codes, lengths = pad_rows(flat, offsets, c.max_length)
    built[split] = TokenSplit(codes, lengths, labels, offset=0)
  return TaskData(train=built['train'], validation=built['validation'], test=built['test'],
                  vocab_size=tokenizers.LISTOPS_VOCAB_SIZE, num_classes=NUM_CLASSES,
                  kind='classify', max_length=c.max_length)
