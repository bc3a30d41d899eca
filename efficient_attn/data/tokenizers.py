"""Tokenisers: bytes, ListOps symbols and pixels to integer ids, with 0 reserved for padding.

- Bytes: id = byte + 1 (1..256), vocabulary 257; an optional classification token gets id 257
  (vocabulary 258 then).
- ListOps: '0'..'9' -> 1..10, 'MIN' 11, 'MAX' 12, 'MED' 13, 'SM' 14, '[' 15, ']' 16; vocabulary 17.
  The brackets stay in the stream: without them the task is ambiguous (an early LRA tokenizer dropped
  them and made it unsolvable).
- Pixels (Image, Pathfinder): id = intensity + 1 (1..256), vocabulary 257.

Datasets store raw bytes / intensities as uint8 and add `BYTE_OFFSET` / `PIXEL_OFFSET` per batch, which
halves memory against storing ids (256 does not fit in uint8).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

PAD_ID = 0

BYTE_OFFSET = 1
BYTE_VOCAB_SIZE = 257
BYTE_CLS_ID = 257  # only used with add_cls; the vocabulary is then BYTE_VOCAB_SIZE + 1.

PIXEL_OFFSET = 1
PIXEL_VOCAB_SIZE = 257

LISTOPS_OPERATORS = ('MIN', 'MAX', 'MED', 'SM')
LISTOPS_SYMBOLS = tuple(str(d) for d in range(10)) + LISTOPS_OPERATORS + ('[', ']')
LISTOPS_IDS = {sym: i + 1 for i, sym in enumerate(LISTOPS_SYMBOLS)}
LISTOPS_VOCAB_SIZE = len(LISTOPS_SYMBOLS) + 1
LISTOPS_OPEN_ID = LISTOPS_IDS['[']
LISTOPS_CLOSE_ID = LISTOPS_IDS[']']
LISTOPS_OPERATOR_IDS = tuple(LISTOPS_IDS[op] for op in LISTOPS_OPERATORS)
LISTOPS_DIGIT_OFFSET = 1  # id of digit d is d + 1


def byte_vocab_size(add_cls: bool) -> int:
  return BYTE_VOCAB_SIZE + 1 if add_cls else BYTE_VOCAB_SIZE


def encode_bytes(text: str | bytes, *, max_length: int | None = None,
                 add_cls: bool = False) -> np.ndarray:
  """Byte ids of `text` (str is UTF-8 encoded): int32 [n], n <= max_length, CLS first if add_cls.

  Truncates to `max_length` ids (CLS included); does not pad.
  """
  data = text.encode('utf-8') if isinstance(text, str) else bytes(text)
  ids = np.frombuffer(data, dtype=np.uint8).astype(np.int32) + BYTE_OFFSET
  if add_cls:
    ids = np.concatenate([np.array([BYTE_CLS_ID], np.int32), ids])
  if max_length is not None:
    if max_length < 1:
      raise ValueError(f'max_length must be >= 1, got {max_length}.')
    ids = ids[:max_length]
  return ids


def decode_bytes(ids: Iterable[int]) -> bytes:
  """Inverse of encode_bytes: drops padding and CLS ids."""
  ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).ravel()
  ids = ids[(ids >= BYTE_OFFSET) & (ids < BYTE_OFFSET + 256)]
  return (ids - BYTE_OFFSET).astype(np.uint8).tobytes()


def split_listops(text: str) -> list[str]:
  """Splits a ListOps string into symbols; '[MAX' (the LRA spelling) becomes '[', 'MAX'.

  Parentheses, which the LRA TSV files carry from printing nested tuples, are dropped.
  """
  symbols = []
  for word in text.replace('(', ' ').replace(')', ' ').split():
    if word.startswith('[') and len(word) > 1:
      symbols.extend(['[', word[1:]])
    else:
      symbols.append(word)
  return symbols


def encode_listops(symbols: str | Iterable[str]) -> np.ndarray:
  """ListOps ids, int32 [n], of a string ('[MAX 2 [MIN 3 4 ] ]') or a sequence of symbols."""
  if isinstance(symbols, str):
    symbols = split_listops(symbols)
  ids = []
  for sym in symbols:
    if sym not in LISTOPS_IDS:
      raise ValueError(f'Unknown ListOps symbol {sym!r}; valid symbols: {" ".join(LISTOPS_SYMBOLS)}.')
    ids.append(LISTOPS_IDS[sym])
  return np.asarray(ids, dtype=np.int32)


def decode_listops(ids: Iterable[int]) -> list[str]:
  """Symbols of ListOps ids, padding dropped."""
  out = []
  for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).ravel().tolist():
    if i == PAD_ID:
      continue
    if not 1 <= i < LISTOPS_VOCAB_SIZE:
      raise ValueError(f'Invalid ListOps id {i}; ids are in [0, {LISTOPS_VOCAB_SIZE}).')
    out.append(LISTOPS_SYMBOLS[i - 1])
  return out


def encode_pixels(intensities: np.ndarray) -> np.ndarray:
  """Pixel ids (intensity + 1), int32, same shape; intensities must be integers in [0, 255]."""
  x = np.asarray(intensities)
  if x.size and (not np.issubdtype(x.dtype, np.integer) or x.min() < 0 or x.max() > 255):
    raise ValueError('Pixel intensities must be integers in [0, 255].')
  return x.astype(np.int32) + PIXEL_OFFSET
