"""The benchmark runs end to end on tiny sizes and reports what it measured."""
import json
import os

from efficient_attn import benchmark


def test_benchmark_smoke(tmp_path):
  rows = benchmark.main(['--lengths', '64,128', '--variants', 'full,local,bigbird', '--heads', '2',
                         '--head_dim', '8', '--keys', '32', '--repeats', '1', '--out', str(tmp_path)])
  assert len(rows) == 6
  for row in rows:
    assert 'error' not in row, row
    assert row['fwd_s'] > 0 and row['fwd_bwd_s'] > 0 and row['temp_bytes'] > 0
  report = json.loads((tmp_path / 'benchmark.json').read_text())
  assert report['machine'].startswith('CPU') and len(report['rows']) == 6
  table = (tmp_path / 'benchmark.md').read_text()
  assert '| 128 | local |' in table and 'x |' in table  # ratios against full were computed
  assert os.path.getsize(tmp_path / 'benchmark.png') > 10_000


def test_benchmark_reports_out_of_reach(tmp_path):
  rows = benchmark.main(['--lengths', '256', '--variants', 'full', '--heads', '2', '--head_dim', '8',
                         '--memory_budget_gb', '0.0001', '--out', str(tmp_path)])
  assert rows[0]['error'].startswith('out of reach')


def test_options_come_from_the_variant_classes():
  """One source of per-variant settings: each class's `preset`; every registered variant is valid."""
  import efficient_attn as ea  # pylint: disable=g-import-not-at-top
  from efficient_attn.attention.api import variant_class  # pylint: disable=g-import-not-at-top
  for name in ea.ATTENTION_NAMES:
    for keys in (32, 512):
      options = benchmark.preset_options(name, keys)
      assert options == variant_class(name).preset(keys)
      ea.make_attention(name, **options)  # valid options
  assert benchmark.preset_options('cudnn', 512) == {}
