"""In-memory `Split`s over compactly stored token arrays, and the helpers that build them.

Every task derives its splits and seeds here: generated tasks seed each split with
`split_seed(seed, split)`; validation is a seeded carve-out of training data (`carve_validation`), a
source without a test split gets a seeded one (`carve_test`), and `limit_examples` caps a split at a
seeded random subset. Data-size options are checked by `check_count`, whose messages name the
config field to set.

Tokens are stored as small unsigned codes (uint8 bytes / pixels / ListOps ids) plus a length per
sequence, and turned into int32 ids, bool masks and labels only for the rows a batch asks for: ListOps
at 96K x 2000 is 192 MB as uint8 but 768 MB as int32.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from efficient_attn.data.base import SPLITS

# Salts of the seeded draws below: each derives its own stream from the task's `seed`, so the
# validation carve-out, the test carve-out, the example caps and the per-split generators never share
# random numbers.
_VALIDATION_SALT = 0x7A11D
_TEST_SALT = 0x7E57
_LIMIT_SALT = 0x11A17
_SPLIT_SEED_SALT = 0x115707


def _where(task: str | None, name: str) -> str:
  """How a message names a data option: 'listops: config.data.num_train', or just the name."""
  return f'{task}: config.data.{name}' if task else name


def check_count(value: Any, *, name: str, minimum: int, task: str | None = None) -> int:
  """`value` as an int; ValueError unless it is an integer >= minimum (bools are not).

  With `task`, `value` is the data option `name`, and the message says which config field to set.
  """
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'{_where(task, name)} must be an integer >= {minimum}, got {value!r}.')
  return int(value)



def check_shared_options(c, task: str) -> None:
  """Checks the data options several tasks share, where `c` has them: `seed` (int >= 0),
  `max_examples` (None or int >= 1) and `add_cls` (bool). ValueError naming the config field."""
  if 'seed' in c:
    check_count(c.seed, name='seed', minimum=0, task=task)
  if c.get('max_examples') is not None:
    check_count(c.max_examples, name='max_examples', minimum=1, task=task)
  if 'add_cls' in c and not isinstance(c.add_cls, bool):
    raise ValueError(f'{task}: config.data.add_cls must be True or False, got {c.add_cls!r}.')

def split_seed(seed: int, split: str) -> int:
  """The generator seed of `split` (one of base.SPLITS) for a generated task: distinct per split,
  derived from the task's `seed` alone (ListOps, Pathfinder)."""
  return int(np.random.SeedSequence([int(seed), _SPLIT_SEED_SALT,
                                     SPLITS.index(split)]).generate_state(1)[0])


def check_indices(indices: np.ndarray, num_examples: int) -> np.ndarray:
  """`indices` as an int64 [k] array; ValueError unless 1-D integers in [0, num_examples)."""
  idx = np.asarray(indices)
  if idx.ndim != 1:
    raise ValueError(f'indices must be a 1-D array, got shape {idx.shape}.')
  if idx.size == 0:
    return idx.astype(np.int64)
  if not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(f'indices must be integers, got dtype {idx.dtype}.')
  if idx.min() < 0 or idx.max() >= num_examples:
    raise ValueError(f'indices must be in [0, {num_examples}), got range '
                     f'[{idx.min()}, {idx.max()}].')
  return idx.astype(np.int64)


def check_labels(values, *, task: str, num_classes: int) -> np.ndarray:
  """Class labels as uint8 [N]; ValueError unless integers in [0, num_classes)."""
  labels = np.asarray(values)
  if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
    raise ValueError(f'{task}: labels must be a list of integers, got dtype {labels.dtype}, '
                     f'shape {labels.shape}.')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'{task}: labels must be in [0, {num_classes}), got range '
                     f'[{labels.min()}, {labels.max()}].')
  return labels.astype(np.uint8)


