"""The one data interface every task implements.

A task loader turns `config.data` (an ml_collections.ConfigDict) into a `TaskData`: three splits of
fixed-length integer arrays with padding masks and labels. Training and evaluation only ever see this.

Batches are dicts of numpy arrays:
  'inputs': int32 [batch, length]      (pair tasks: [batch, 2, length])
  'mask':   bool, same shape as inputs  True for real tokens, False for padding
  'labels': int32 [batch]               (language modelling: int32 [batch, length], the next token)
Evaluation batches also carry 'weights': float32 [batch], 0 for filler rows that pad the last batch.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

# The task kinds: how a batch is shaped and scored. The one definition; the models (one head per kind)
# and the objectives import it.
KINDS = ('classify', 'pair', 'lm')
# The three splits every task provides, in this order. Generated tasks derive one seed per split
# (`splits.split_seed`); validation always comes from training data, never from test.
SPLITS = ('train', 'validation', 'test')


class Split(Protocol):
  """Random access to the examples of one split."""

  num_examples: int

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at `indices` (int array [k]) as a batch dict (see the module docstring)."""


@dataclasses.dataclass
class TaskData:
  train: Split
  validation: Split
  test: Split
  vocab_size: int  # token ids are in [0, vocab_size); 0 is padding
  num_classes: int  # classification classes; for 'lm', the vocabulary size
  kind: str  # one of KINDS
  max_length: int  # the fixed length of 'inputs' along its last axis
