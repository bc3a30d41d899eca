"""The comparison figure: one titled panel per task with labelled axes (checked on matplotlib objects)."""
from __future__ import annotations

import os

import pytest

from efficient_attn import compare


def _run(workdir, task, variant, steps, values):
  kind = 'lm' if task == 'lm' else 'classify'
  return compare.RunSummary(workdir=workdir, task=task, kind=kind, variant=variant, results=None,
                            curve_steps=steps, curve_values=values)


RUNS = [
    _run('runs/listops-full', 'listops', 'full', [10, 20], [0.2, 0.3]),
    _run('runs/lm-local', 'lm', 'local', [5, 10, 15], [4.0, 3.1, 2.7]),
    _run('runs/listops-local', 'listops', 'local', [10, 20], [0.25, 0.35]),
    _run('runs/lm-new', 'lm', 'bigbird', [], []),  # no validation yet
]


def test_one_titled_panel_per_task_with_axis_labels(tmp_path):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig = compare.validation_curves_figure(RUNS)
  try:
    axes = fig.get_axes()
    assert len(axes) == 2  # listops and lm, in order of first appearance
    listops, lm = axes
    assert listops.get_title().startswith('listops: validation accuracy')
    assert lm.get_title().startswith('lm: validation bits per byte') and 'lower' in lm.get_title()
    for ax, ylabel in ((listops, 'validation accuracy'), (lm, 'validation bits per byte')):
      assert ax.get_xlabel() == 'training step' and ax.get_ylabel() == ylabel
    # Each panel holds its own task's runs only.
    assert [line.get_label() for line in listops.get_lines()] == [
        'full (listops-full)', 'local (listops-local)']
    assert [list(line.get_ydata()) for line in listops.get_lines()] == [[0.2, 0.3], [0.25, 0.35]]
    legend = [t.get_text() for t in lm.get_legend().get_texts()]
    assert legend == ['local (lm-local)', 'bigbird (lm-new): no validation yet']
    assert fig.get_suptitle() == 'Validation curves of 4 runs'
  finally:
    plt.close(fig)
  path = tmp_path / 'curves.png'
  compare.plot_validation_curves(RUNS, str(path))
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert os.path.getsize(path) > 10_000


def test_many_tasks_wrap_into_rows():
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  runs = [_run(f'runs/{t}', t, 'full', [1], [0.5]) for t in ('a', 'b', 'c', 'd')]
  fig = compare.validation_curves_figure(runs)
  try:
    assert [ax.get_title().split(':')[0] for ax in fig.get_axes()] == ['a', 'b', 'c', 'd']
  finally:
    plt.close(fig)
  with pytest.raises(ValueError, match='No runs'):
    compare.validation_curves_figure([])