class TokenSplit:
  """A classification ('classify') or pair ('pair') split held in memory.

  Attributes:
    codes: unsigned ints [N, L] (pair: [N, 2, L]); id = code + offset at real positions.
    lengths: ints [N] (pair: [N, 2]); positions >= length are padding (id 0, mask False).
    labels: ints [N].
    offset: added to every real code (1 for bytes and pixels, 0 for ListOps ids).
    cls_id: if set, this id is prepended to every sequence (then max_length = L + 1).
  """

  def __init__(self, codes: np.ndarray, lengths: np.ndarray, labels: np.ndarray, *, offset: int,
               cls_id: int | None = None):
    codes = np.asarray(codes)
    lengths = np.asarray(lengths)
    labels = np.asarray(labels)
    if codes.ndim not in (2, 3):
      raise ValueError(f'codes must be [N, L] or [N, 2, L], got shape {codes.shape}.')
    if lengths.shape != codes.shape[:-1]:
      raise ValueError(f'lengths shape {lengths.shape} must be codes.shape[:-1] = {codes.shape[:-1]}.')
    if labels.shape != codes.shape[:1]:
      raise ValueError(f'labels shape {labels.shape} must be [{codes.shape[0]}].')
    if lengths.size and (lengths.min() < 0 or lengths.max() > codes.shape[-1]):
      raise ValueError(f'lengths must be in [0, {codes.shape[-1]}].')
    self.codes = codes
    self.lengths = lengths
    self.labels = labels
    self.offset = int(offset)
    self.cls_id = cls_id
    self.num_examples = int(codes.shape[0])
    self.max_length = int(codes.shape[-1]) + (1 if cls_id is not None else 0)

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """{'inputs': int32 [k, (2,) max_length], 'mask': bool same, 'labels': int32 [k]}."""
    idx = check_indices(indices, self.num_examples)
    codes = self.codes[idx].astype(np.int32)
    lengths = self.lengths[idx]
    mask = np.arange(codes.shape[-1]) < lengths[..., None]
    inputs = np.where(mask, codes + self.offset, 0).astype(np.int32)
    if self.cls_id is not None:
      lead = inputs.shape[:-1] + (1,)
      inputs = np.concatenate([np.full(lead, self.cls_id, np.int32), inputs], axis=-1)
      mask = np.concatenate([np.ones(lead, bool), mask], axis=-1)
    return {'inputs': inputs, 'mask': mask, 'labels': self.labels[idx].astype(np.int32)}

  def subset(self, indices: np.ndarray) -> 'TokenSplit':
    """A new split holding copies of the rows at `indices`, in that order."""
    idx = check_indices(indices, self.num_examples)
    return TokenSplit(self.codes[idx], self.lengths[idx], self.labels[idx], offset=self.offset,
                      cls_id=self.cls_id)


def pack_byte_strings(texts: Sequence[bytes], max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Truncates/pads byte strings to `max_length`: (codes uint8 [N, max_length], lengths int32 [N])."""
  if max_length < 1:
    raise ValueError(f'max_length must be >= 1, got {max_length}.')
  codes = np.zeros((len(texts), max_length), np.uint8)
  lengths = np.zeros(len(texts), np.int32)
  for i, text in enumerate(texts):
    row = np.frombuffer(text[:max_length], dtype=np.uint8)
    codes[i, :row.size] = row
    lengths[i] = row.size
  return codes, lengths


def _carve(num_examples: int, count: int, seed: int, salt: int, name: str, task: str | None,
           source: str) -> tuple[np.ndarray, np.ndarray]:
  if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not (
      0 < count < num_examples):
    most = num_examples - 1
    fix = (f'; set config.data.{name} to at most {most} (e.g. --config.data.{name}='
           f'{max(1, num_examples // 10)})' if task and most >= 1 else '')
    raise ValueError(f'{_where(task, name)} must be in (0, {num_examples}) for {source} of '
                     f'{num_examples} examples, got {count!r}{fix}.')
  perm = np.random.default_rng([int(seed), salt]).permutation(num_examples)
  return np.sort(perm[count:]), np.sort(perm[:count])


def carve_validation(num_examples: int, num_validation: int, seed: int, *,
                     task: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """A seeded random split of range(num_examples) into (train, validation) index arrays, each sorted.

  Validation is always carved from the training data (never the test split, which the LRA reference
  code used for model selection). `task` names the task in the error message.
  """
  return _carve(num_examples, num_validation, seed, _VALIDATION_SALT, 'num_validation', task,
                'a train split')


def carve_test(num_examples: int, num_test: int, seed: int, *,
               task: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(rest, test): a seeded random test split, for a source without one (the LRA Pathfinder release).

  Carve validation from `rest` with `carve_validation`, as for every other task.
  """
  return _carve(num_examples, num_test, seed, _TEST_SALT, 'num_test', task, 'a source')


def limit_examples(indices: np.ndarray, max_examples: int | None, seed: int, tag: int) -> np.ndarray:
  """At most `max_examples` of `indices`, a seeded random subset kept in order.

  Random rather than the first ones, because sources like IMDB are sorted by label.
  """
  if max_examples is None:
    return indices
  if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
    raise ValueError(f'max_examples must be None or a positive integer, got {max_examples!r}.')
  if len(indices) <= max_examples:
    return indices
  keep = np.random.default_rng([int(seed), _LIMIT_SALT, int(tag)]).choice(
      len(indices), size=max_examples, replace=False)
  return np.asarray(indices)[np.sort(keep)]


def choose_indices(num_train: int, num_test: int, *, num_validation: int, seed: int,
                   max_examples: int | None,
                   task: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(train, validation, test) row indices for sources with only train and test splits.

  Validation is a seeded carve-out of the source's train split; `max_examples` then caps each split
  at a seeded random subset (for quick runs).
  """
  train, validation = carve_validation(num_train, num_validation, seed, task=task)
  return (limit_examples(train, max_examples, seed, 0),
          limit_examples(validation, max_examples, seed, 1),
          limit_examples(np.arange(num_test), max_examples, seed, 2))
