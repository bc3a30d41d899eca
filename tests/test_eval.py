"""eval.py: --workdir evaluates the best checkpoint; --compare writes a table and validation curves."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from efficient_attn import compare
from efficient_attn import train_lib
from test_train import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Two finished tiny runs (full and local attention) and one without results (unfinished)."""
  root = tmp_path_factory.mktemp('runs')
  cache = str(root / 'cache')
  out = {}
  for name in ('full', 'local'):
    config = tiny_config(cache, name, steps=4, eval_every=2, checkpoint_every=4, log_every=2)
    config.model.dropout_rate = 0.0
    workdir = str(root / f'listops-{name}')
    out[name] = (workdir, train_lib.train_and_evaluate(config, workdir))
  unfinished = root / 'listops-unfinished'
  unfinished.mkdir()
  with open(unfinished / 'config.json', 'w') as f:
    json.dump({'task': 'listops', 'attention': {'name': 'strided', 'layer_overrides': '0:full'}}, f)
  out['unfinished'] = (str(unfinished), None)
  return out


def _eval_cli(*args: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, os.path.join(REPO, 'eval.py'), *args], cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_eval_cli_workdir_compare_and_errors(runs, tmp_path):
  """The three invocations run in parallel: --workdir, --compare and a bad workdir."""
  full_dir, full_results = runs['full']
  local_dir, local_results = runs['local']
  out_dir = str(tmp_path / 'comparison')
  procs = {
      'workdir': _eval_cli(f'--workdir={full_dir}'),
      'compare': _eval_cli('--compare', full_dir, local_dir, f'--out={out_dir}'),
      'missing': _eval_cli(f'--workdir={tmp_path / "nothing-here"}'),
  }
  outputs = {name: proc.communicate(timeout=600) + (proc.returncode,)
             for name, proc in procs.items()}

  stdout, stderr, code = outputs['workdir']
  assert code == 0, stderr[-3000:]
  line = stdout.strip().splitlines()[-1]
  assert line.startswith(f'test accuracy {full_results["test/accuracy"]:.4f}'), line
  assert f'best validation checkpoint: step {full_results["best_step"]}' in line

  stdout, stderr, code = outputs['compare']
  assert code == 0, stderr[-3000:]
  with open(os.path.join(out_dir, 'comparison.md')) as f:
    table = f.read()
  assert table in stdout
  rows = [r for r in table.splitlines() if r.startswith('| listops-')]
  assert len(rows) == 2
  for row, results in zip(rows, (full_results, local_results)):
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells[2] == results['variant']
    assert cells[3] == f'{100 * results["test/accuracy"]:.2f}%'
    assert cells[4] == str(results['best_step'])
    assert cells[8] == f'{results["num_params"]:,d}'
  with open(os.path.join(out_dir, 'validation_curves.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'

  stdout, stderr, code = outputs['missing']
  assert code == 1
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and 'is not a training workdir' in lines[0], stderr


def test_comparison_of_finished_and_unfinished_runs(runs, tmp_path):
  dirs = [runs['full'][0], runs['unfinished'][0]]
  table_path, curves_path = compare.write_comparison(dirs, str(tmp_path))
  with open(table_path) as f:
    table = f.read()
  assert '| listops-unfinished | listops | strided+0:full | unfinished |' in table
  assert os.path.getsize(curves_path) > 1000
  full = compare.load_run(runs['full'][0])
  assert full.curve_steps == [2, 4] and len(full.curve_values) == 2
  with pytest.raises(FileNotFoundError, match='not a training workdir'):
    compare.load_run(str(tmp_path / 'nothing'))
  with pytest.raises(ValueError, match='No workdirs'):
    compare.write_comparison([], str(tmp_path))


def test_evaluate_workdir_matches_the_reported_test_metrics(runs):
  workdir, results = runs['local']
  metrics, record = train_lib.evaluate_workdir(workdir)
  assert record['step'] == results['best_step']
  assert metrics['accuracy'] == results['test/accuracy']
  assert metrics['loss'] == pytest.approx(results['test/loss'], rel=1e-6)
  validation, _ = train_lib.evaluate_workdir(workdir, 'validation')
  assert validation['accuracy'] == results['validation/accuracy']
  with pytest.raises(ValueError, match='split'):
    train_lib.evaluate_workdir(workdir, 'train')
