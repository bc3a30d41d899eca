"""Side-by-side comparison of finished runs: a Markdown table and a PNG of validation curves.

The PNG has one panel per task (tasks have different metrics and scales), titled, with axis labels.

Reads only what `train_and_evaluate` leaves in each workdir (results.json, metrics.jsonl,
config.json); evaluates nothing.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

from efficient_attn import metrics as metrics_lib

TABLE_FILE = 'comparison.md'
CURVES_FILE = 'validation_curves.png'


@dataclasses.dataclass
class RunSummary:
  """What the comparison shows of one run."""

  workdir: str
  task: str
  kind: str
  variant: str
  results: dict[str, Any] | None  # results.json; None while the run has not finished
  curve_steps: list[int]
  curve_values: list[float]  # validation accuracy, or bits per byte for 'lm'

  @property
  def metric(self) -> str:
    return 'bits_per_byte' if self.kind == 'lm' else 'accuracy'

  @property
  def label(self) -> str:
    return f'{self.variant} ({os.path.basename(os.path.normpath(self.workdir))})'


def load_run(workdir: str) -> RunSummary:
  """The summary of one workdir. Raises FileNotFoundError if it holds no run."""
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{workdir!r} is not a training workdir (no config.json).')
  with open(config_path) as f:
    config = json.load(f)
  results = None
  results_path = os.path.join(workdir, 'results.json')
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
  attention = config.get('attention', {})
  variant = attention.get('name', '?')
  if attention.get('layer_overrides'):
    variant += '+' + attention['layer_overrides']
  task = config.get('task', '?')
  kind = (results or {}).get('kind') or ('lm' if task == 'lm' else 'classify')
  metric = 'bits_per_byte' if kind == 'lm' else 'accuracy'
  steps, values = metrics_lib.series(metrics_lib.read_metrics(workdir), f'validation/{metric}')
  return RunSummary(workdir=workdir, task=task, kind=kind, variant=variant, results=results,
                    curve_steps=steps, curve_values=values)


def _bytes(n: Any) -> str:
  if n is None:
    return 'n/a'
  n = float(n)
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if n < 1024 or unit == 'GiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.2f} {unit}'
    n /= 1024
  return f'{n:.2f} GiB'


def _number(x: Any, fmt: str) -> str:
  return 'n/a' if x is None else format(x, fmt)


def _memory(results: dict[str, Any]) -> str:
  """Peak device memory, else (CPU: the device reports none) the process's peak resident memory."""
  if results.get('peak_memory_bytes') is not None or results.get('host_memory_bytes') is None:
    return _bytes(results.get('peak_memory_bytes'))
  return f'{_bytes(results["host_memory_bytes"])} (host)'


def markdown_table(runs: Sequence[RunSummary], notes: dict[str, str] | None = None) -> str:
  """One row per run: variant, test metric of the best checkpoint, speed, memory, parameters.

  `notes` maps a workdir to what its test cell says while it has no result (e.g. 'failed (exit
  3)'; default 'unfinished').
  """
  header = ('| run | task | variant | test accuracy / bits per byte | best step | steps/s | tokens/s '
            '| peak memory | parameters |')
  lines = [header, '|' + '---|' * 9]
  for run in runs:
    r = run.results or {}
    test = r.get(f'test/{run.metric}')
    if test is None:
      test_text = (notes or {}).get(run.workdir, 'unfinished')
    elif run.metric == 'accuracy':
      test_text = f'{100 * test:.2f}%'
    else:
      test_text = f'{test:.4f} bpb'
    lines.append('| ' + ' | '.join([
        os.path.basename(os.path.normpath(run.workdir)), run.task, run.variant, test_text,
        _number(r.get('best_step'), 'd'), _number(r.get('steps_per_sec'), '.2f'),
        _number(r.get('tokens_per_sec'), ',.0f'), _memory(r),
        _number(r.get('num_params'), ',d')]) + ' |')
  return '\n'.join(lines) + '\n'


_METRIC_LABELS = {'accuracy': 'validation accuracy', 'bits_per_byte': 'validation bits per byte'}
_PANELS_PER_ROW = 3


def validation_curves_figure(runs: Sequence[RunSummary]):
  """A matplotlib Figure: one panel per task, the validation curve of each of its runs.

  Each panel is titled with its task and metric and labels its axes (training step; validation
  accuracy, or bits per byte for 'lm': lower is better); tasks come in order of first appearance.
  A run without validation points yet is listed in the legend as such.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')  # headless: no display on training machines
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  if not runs:
    raise ValueError('No runs to plot.')
  tasks = list(dict.fromkeys(run.task for run in runs))
  cols = min(len(tasks), _PANELS_PER_ROW)
  rows = -(-len(tasks) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 4.3 * rows), squeeze=False)
  for ax, task in zip(axes.flat, tasks):
    task_runs = [run for run in runs if run.task == task]
    metric = task_runs[0].metric
    for run in task_runs:
      if run.curve_steps:
        ax.plot(run.curve_steps, run.curve_values, marker='o', markersize=3, label=run.label)
      else:
        ax.plot([], [], linestyle='none', label=f'{run.label}: no validation yet')
    direction = 'lower is better' if metric == 'bits_per_byte' else 'higher is better'
    ax.set_title(f'{task}: {_METRIC_LABELS[metric]} ({direction})')
    ax.set_xlabel('training step')
    ax.set_ylabel(_METRIC_LABELS[metric])
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')
  for ax in list(axes.flat)[len(tasks):]:
    ax.remove()  # unused cells of the last row
  fig.suptitle(f'Validation curves of {len(runs)} run{"s" if len(runs) != 1 else ""}')
  fig.tight_layout()
  return fig


def plot_validation_curves(runs: Sequence[RunSummary], path: str) -> None:
  """Writes `validation_curves_figure(runs)` to `path` as a PNG."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig = validation_curves_figure(runs)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_comparison(workdirs: Sequence[str], out_dir: str) -> tuple[str, str]:
  """Writes out_dir/comparison.md and out_dir/validation_curves.png; returns their paths."""
  if not workdirs:
    raise ValueError('No workdirs to compare.')
  runs = [load_run(w) for w in workdirs]
  os.makedirs(out_dir, exist_ok=True)
  table_path = os.path.join(out_dir, TABLE_FILE)
  with open(table_path, 'w') as f:
    f.write(markdown_table(runs))
  curves_path = os.path.join(out_dir, CURVES_FILE)
  plot_validation_curves(runs, curves_path)
  return table_path, curves_path
