"""The benchmark runs end to end on tiny sizes and reports what it measured."""
import json
import os

from efficient_attn import benchmark


def test_benchmark_smoke(tmp_path):
  rows = benchmark.main(['--lengths', '64,128', '--variants', 'full,local,bigbird', '--heads', '2',
                         '--head_dim', '8', '--keys', '32', '--repeats', '1', '--no_baselines',
                         '--out', str(tmp_path)])
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


def test_sliding_window_baselines_equal_the_local_reference():
  """The baselines are real sliding windows: equal to `local`'s dense reference, values and grads
  (a length that is no multiple of the window, bidirectional and causal)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import efficient_attn as ea  # pylint: disable=g-import-not-at-top
  window, shape = 6, (1, 40, 2, 8)
  q, k, v, cot = (jnp.asarray(np.random.RandomState(s).randn(*shape), jnp.float32) for s in range(4))
  local = ea.make_attention('local', window=window)
  rel = lambda x, ref: float(jnp.max(jnp.abs(x - ref)) / jnp.max(jnp.abs(ref)))
  for causal in (False, True):
    ref_fn = lambda q, k, v: local.reference(q, k, v, causal=causal)
    for fn in (benchmark.plain_local_attention, benchmark.jax_local_attention):
      base_fn = lambda q, k, v: fn(q, k, v, window=window, causal=causal)
      out, vjp = jax.vjp(base_fn, q, k, v)
      out_ref, vjp_ref = jax.vjp(ref_fn, q, k, v)
      assert rel(out, out_ref) <= 1e-5, (fn.__name__, causal)
      for g, g_ref in zip(vjp(cot), vjp_ref(cot)):
        assert rel(g, g_ref) <= 1e-5, (fn.__name__, causal)


def test_local_brings_its_baselines(tmp_path):
  rows = benchmark.main(['--lengths', '64', '--variants', 'local', '--heads', '2', '--head_dim', '8',
                         '--keys', '16', '--repeats', '1', '--out', str(tmp_path)])
  assert [r['variant'] for r in rows] == ['local', 'plain_local', 'jax_local']
  assert all('error' not in r for r in rows), rows
  assert all(r['options'] == {'window': 8} for r in rows)
  table = (tmp_path / 'benchmark.md').read_text()
  assert 'time / plain_local' in table
  local_row = next(l for l in table.splitlines() if l.startswith('| 64 | local |'))
  assert local_row.rstrip(' |').split(' | ')[-1].replace('.', '').isdigit()  # memory ratio shown
