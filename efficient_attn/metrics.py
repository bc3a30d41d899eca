"""Metric logging: `workdir/metrics.jsonl` and TensorBoard events, written by process 0 only.

Each jsonl line is one record: {"step": int, "<split>/<name>": float, ...}, e.g.
{"step": 50, "train/loss": 2.1, "train/accuracy": 0.2, "train/learning_rate": 1e-3, ...}. Splits are
'train', 'validation' and 'test'. A resumed run first drops the records after its checkpoint's step
(and the test record of a finished run it extends), so the file reads as if the run had never stopped.
TensorBoard also gets the run's flattened config, as hyper-parameters (the HParams dashboard) and as a
text table.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
from typing import Any, Iterable, Mapping

import jax
import numpy as np

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


def peak_memory_bytes() -> int | None:
  """The largest peak device memory over this process's devices, or None where it is not reported."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except  (some backends raise instead of returning None)
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


def peak_host_memory_bytes() -> int:
  """The peak resident memory of this process so far (ru_maxrss): what a CPU run uses, where the
  devices report no memory statistics (data, compiled programs and Python included)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == 'darwin' else peak * 1024)  # bytes on macOS, KiB on Linux


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}: nested mappings (a config as a dict) as dotted keys."""
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      out.update(flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of `workdir/metrics.jsonl` in file order ([] when there is none)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        records.append(json.loads(line))
  return records


def series(records: Iterable[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of every record holding `key`."""
  steps, values = [], []
  for r in records:
    if key in r and r[key] is not None:
      steps.append(int(r['step']))
      values.append(float(r[key]))
  return steps, values


def _json_value(v: Any) -> Any:
  """Python scalars for json: ints stay ints, everything numeric else (numpy, jax) becomes float."""
  if isinstance(v, (bool, str)):
    return v
  if isinstance(v, (int, np.integer)):
    return int(v)
  return float(v)


class MetricWriter:
  """Appends records to metrics.jsonl and TensorBoard; a no-op on processes other than 0."""

  def __init__(self, workdir: str, *, enabled: bool, resume_step: int = 0):
    """Opens the writers; drops any records with step > `resume_step` (left by an interrupted run)
    and any test record (left by a finished run that is now extended: it is tested again at its new
    end)."""
    self.enabled = enabled
    self._tb = None
    self._path = os.path.join(workdir, METRICS_FILE)
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    kept = [r for r in read_metrics(workdir) if int(r['step']) <= resume_step
            and not any(k.startswith('test/') for k in r)]
    tmp = self._path + '.tmp'
    with open(tmp, 'w') as f:
      for r in kept:
        f.write(json.dumps(r) + '\n')
    os.replace(tmp, self._path)
    import tensorboardX  # pylint: disable=import-outside-toplevel  (only process 0 needs it)
    # purge_step hides events at or after it that an interrupted run had already written.
    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                                          purge_step=resume_step + 1)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """One record: `scalars` maps 'split/name' to a number (None values are skipped)."""
    if not self.enabled:
      return
    record = {'step': int(step)}
    for k, v in scalars.items():
      if v is None:
        continue
      record[k] = _json_value(v)
    with open(self._path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    for k, v in record.items():
      if k != 'step' and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        self._tb.add_scalar(k, v, global_step=int(step))
    self._tb.flush()

  def write_config(self, config: Mapping[str, Any], metrics: Iterable[str], step: int = 0) -> None:
    """The run's config in TensorBoard: its flattened fields as hyper-parameters (shown against
    `metrics`, scalar tags this run writes, e.g. 'validation/accuracy') and as a text table."""
    if not self.enabled:
      return
    from tensorboardX import summary  # pylint: disable=import-outside-toplevel

    flat = flatten(config)
    # HParams takes numbers, strings and bools; tuples, lists and None are shown as text.
    hparams = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
               for k, v in flat.items()}
    writer = self._tb.file_writer
    for proto in summary.hparams(hparams, {name: 0.0 for name in metrics}):
      writer.add_summary(proto, global_step=int(step))
    rows = '\n'.join(f'| {k} | {json.dumps(v)} |' for k, v in sorted(flat.items()))
    self._tb.add_text('config', f'| field | value |\n|---|---|\n{rows}', global_step=int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
