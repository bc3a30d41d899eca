"""Checkpoints of a run, with Orbax: the last few train states and the best model by validation.

Layout under `workdir/checkpoints/`:
  latest/<step>/  the whole train state (params, optimizer state, RNG streams, step): the last `keep`
                  saves (every `checkpoint_every` steps, at the end and on SIGTERM/SIGINT);
                  resuming starts from the newest.
  best/<step>/    the model state (params, RNG streams, other variables) of the validation step with
                  the best selection metric (highest accuracy, or lowest bits per byte), and a json
                  record {'step', 'score', 'metric', 'metrics'}; the test split is evaluated with it.
Orbax writes each checkpoint into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoints intact.

A checkpoint damaged afterwards (truncated or deleted files, an emptied step directory: a full disk,
a copy cut short) does not block resuming: `restore_latest` falls back to the newest one that
restores, says so in one log line, and moves the unreadable newer ones to `checkpoints/corrupt/` (they would
otherwise shadow the step numbers the run is about to save again). Only a fallback moves anything:
when no checkpoint restores (also what a changed model or optimizer looks like) nothing is touched
and `NoRestorableCheckpointError` names the directory. An unreadable best checkpoint is set aside the
same way and reported by `best_problem`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'corrupt'  # under CHECKPOINT_DIR: unreadable checkpoints, set aside


class NoRestorableCheckpointError(FileNotFoundError):
  """The workdir holds latest checkpoints but none of them restores. The message is one line."""


def _describe(error: BaseException, limit: int = 200) -> str:
  """'TypeName: first line of the message' (at most `limit` characters), for one log line."""
  text = str(error).strip().splitlines()
  first = text[0].strip() if text else ''
  if len(first) > limit:
    first = first[:limit - 3] + '...'
  return f'{type(error).__name__}: {first}' if first else type(error).__name__


@contextlib.contextmanager
def _muted_unraisable() -> Iterator[list]:
  """Holds back 'unraisable' exceptions while a restore may fail: when Orbax's read of a damaged file
  fails, its other pending reads complete after the event loop has closed and each reports a
  RuntimeError through sys.unraisablehook (hundreds of traceback lines). Yields the list they are
  collected in; the caller re-reports them if the restore succeeded after all."""
  held = []
  previous = sys.unraisablehook
  sys.unraisablehook = held.append
  try:
    yield held
  finally:
    sys.unraisablehook = previous


def _manager(directory: str, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class Checkpointer:
  """The 'latest' and 'best' checkpoint managers of one workdir."""

  def __init__(self, workdir: str, *, keep: int = 2, mode: str = 'max', async_save: bool = True,
               read_only: bool = False):
    """
    Args:
      workdir: the run directory; checkpoints go to workdir/checkpoints/{latest,best}.
      keep: how many latest checkpoints to keep.
      mode: 'max' if a higher selection score is better, 'min' if lower.
      async_save: write in the background (the device arrays are copied to host before `save`
        returns, so training may reuse their buffers).
      read_only: only read (eval.py); creates nothing.
    """
    if mode not in ('max', 'min'):
      raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
      raise ValueError(f'keep must be an integer >= 1, got {keep!r}.')
    self.mode = mode
    self._read_only = read_only
    root = os.path.join(workdir, CHECKPOINT_DIR)
    self._root = root
    common = dict(create=not read_only, enable_async_checkpointing=async_save and not read_only,
                  read_only=read_only)
    self._latest = _manager(os.path.join(root, 'latest'), ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, **common))
    # One best checkpoint; Orbax's best_fn keeps the better one should two ever coexist.
    self._best = _manager(os.path.join(root, 'best'), ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else 1, best_fn=lambda m: m['score'], best_mode=mode, **common))
    # Why the best checkpoint could not be used (None: it is fine or there is none yet).
    self.best_problem: str | None = None
    # Cached so that asking during a background save never reads a half-written checkpoint.
    self._best_record = self._read_best_record()

  # -- latest ------------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def save_latest(self, step: int, state: Any) -> None:
    self._latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                      force=True)

  def restore_latest(self, abstract_state: Any) -> Any:
    """The newest train state that restores, into `abstract_state`'s structure, dtypes and shardings.

    Unreadable newer checkpoints are skipped, reported in one log line, and (when an older one
    restores) moved to checkpoints/corrupt/. Raises FileNotFoundError if there is no checkpoint and
    NoRestorableCheckpointError if none restores.
    """
    steps = sorted(self._latest.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError('No latest checkpoint to restore.')
    failures = []
    for step in steps:
      with _muted_unraisable() as held:
        try:
          restored = self._latest.restore(
              step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        except Exception as e:  # pylint: disable=broad-except  (Orbax/TensorStore raise anything)
          failures.append((step, _describe(e)))
          continue
      if not failures:
        for report in held:  # no read failed, so these are not its echoes: report them as usual
          sys.unraisablehook(report)
      else:
        moved = [m for m in (self._set_aside(self._latest, 'latest', s) for s, _ in failures) if m]
        logging.warning(
            'Checkpoint(s) %s in %s do not restore (%s); resumed from step %d instead%s.',
            ', '.join(str(s) for s, _ in failures), self._latest.directory,
            '; '.join(f'step {s}: {why}' for s, why in failures), step,
            f' (moved the unreadable ones to {", ".join(moved)})' if moved else '')
      return restored['state']
    raise NoRestorableCheckpointError(
        f'No checkpoint in {self._latest.directory} restores ('
        + '; '.join(f'step {s}: {why}' for s, why in failures)
        + '): if the config changed (model, optimizer, mesh), launch with the config the run was '
        'started with; else move the damaged checkpoints away or use another --workdir.')

  def _set_aside(self, manager: ocp.CheckpointManager, kind: str, step: int) -> str | None:
    """Moves step `step` of `manager` to checkpoints/corrupt/<kind>-<step>[.<n>]; its new path."""
    if self._read_only:
      return None
    source = os.path.join(str(manager.directory), str(step))
    corrupt = os.path.join(self._root, CORRUPT_DIR)
    target = os.path.join(corrupt, f'{kind}-{step}')
    n = 1
    while os.path.exists(target):
      target = os.path.join(corrupt, f'{kind}-{step}.{n}')
      n += 1
    if jax.process_index() == 0 and os.path.exists(source):  # one process moves the shared files
      os.makedirs(corrupt, exist_ok=True)
      os.replace(source, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f'checkpoint set aside: {kind} {step}')
    manager.reload()
    return os.path.abspath(target)

  # -- best --------------------------------------------------------------------------------------

  def best_record(self) -> dict[str, Any] | None:
    """{'step', 'score', 'metric', 'metrics'} of the best checkpoint, or None before the first one."""
    return None if self._best_record is None else dict(self._best_record)

  def _read_best_record(self) -> dict[str, Any] | None:
    steps = self._best.all_steps()
    if not steps:
      return None
    step = self._best.best_step()
    step = max(steps) if step is None else step
    try:
      restored = self._best.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
      record = dict(restored['record'])
      if not {'step', 'score', 'metric', 'metrics'} <= set(record):
        raise ValueError(f'the record lacks fields: {sorted(record)}')
    except Exception as e:  # pylint: disable=broad-except  (a damaged record: JSON, missing files)
      self._best_unreadable(step, e)
      return None
    return record

  def _best_unreadable(self, step: int, error: BaseException) -> None:
    moved = self._set_aside(self._best, 'best', step)
    self.best_problem = (f'the best checkpoint (step {step}) in {self._best.directory} does not '
                         f'restore ({_describe(error)})' + (f'; moved to {moved}' if moved else ''))

  def verify_best(self, abstract_model_state: Any) -> bool:
    """Whether the best checkpoint's model state restores; if not, it is set aside, `best_problem`
    says why and there is no best checkpoint any more. True when there is none to verify."""
    record = self.best_record()
    if record is None:
      return True
    with _muted_unraisable():
      try:
        self._best.restore(record['step'], args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_model_state)))
        return True
      except Exception as e:  # pylint: disable=broad-except
        self._best_unreadable(record['step'], e)
    self._best_record = None
    return False

  def is_improvement(self, score: float) -> bool:
    """Whether `score` beats the best checkpoint's (strictly: ties keep the earlier step)."""
    best = self.best_record()
    if best is None:
      return True
    return score > best['score'] if self.mode == 'max' else score < best['score']

  def save_best(self, step: int, model_state: Any, *, metric: str, score: float,
                metrics: dict[str, float]) -> None:
    record = {'step': int(step), 'score': float(score), 'metric': metric,
              'metrics': {k: float(v) for k, v in metrics.items()}}
    self._best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(model_state),
                                                  record=ocp.args.JsonSave(record)),
                    metrics={'score': float(score)}, force=True)
    self._best_record = record

  def best_metadata(self) -> Any:
    """The structure of the best checkpoint's model state, read without restoring it: nested dicts
    of Orbax array metadata (`.shape`, `.dtype`); None when there is no best checkpoint."""
    record = self.best_record()
    if record is None:
      return None
    path = os.path.join(str(self._best.directory), str(record['step']), 'state')
    checkpointer = ocp.StandardCheckpointer()
    try:
      metadata = checkpointer.metadata(path).item_metadata
    finally:
      checkpointer.close()
    return metadata.tree if hasattr(metadata, 'tree') else metadata

  def restore_best(self, abstract_model_state: Any) -> tuple[Any, dict[str, Any]]:
    """(model state, record) of the best checkpoint. Raises FileNotFoundError if there is none."""
    record = self.best_record()
    if record is None:
      raise FileNotFoundError(f'No usable best checkpoint: {self.best_problem}.' if self.best_problem
                              else 'No best checkpoint: no validation has finished in this workdir.')
    restored = self._best.restore(record['step'], args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_model_state)))
    return restored['state'], record

  # -- lifecycle ---------------------------------------------------------------------------------

  def wait(self) -> None:
    """Blocks until background saves are on disk."""
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    self._best.close()
