"""Checkpoints of a run, with Orbax: the last few train states and the best model by validation.

Layout under `workdir/checkpoints/`:
  latest/<step>/  the whole train state (params, optimizer state, RNG streams, step): the last `keep`
                  saves (every `checkpoint_every` steps, at the end and on SIGTERM); resuming starts
                  from the newest.
  best/<step>/    the model state (params, RNG streams, other variables) of the validation step with
                  the best selection metric (highest accuracy, or lowest bits per byte), and a json
                  record {'step', 'score', 'metric', 'metrics'}; the test split is evaluated with it.
Orbax writes each checkpoint into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoints intact.
"""
from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'


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
    root = os.path.join(workdir, CHECKPOINT_DIR)
    common = dict(create=not read_only, enable_async_checkpointing=async_save and not read_only,
                  read_only=read_only)
    self._latest = _manager(os.path.join(root, 'latest'), ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, **common))
    # One best checkpoint; Orbax's best_fn keeps the better one should two ever coexist.
    self._best = _manager(os.path.join(root, 'best'), ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else 1, best_fn=lambda m: m['score'], best_mode=mode, **common))
    # Cached so that asking during a background save never reads a half-written checkpoint.
    self._best_record = self._read_best_record()

  # -- latest ------------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def save_latest(self, step: int, state: Any) -> None:
    self._latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                      force=True)

  def restore_latest(self, abstract_state: Any) -> Any:
    """The newest train state, restored into `abstract_state`'s structure, dtypes and shardings."""
    step = self._latest.latest_step()
    if step is None:
      raise FileNotFoundError('No latest checkpoint to restore.')
    restored = self._latest.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored['state']

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
    restored = self._best.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
    return dict(restored['record'])

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

  def restore_best(self, abstract_model_state: Any) -> tuple[Any, dict[str, Any]]:
    """(model state, record) of the best checkpoint. Raises FileNotFoundError if there is none."""
    record = self.best_record()
    if record is None:
      raise FileNotFoundError('No best checkpoint: no validation has finished in this workdir.')
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
