"""The task registry: task name -> loader `(data_config) -> TaskData` and its data-config function.

The one list of tasks: every task module registers itself here (`@register_task(name, config=...)` on
its loader), and everything else (`efficient_attn.data.task_names()`, `default_data_config`, the
config files, the tests) reads it. It imports nothing from the package, so every task module can
import it without cycles; `efficient_attn.data` imports the task modules, which fills it.
"""
from __future__ import annotations

from typing import Any, Callable

# Task name -> loader. A loader takes the task's `config.data` (ml_collections.ConfigDict) and returns
# an `efficient_attn.data.base.TaskData`.
TASKS: dict[str, Callable[[Any], Any]] = {}
# Task name -> `config(quick=False, tiny=False) -> ml_collections.ConfigDict`: every data option of the
# task with its documented default (quick: CPU-sized; tiny: seconds, for tests and smoke runs).
DATA_CONFIGS: dict[str, Callable[..., Any]] = {}


def _same(old: Any, new: Any) -> bool:
  """The same function, or its re-definition by a module reload."""
  return old is new or (
      getattr(old, '__module__', None) == getattr(new, '__module__', None) and
      getattr(old, '__qualname__', None) == getattr(new, '__qualname__', None))


def register_task(name: str, *, config: Callable[..., Any] | None = None
                  ) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
  """Decorator (or plain call, `register_task('x', config=x_config)(loader)`) registering a task.

  Args:
    name: the task name (`config.data.task`).
    config: the task's data-config function `(quick=False, tiny=False) -> ConfigDict`; every task
      registered by this package has one (`load_task` fills omitted options from it).

  Registering a second, different loader under a taken name raises ValueError, so two modules cannot
  silently shadow each other; re-registering the same function (a module reload) is allowed.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f'Task name must be a non-empty string, got {name!r}.')
  if config is not None and not callable(config):
    raise ValueError(f'config of task {name!r} must be callable, got {config!r}.')

  def wrap(loader: Callable[[Any], Any]) -> Callable[[Any], Any]:
    if not callable(loader):
      raise ValueError(f'Loader for task {name!r} must be callable, got {loader!r}.')
    old = TASKS.get(name)
    if old is not None and not _same(old, loader):
      raise ValueError(f'Task {name!r} is already registered (by {old!r}).')
    TASKS[name] = loader
    if config is not None:
      DATA_CONFIGS[name] = config
    return loader

  return wrap
