"""Tokenisers: bytes, ListOps symbols and pixels to integer ids, with 0 reserved for padding.

- Bytes: id = byte + 1 (1..256), vocabulary 257; an optional classification token gets id 257
  (vocabulary 258 then).
- ListOps: LRA's tokens (`lra_benchmarks/listops/input_pipeline.py`): parentheses dropped, then one
  token per whitespace-separated word, an operator with its opening bracket ('[MIN') as one token:
  '0'..'9' -> 1..10, '[MIN' 11, '[MAX' 12, '[MED' 13, '[SM' 14, ']' 15, and id 16 reserved for LRA's out-of-vocabulary
  word, so the vocabulary is 17 as LRA's (`encoder.vocab_size`). LRA renames ']' to 'X' (its
  TokenTextEncoder would drop a bare ']') and numbers its 15 words in the order of a Python set, which
  changes from process to process; we fix the order above and reject unknown words instead of mapping
  them to the reserved id (which so never occurs in our data).
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

LISTOPS_OPERATORS = ('[MIN', '[MAX', '[MED', '[SM')  # an operator and its opening bracket
LISTOPS_CLOSE = ']'
LISTOPS_TOKENS = tuple(str(d) for d in range(10)) + LISTOPS_OPERATORS + (LISTOPS_CLOSE,)
LISTOPS_IDS = {tok: i + 1 for i, tok in enumerate(LISTOPS_TOKENS)}
LISTOPS_OOV_ID = len(LISTOPS_TOKENS) + 1  # reserved as in LRA's encoder; never produced here
LISTOPS_VOCAB_SIZE = len(LISTOPS_TOKENS) + 2  # + padding + out-of-vocabulary: 17, as LRA's
LISTOPS_CLOSE_ID = LISTOPS_IDS[LISTOPS_CLOSE]
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
  """LRA's ListOps tokens of `text`: '( ( [MAX 2 ) 9 ) ] )' -> ['[MAX', '2', '9', ']'].

  Parentheses (the LRA TSV files carry them from printing nested tuples) are dropped and the rest is
  split at whitespace, as LRA's input pipeline does; words are not checked here (encode_listops
  checks them).
  """
  return text.replace('(', ' ').replace(')', ' ').split()


def encode_listops(tokens: str | Iterable[str]) -> np.ndarray:
  """ListOps ids, int32 [n], of a string ('[MAX 2 [MIN 3 4 ] ]', parentheses allowed) or of tokens.

  ValueError for a word that is not one of LISTOPS_TOKENS (LRA's encoder would map it to its unused
  out-of-vocabulary id).
  """
  if isinstance(tokens, str):
    tokens = split_listops(tokens)
  ids = []
  for tok in tokens:
    if tok not in LISTOPS_IDS:
      raise ValueError(f'Unknown ListOps token {tok!r}; valid tokens: {" ".join(LISTOPS_TOKENS)} '
                       "(an operator is written with its bracket, as in LRA's files: "
                       "'[MAX 2 9 ]').")
    ids.append(LISTOPS_IDS[tok])
  return np.asarray(ids, dtype=np.int32)


def decode_listops(ids: Iterable[int]) -> list[str]:
  """Tokens of ListOps ids, padding dropped."""
  out = []
  for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).ravel().tolist():
    if i == PAD_ID:
      continue
    if not 1 <= i <= len(LISTOPS_TOKENS):
      raise ValueError(f'Invalid ListOps id {i}; ids are 0 (padding) and 1..{len(LISTOPS_TOKENS)}.')
    out.append(LISTOPS_TOKENS[i - 1])
  return out


def encode_pixels(intensities: np.ndarray) -> np.ndarray:
  """Pixel ids (intensity + 1), int32, same shape; intensities must be integers in [0, 255]."""
  x = np.asarray(intensities)
  if x.size and (not np.issubdtype(x.dtype, np.integer) or x.min() < 0 or x.max() > 255):
    raise ValueError('Pixel intensities must be integers in [0, 255].')
  return x.astype(np.int32) + PIXEL_OFFSET
