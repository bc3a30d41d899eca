"""Byte-level language modelling: predict each next byte of a corpus.

Corpora (`data_config.corpus`):
  'python_stdlib' (default, always available offline): the `.py` files of the running Python's standard
    library (`sysconfig.get_paths()['stdlib']`, without site-packages), in sorted path order, joined.
    It differs between Python versions: compare numbers only within one version.
  'enwik8': the first 10^8 bytes of a 2006 English Wikipedia dump, split as usual into the first 90M /
    next 5M / last 5M bytes.
  'files': a local text file, or every file of a folder (sorted, optionally filtered by suffix).
The non-enwik8 corpora are split 90 / 5 / 5 by bytes, in order.

Examples are windows of `max_length` input bytes whose labels are the next bytes (ids = byte + 1).
Validation/test windows are non-overlapping and cover the split (the last one shorter and padded), so
each byte after the first is predicted exactly once; 'mask' is True where the position has a next byte
to predict, which makes `mask.sum()` the byte count for `bits_per_byte`. Training windows start at
i * max_length + u_i with u_i a seeded uniform offset in [0, max_length): random alignment, yet
deterministic and covering the split.
"""
from __future__ import annotations

import math
import os
import sysconfig
import zipfile

import ml_collections
import numpy as np
from ml_collections import config_dict

from efficient_attn.data import sources, tokenizers
from efficient_attn.data.base import TaskData
from efficient_attn.data.registry import register_task
from efficient_attn.data.splits import check_count, check_indices

CORPORA = ('python_stdlib', 'enwik8', 'files')
ENWIK8_BYTES = 100_000_000
ENWIK8_URL = 'http://mattmahoney.net/dc/enwik8.zip'
_SKIPPED_STDLIB_DIRS = frozenset({'site-packages', 'dist-packages', '__pycache__'})


def lm_data_config(quick: bool = False, tiny: bool = False) -> ml_collections.ConfigDict:
  """Data options of byte-level LM; defaults: the Python standard library, 1024-byte windows.

  quick: 256-byte windows over the first 2 MB; tiny: over the first 200 KB.
  """
  c = ml_collections.ConfigDict()
  c.task = 'lm'
  c.corpus = 'python_stdlib'  # one of CORPORA
  # enwik8: the enwik8 file or enwik8.zip (unset: <cache_dir>/enwik8 or <cache_dir>/enwik8.zip if
  # present, else the Hub); files: a text file or a folder. Unused for python_stdlib.
  c.path = config_dict.placeholder(str)
  c.cache_dir = 'data_cache'
  c.hf_name = 'LTCB/enwik8'  # enwik8 on the Hub (its 'enwik8-raw' config is the file as one string)
  c.hf_config = 'enwik8-raw'
  c.file_suffixes = ()  # 'files' folders: only files ending in one of these; empty: all files
  # python_stdlib / files: keep only the first max_bytes bytes before splitting; unset: everything.
  c.max_bytes = config_dict.placeholder(int)
  c.max_length = 1024  # bytes per window (Transformer-XL-style enwik8 models use 512..1024)
  c.seed = 0  # seeds the training window offsets
  if quick or tiny:
    c.max_length = 256
    c.max_bytes = 200_000 if tiny else 2_000_000
  return c


def bits_per_byte(total_nll_nats: float, num_bytes: int) -> float:
  """Bits per byte of a summed negative log-likelihood in nats over `num_bytes` predicted bytes."""
  if num_bytes <= 0:
    raise ValueError(f'num_bytes must be positive, got {num_bytes}.')
  return float(total_nll_nats) / (num_bytes * math.log(2.0))


