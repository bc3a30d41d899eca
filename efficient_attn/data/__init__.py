"""Data pipelines of every task behind `load_task(config.data)` (the contract is in base.py).

  data = load_task(config.data)             # -> TaskData (train / validation / test splits)
  config.data = default_data_config(task)   # every data option of a task, documented defaults
  for batch in train_batches(data.train, 32, seed=0, start_step=step): ...
  for batch in eval_batches(data.validation, 32): ...

Tasks: listops, text, retrieval, image, pathfinder, lm. Each task module registers its loader through
registry.register_task; importing this package imports them all.
"""
from __future__ import annotations

from typing import Callable

import ml_collections

from efficient_attn.data import image, listops, lm, retrieval, text
from efficient_attn.data.base import KINDS, Split, TaskData
from efficient_attn.data.iterators import (eval_batches, num_eval_batches, train_batches,
                                           train_indices)
from efficient_attn.data.lm import bits_per_byte
from efficient_attn.data.registry import TASKS, register_task
from efficient_attn.data.sources import DataUnavailableError

try:
  from efficient_attn.data import pathfinder
except ModuleNotFoundError as e:  # pathfinder.py is written separately; the rest works without it
  if e.name != 'efficient_attn.data.pathfinder':
    raise
  pathfinder = None

_CONFIGS: dict[str, Callable[[bool], ml_collections.ConfigDict]] = {
    'listops': listops.listops_data_config,
    'text': text.text_data_config,
    'retrieval': retrieval.retrieval_data_config,
    'image': image.image_data_config,
    'lm': lm.lm_data_config,
}
if pathfinder is not None:
  _CONFIGS['pathfinder'] = pathfinder.pathfinder_data_config


def task_names() -> tuple[str, ...]:
  """The registered tasks, in registration order."""
  return tuple(TASKS)


def default_data_config(task: str, quick: bool = False) -> ml_collections.ConfigDict:
  """Every data option of `task` with its documented default (`quick`: a small CPU-sized variant).

  The defaults follow the published LRA setting of each task (see the comments in each task module's
  `*_data_config`); the config files use the result as `config.data`.
  """
  if task not in _CONFIGS:
    raise ValueError(f'Unknown task {task!r}; valid tasks: {", ".join(sorted(_CONFIGS))}.')
  return _CONFIGS[task](quick)


def load_task(data_config) -> TaskData:
  """The TaskData of `data_config.task`, loaded (or generated) as the rest of the config says.

  `data_config` is a ConfigDict (or dict) holding `task` and any of that task's options; options it
  omits take their `default_data_config(task)` value, and options the task does not have raise
  ValueError (a misspelt option would otherwise be silently ignored).
  """
  if isinstance(data_config, dict):
    data_config = ml_collections.ConfigDict(data_config)
  task = getattr(data_config, 'task', None)
  if task not in TASKS:
    raise ValueError(f'Unknown task {task!r}; valid tasks: {", ".join(sorted(TASKS))}.')
  if task in _CONFIGS:
    full = _CONFIGS[task](False)
    unknown = sorted(set(data_config.keys()) - set(full.keys()))
    if unknown:
      raise ValueError(f'Unknown data option(s) {", ".join(unknown)} for task {task!r}; valid '
                       f'options: {", ".join(sorted(full.keys()))}.')
    for key in data_config.keys():
      full[key] = data_config[key]
    data_config = full
  data = TASKS[task](data_config)
  if data.kind not in KINDS:
    raise ValueError(f'Task {task!r} returned kind {data.kind!r}; valid kinds: {KINDS}.')
  return data


__all__ = [
    'DataUnavailableError', 'KINDS', 'Split', 'TASKS', 'TaskData', 'bits_per_byte',
    'default_data_config', 'eval_batches', 'load_task', 'num_eval_batches', 'register_task',
    'task_names', 'train_batches', 'train_indices',
]
