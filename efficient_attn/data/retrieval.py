"""Retrieval (LRA): do two ACL Anthology Network papers cite one another? Bytes, 4K per document.

Reads the LRA release's TSV files `new_aan_pairs.{train,eval,test}.tsv` (147,086 / 18,090 / 17,437
pairs), one pair a line: `label \\t id1 \\t id2 \\t text1 \\t text2`, no quoting (as the reference reads
them). Both documents are bytes (id = byte + 1) truncated or padded to `max_length`; inputs are
[N, 2, max_length] (kind 'pair': the model encodes both with one encoder).
"""
from __future__ import annotations

import os

import ml_collections
import numpy as np
from ml_collections import config_dict

from efficient_attn.data import tokenizers
from efficient_attn.data.base import TaskData
from efficient_attn.data.registry import register_task
from efficient_attn.data.sources import DataUnavailableError
from efficient_attn.data.splits import (TokenSplit, check_count, check_shared_options,
                                         limit_examples)

NUM_CLASSES = 2
FILES = {'train': 'new_aan_pairs.train.tsv', 'validation': 'new_aan_pairs.eval.tsv',
         'test': 'new_aan_pairs.test.tsv'}
LRA_URL = 'https://storage.googleapis.com/long-range-arena/lra_release.gz'


def retrieval_data_config(quick: bool = False, tiny: bool = False) -> ml_collections.ConfigDict:
  """Data options of Retrieval; defaults follow the LRA repo (bytes, 4000 per document).

  quick: 512 bytes, at most 2000 pairs per split; tiny: 512 bytes, 200 pairs.
  """
  c = ml_collections.ConfigDict()
  c.task = 'retrieval'
  # Folder with the three new_aan_pairs.*.tsv files. Unset: <cache_dir>/aan.
  c.path = config_dict.placeholder(str)
  c.cache_dir = 'data_cache'
  c.max_length = 4_000  # LRA repo config: 4000 bytes per document
  c.add_cls = False  # prepend a CLS id (257; vocabulary 258) to each document
  c.seed = 0  # seeds max_examples subsets
  c.max_examples = config_dict.placeholder(int)  # cap per split (seeded random subset); unset: all
  if quick or tiny:
    c.max_length = 512
    c.max_examples = 200 if tiny else 2_000
  return c


def data_dir(c) -> str:
  return os.path.expanduser(c.path or os.path.join(c.cache_dir, 'aan'))


def _missing_message(folder: str, missing: list[str]) -> str:
  dest = os.path.abspath(folder)
  return (f'retrieval: missing {", ".join(missing)} in {dest!r}. These are the LRA release files: on '
          f'a machine with network access run `curl {LRA_URL} -o lra_release.tar.gz && tar xzf '
          f'lra_release.tar.gz && mkdir -p {dest} && cp '
          f'lra_release/lra_release/tsv_data/new_aan_pairs.*.tsv {dest}/` and copy {dest} here (or '
          f'set config.data.path to the folder holding the files).')


def _parse_label(field: bytes, path: str, line_no: int) -> int:
  try:
    value = float(field)
  except ValueError:
    raise ValueError(f'retrieval: {path}:{line_no}: label {field[:20]!r} is not a number.') from None
  if value not in (0.0, 1.0):
    raise ValueError(f'retrieval: {path}:{line_no}: label {value} is not 0 or 1.')
  return int(value)


def read_pairs(path: str, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Parses one TSV file: (codes uint8 [N, 2, width], lengths int32 [N, 2], labels uint8 [N]).

  A first line whose label is not a number is taken as a header and skipped.
  """
  with open(path, 'rb') as f:
    num_lines = sum(1 for line in f if line.strip())
  codes = np.zeros((num_lines, 2, width), np.uint8)
  lengths = np.zeros((num_lines, 2), np.int32)
  labels = np.zeros(num_lines, np.uint8)
  n = 0
  with open(path, 'rb') as f:
    for line_no, line in enumerate(f, start=1):
      line = line.rstrip(b'\r\n')
      if not line.strip():
        continue
      fields = line.split(b'\t')
      if len(fields) != 5:
        raise ValueError(f'retrieval: {path}:{line_no}: expected 5 tab-separated fields (label, id1, '
                         f'id2, text1, text2), got {len(fields)}.')
      if n == 0 and line_no == 1:
        try:
          float(fields[0])
        except ValueError:
          continue  # header
      labels[n] = _parse_label(fields[0], path, line_no)
      for j, text in enumerate(fields[3:]):
        row = np.frombuffer(text[:width], np.uint8)
        codes[n, j, :row.size] = row
        lengths[n, j] = row.size
      n += 1
  if n == 0:
    raise ValueError(f'retrieval: {path} holds no pairs.')
  return codes[:n], lengths[:n], labels[:n]


def check_data_config(c) -> None:
  """Raises ValueError naming the first invalid Retrieval option (`c` holds every option); reads
  nothing."""
  check_count(c.max_length, name='max_length', minimum=2, task='retrieval')
  check_shared_options(c, 'retrieval')


@register_task('retrieval', config=retrieval_data_config)
def load_retrieval(c) -> TaskData:
  """Retrieval TaskData: inputs [N, 2, max_length] byte ids, 2 classes, kind 'pair'."""
  check_data_config(c)
  folder = data_dir(c)
  missing = [name for name in FILES.values() if not os.path.isfile(os.path.join(folder, name))]
  if missing:
    raise DataUnavailableError(_missing_message(folder, missing))
  cls_id = tokenizers.BYTE_CLS_ID if c.add_cls else None
  width = c.max_length - (1 if c.add_cls else 0)
  built = {}
  for tag, (split, name) in enumerate(FILES.items()):
    codes, lengths, labels = read_pairs(os.path.join(folder, name), width)
    keep = limit_examples(np.arange(len(labels)), c.max_examples, c.seed, tag)
    if len(keep) < len(labels):  # indexing copies: skip it when everything is kept (1.2 GB for train)
      codes, lengths, labels = codes[keep], lengths[keep], labels[keep]
    built[split] = TokenSplit(codes, lengths, labels,
                              offset=tokenizers.BYTE_OFFSET, cls_id=cls_id)
  return TaskData(train=built['train'], validation=built['validation'], test=built['test'],
                  vocab_size=tokenizers.byte_vocab_size(c.add_cls), num_classes=NUM_CLASSES,
                  kind='pair', max_length=c.max_length)