class LMSplit:
  """Windows into a byte array: window i starts at starts[i] and spans up to max_length + 1 bytes."""

  def __init__(self, data: np.ndarray, starts: np.ndarray, max_length: int):
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 1:
      raise ValueError(f'data must be a 1-D uint8 array, got {data.dtype} {data.shape}.')
    starts = np.asarray(starts, np.int64)
    if starts.size and (starts.min() < 0 or starts.max() >= data.size - 1):
      raise ValueError(f'window starts must be in [0, {data.size - 1}).')
    self.data = data
    self.starts = starts
    self.max_length = int(max_length)
    self.num_examples = int(starts.size)

  @property
  def num_predicted_bytes(self) -> int:
    """How many (input, next byte) pairs the windows hold: the mask total over all examples."""
    ends = np.minimum(self.starts + self.max_length, self.data.size - 1)
    return int((ends - self.starts).sum())

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """{'inputs', 'labels': int32 [k, max_length] byte ids; 'mask': bool [k, max_length]}."""
    idx = check_indices(indices, self.num_examples)
    pos = self.starts[idx, None] + np.arange(self.max_length)  # [k, L] input positions
    mask = pos + 1 < self.data.size  # the position has a next byte
    safe = np.where(mask, pos, 0)
    inputs = np.where(mask, self.data[safe].astype(np.int32) + tokenizers.BYTE_OFFSET, 0)
    labels = np.where(mask, self.data[safe + 1].astype(np.int32) + tokenizers.BYTE_OFFSET, 0)
    return {'inputs': inputs.astype(np.int32), 'mask': mask, 'labels': labels.astype(np.int32)}


def train_starts(num_bytes: int, max_length: int, seed: int) -> np.ndarray:
  """Stratified random window starts: i * max_length + u_i, u_i uniform in [0, max_length)."""
  num = num_bytes // max_length - 1  # so that the last window (+1 label byte) stays inside
  if num < 1:
    raise ValueError(f'lm: the training split has {num_bytes} bytes; it needs at least '
                     f'2 * max_length = {2 * max_length}.')
  rng = np.random.default_rng([int(seed), 0x1B7E])
  return np.arange(num, dtype=np.int64) * max_length + rng.integers(0, max_length, num)


def eval_starts(num_bytes: int, max_length: int) -> np.ndarray:
  """Non-overlapping windows covering every predicted byte: starts 0, L, 2L, ... < num_bytes - 1."""
  if num_bytes < 2:
    raise ValueError(f'lm: an evaluation split has {num_bytes} bytes; it needs at least 2.')
  return np.arange(0, num_bytes - 1, max_length, dtype=np.int64)


def stdlib_files(root: str | None = None) -> list[str]:
  """The standard library's .py files, sorted by path relative to `root` (site-packages excluded)."""
  root = root or sysconfig.get_paths()['stdlib']
  found = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d not in _SKIPPED_STDLIB_DIRS]
    found += [os.path.relpath(os.path.join(folder, f), root) for f in files if f.endswith('.py')]
  return [os.path.join(root, rel) for rel in sorted(p.replace(os.sep, '/') for p in found)]


def _join_files(paths: list[str], max_bytes: int | None) -> np.ndarray:
  chunks, total = [], 0
  for path in paths:
    if max_bytes is not None and total >= max_bytes:
      break
    with open(path, 'rb') as f:
      chunk = f.read()
    chunks.append(chunk)
    total += len(chunk)
  data = np.frombuffer(b''.join(chunks), np.uint8)
  return data[:max_bytes] if max_bytes is not None else data


def _local_files(c) -> list[str]:
  if not c.path:
    raise ValueError("lm: corpus 'files' needs config.data.path (a text file or a folder).")
  path = os.path.expanduser(c.path)
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise sources.DataUnavailableError(f'lm: no file or folder at {path!r} (config.data.path).')
  suffixes = tuple(c.file_suffixes)
  found = []
  for folder, dirs, files in os.walk(path):
    dirs.sort()
    found += [os.path.join(folder, f) for f in files if not suffixes or f.endswith(suffixes)]
  found = sorted(found, key=lambda p: os.path.relpath(p, path).replace(os.sep, '/'))
  if not found:
    raise sources.DataUnavailableError(
        f'lm: the folder {path!r} has no files{" ending in " + str(suffixes) if suffixes else ""}.')
  return found


