"""The task registry: task name -> loader `(data_config) -> TaskData`.

It imports nothing from the package, so every task module (pathfinder.py included) can import it
without cycles; `efficient_attn.data` imports the task modules, which fills `TASKS`.
"""
from __future__ import annotations

from typing import Any, Callable

# Task name -> loader. A loader takes the task's `config.data` (ml_collections.ConfigDict) and returns
# an `efficient_attn.data.base.TaskData`.
TASKS: dict[str, Callable[[Any], Any]] = {}


def register_task(name: str) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
  """Decorator (or plain call, `register_task('x')(loader)`) that makes `loader` the loader of `name`.

  Registering a second, different loader under a taken name raises ValueError, so two modules cannot
  silently shadow each other; re-registering the same function (a module reload) is allowed.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f'Task name must be a non-empty string, got {name!r}.')

  def wrap(loader: Callable[[Any], Any]) -> Callable[[Any], Any]:
    if not callable(loader):
      raise ValueError(f'Loader for task {name!r} must be callable, got {loader!r}.')
    old = TASKS.get(name)
    same = old is not None and (old is loader or (
        getattr(old, '__module__', None) == getattr(loader, '__module__', None) and
        getattr(old, '__qualname__', None) == getattr(loader, '__qualname__', None)))
    if old is not None and not same:
      raise ValueError(f'Task {name!r} is already registered (by {old!r}).')
    TASKS[name] = loader
    return loader

  return wrap
