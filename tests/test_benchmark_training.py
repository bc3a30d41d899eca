"""The training benchmark (LRA Table 2) runs end to end on a tiny model and reports what it measured."""
import json
import os
import subprocess
import sys

import pytest

from efficient_attn import benchmark_training as bt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_run_reports_every_row(tmp_path):
  # 'local' only: 'full' is added as the baseline. Every run is its own process (about 7 s each).
  argv = ['--lengths', '64,128', '--variants', 'local', '--steps', '1', '--warmup', '1', '--model',
          'tiny', '--out', str(tmp_path)]
  assert bt.main(argv) == 0
  results = json.loads((tmp_path / bt.RESULTS_FILE).read_text())
  rows = {(r['variant'], r['length']): r for r in results['rows']}
  assert sorted(rows) == [('full', 64), ('full', 128), ('local', 64), ('local', 128)]
  for (variant, n), r in rows.items():
    assert 'error' not in r, r
    assert r['steps_per_sec'] > 0 and r['compiled_bytes'] > 0 and r['host_peak_bytes'] > 0
    assert r['temp_bytes'] > 0 and 0 < r['baseline_host_bytes'] <= r['host_peak_bytes']
    assert r['alias_bytes'] > 0  # the state is donated, as in training
    assert r['num_params'] > 0 and r['loss'] > 0
    base = rows[('full', n)]
    if variant == 'full':
      assert r['speed_vs_full'] == r['compiled_vs_full'] == r['peak_vs_full'] == 1.0
    else:
      assert r['speed_vs_full'] == r['steps_per_sec'] / base['steps_per_sec']
      assert r['compiled_vs_full'] == r['compiled_bytes'] / base['compiled_bytes']
      assert r['attention_options']['window'] == 128  # the variant's default, as trained
  # Longer inputs need more memory: the compiled figure is deterministic.
  assert rows[('full', 128)]['compiled_bytes'] > rows[('full', 64)]['compiled_bytes']
  assert results['machine'].startswith('CPU') and results['jax_version']
  assert '--lengths 64,128' in results['command']
  table = (tmp_path / bt.TABLE_FILE).read_text()
  assert 'steps/s n=64' in table and 'compiled mem n=128' in table and 'peak mem n=128' in table
  body = [l for l in table.splitlines() if l.startswith('| full |') or l.startswith('| local |')]
  assert len(body) == 2 and body[0].count('(1.00x)') == 2 and body[0].count('(1.00)') == 4
  assert os.path.getsize(tmp_path / bt.PLOT_FILE) > 10_000
  assert not (tmp_path / 'partial.json').exists()

  # --render rebuilds the same table from the saved results.
  out2 = tmp_path / 'again'
  assert bt.main(['--render', str(tmp_path / bt.RESULTS_FILE), '--out', str(out2)]) == 0
  assert (out2 / bt.TABLE_FILE).read_text() == table


def test_failed_run_is_a_row_not_a_crash():
  """A run that cannot be built (here: a length below the Text data's minimum of 2, which the
  command line refuses earlier) comes back as a row with a one-line error, and the table says so."""
  spec = bt.RunSpec(variant='local', length=1, batch_size=1, steps=1, warmup=0, model='tiny',
                    options='default', keys=8, dtype='float32', memory_budget_gb=0.0)
  row = bt.measure(spec)
  assert 'error' in row and '\n' not in row['error'] and 'max_length' in row['error']
  rows = [row]
  bt.add_ratios(rows)
  assert '| local | failed: ' in bt.markdown_table(rows)


@pytest.mark.parametrize('argv, flag', [
    (['--variants', 'full,nope'], '--variants'),
    (['--lengths', '1024,abc'], '--lengths'),
    (['--lengths', '1'], '--lengths'),
    (['--steps', '0'], '--steps'),
    (['--steps', 'abc'], '--steps'),  # argparse's own error
    (['--model', 'huge'], '--model'),
    (['--render', 'no/such/results.json'], '--render'),
])
def test_bad_command_line_is_one_line(argv, flag, capsys, tmp_path):
  try:
    code = bt.main(argv + ['--out', str(tmp_path)])
  except SystemExit as e:  # argparse exits itself
    code = e.code
  assert code == bt.EXIT_USAGE
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and '\n' not in err and flag in err
  assert not os.listdir(tmp_path)  # nothing was run


def test_command_line_exit_code():
  proc = subprocess.run([sys.executable, '-m', 'efficient_attn.benchmark_training', '--variants',
                         'nope'], cwd=ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().count('\n') == 0 and "'nope'" in proc.stderr
  assert 'full' in proc.stderr  # the valid names are listed
