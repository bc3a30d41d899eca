"""Data pipelines of every task behind `load_task(config.data)` (the contract is in base.py).

  data = load_task(config.data)             # -> TaskData (train / validation / test splits)
  config.data = default_data_config(task)   # every data option of a task, documented defaults
  for batch in train_batches(data.train, 32, seed=0, start_step=step): ...
  for batch in eval_batches(data.validation, 32): ...

The tasks are those of `task_names()`: each task module registers its loader and its data-config
function through `registry.register_task`, and importing this package imports them all.
"""
from __future__ import annotations

import os
import sys

import ml_collections

# Imported for their registration; also reachable as efficient_attn.data.<task>.
from efficient_attn.data import image, listops, lm, pathfinder, retrieval, text  # noqa: F401
from efficient_attn.data.base import KINDS, SPLITS, Split, TaskData
from efficient_attn.data.iterators import (eval_batches, num_eval_batches, train_batches,
                                           train_indices)
from efficient_attn.data.lm import bits_per_byte
from efficient_attn.data.registry import DATA_CONFIGS, TASKS, register_task
from efficient_attn.data.sources import DataUnavailableError


def task_names() -> tuple[str, ...]:
  """The registered tasks, in registration order."""
  return tuple(TASKS)


def _unknown_task(task) -> ValueError:
  return ValueError(f'Unknown task {task!r}; valid tasks: {", ".join(sorted(TASKS))}.')


def default_data_config(task: str, quick: bool = False, *,
                        tiny: bool = False) -> ml_collections.ConfigDict:
  """Every data option of `task` with its documented default.

  `quick`: a small CPU-sized variant (minutes of training); `tiny`: smaller still (a few hundred
  examples, for tests and smoke runs; it wins over `quick`). The defaults follow the published LRA
  setting of each task (see the comments in each task module's `*_data_config`); the config files
  use the result as `config.data`.
  """
  if task not in DATA_CONFIGS:
    raise _unknown_task(task)
  c = DATA_CONFIGS[task](quick=quick, tiny=tiny)
  c.cache_dir = default_cache_dir()
  return c


def default_cache_dir() -> str:
  """The default `cache_dir` of every task, for generated and downloaded data: $EFFICIENT_ATTN_CACHE
  if set, else $XDG_CACHE_HOME/efficient_attn, else ~/.cache/efficient_attn (not the current
  directory, so runs started anywhere share one cache). `--config.data.cache_dir=DIR` overrides it."""
  path = os.environ.get('EFFICIENT_ATTN_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.join('~', '.cache'), 'efficient_attn')
  return os.path.expanduser(path)


def load_task(data_config) -> TaskData:
  """The TaskData of `data_config.task`, loaded (or generated) as the rest of the config says.

  `data_config` is a ConfigDict (or dict) holding `task` and any of that task's options; options it
  omits take their `default_data_config(task)` value, and options the task does not have raise
  ValueError (a misspelt option would otherwise be silently ignored).
  """
  data_config = resolve_data_config(data_config)
  task = data_config.task
  data = TASKS[task](data_config)
  if data.kind not in KINDS:
    raise ValueError(f'Task {task!r} returned kind {data.kind!r}; valid kinds: {KINDS}.')
  return data


def resolve_data_config(data_config) -> ml_collections.ConfigDict:
  """`data_config` (a ConfigDict or dict holding `task`) with the options it omits at their
  `default_data_config(task)` values. ValueError for an unknown task or option."""
  if isinstance(data_config, dict):
    data_config = ml_collections.ConfigDict(data_config)
  task = getattr(data_config, 'task', None)
  if task not in TASKS:
    raise _unknown_task(task)
  if task in DATA_CONFIGS:
    full = DATA_CONFIGS[task]()
    full.cache_dir = default_cache_dir()
    unknown = sorted(set(data_config.keys()) - set(full.keys()))
    if unknown:
      raise ValueError(f'Unknown data option(s) {", ".join(unknown)} for task {task!r}; valid '
                       f'options: {", ".join(sorted(full.keys()))}.')
    for key in data_config.keys():
      full[key] = data_config[key]
    data_config = full
  return data_config


def check_data_config(data_config) -> None:
  """Validates `data_config` as `load_task` would read it, loading and generating nothing (training
  calls it before any work): the task, unknown options, and the task module's own
  `check_data_config(c)` (where it has one) on the resolved options. ValueError naming the option."""
  data_config = resolve_data_config(data_config)
  module = sys.modules.get(getattr(TASKS[data_config.task], '__module__', ''))
  check = getattr(module, 'check_data_config', None)
  if check is not None:
    check(data_config)


__all__ = [
    'DATA_CONFIGS', 'DataUnavailableError', 'KINDS', 'SPLITS', 'Split', 'TASKS', 'TaskData',
    'bits_per_byte', 'check_data_config', 'default_cache_dir', 'default_data_config',
    'eval_batches', 'load_task', 'num_eval_batches', 'register_task', 'resolve_data_config',
    'task_names', 'train_batches', 'train_indices',
]