def _enwik8_message(dest: str) -> str:
  return (f'To provide enwik8, run `curl -O {ENWIK8_URL}` on a machine with '
          f'network access and copy enwik8.zip to {os.path.abspath(dest)} (picked up automatically; '
          f'unzipped enwik8 there works too), or set config.data.path to the file.')


def read_enwik8(c) -> np.ndarray:
  """The 10^8 bytes of enwik8 from config.data.path, <cache_dir>, or the Hub."""
  cache = os.path.expanduser(c.cache_dir)
  candidates = [os.path.expanduser(c.path)] if c.path else [
      os.path.join(cache, 'enwik8'), os.path.join(cache, 'enwik8.zip')]
  for path in candidates:
    if not os.path.isfile(path):
      continue
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
        if 'enwik8' not in names:
          raise ValueError(f'lm: {path} holds {names}, not enwik8.')
        raw = z.read('enwik8')
    else:
      with open(path, 'rb') as f:
        raw = f.read()
    break
  else:
    if c.path:
      raise sources.DataUnavailableError(f'lm: no file at {c.path!r}. ' + _enwik8_message(cache))
    with sources.quiet_datasets():
      raw_ds = sources.load_hub_splits(c.hf_name, ('train',), task='lm', hf_config=c.hf_config,
                                       hint=_enwik8_message(cache))['train']
      raw = ''.join(sources.column_values(raw_ds, 'text', task='lm')).encode('utf-8')
  if len(raw) != ENWIK8_BYTES:
    raise ValueError(f'lm: enwik8 must have {ENWIK8_BYTES} bytes, got {len(raw)}; use the original '
                     f'file from {ENWIK8_URL}.')
  return np.frombuffer(raw, np.uint8)


def check_data_config(c) -> None:
  """Raises ValueError naming the first invalid LM option (`c` holds every option); reads nothing."""
  if c.corpus not in CORPORA:
    raise ValueError(f'lm: unknown corpus {c.corpus!r}; valid corpora: {", ".join(CORPORA)}.')
  if c.max_bytes is not None and (isinstance(c.max_bytes, bool) or not isinstance(c.max_bytes, int)
                                  or c.max_bytes < 1):
    raise ValueError(f'lm: max_bytes must be unset or a positive integer, got {c.max_bytes!r}.')
  if c.corpus == 'enwik8' and c.max_bytes is not None:
    raise ValueError('lm: max_bytes does not apply to enwik8, whose split is fixed at '
                     '90M / 5M / 5M bytes; unset it.')
  check_count(c.max_length, name='max_length', minimum=1, task='lm')
  check_count(c.seed, name='seed', minimum=0, task='lm')


def read_corpus(c) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(train, validation, test) byte arrays (uint8) of config `c`."""
  check_data_config(c)
  if c.corpus == 'enwik8':
    data = read_enwik8(c)
    a, b = 90_000_000, 95_000_000
  else:
    paths = stdlib_files() if c.corpus == 'python_stdlib' else _local_files(c)
    data = _join_files(paths, c.max_bytes)
    a, b = data.size * 90 // 100, data.size * 95 // 100
  return data[:a], data[a:b], data[b:]


@register_task('lm', config=lm_data_config)
def load_lm(c) -> TaskData:
  """LM TaskData: inputs and labels int32 [N, max_length] byte ids (labels = the next bytes)."""
  train, validation, test = read_corpus(c)
  length = c.max_length
  return TaskData(
      train=LMSplit(train, train_starts(train.size, length, c.seed), length),
      validation=LMSplit(validation, eval_starts(validation.size, length), length),
      test=LMSplit(test, eval_starts(test.size, length), length),
      vocab_size=tokenizers.BYTE_VOCAB_SIZE, num_classes=tokenizers.BYTE_VOCAB_SIZE, kind='lm',
      max_length=length)
