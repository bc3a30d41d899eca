"""The pieces of the training loop: schedules and optimizer, checkpoints, metric files, mesh, errors."""
from __future__ import annotations

import datetime
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from efficient_attn import checkpointing
from efficient_attn import cli
from efficient_attn import metrics as metrics_lib
from efficient_attn import objectives
from efficient_attn import optimization
from efficient_attn import sharding
from efficient_attn import train_lib


def optimizer_config(**overrides):
  c = common.base_optimizer()
  c.update(overrides)
  return c


# -- schedules and optimizer -----------------------------------------------------------------------


def test_rsqrt_schedule_is_lra_with_its_peak_as_parameter():
  base, warmup = 0.05, 1000
  lr = optimization.learning_rate_schedule(
      optimizer_config(learning_rate=common.lra_rsqrt_peak(base, warmup), warmup_steps=warmup), 5000)
  for count in (0, 499, 999, 1000, 2999, 4999):
    c = count + 1  # LRA's factor for the (count + 1)-th update
    expected = base * min(1.0, c / warmup) / math.sqrt(max(c, warmup))
    assert float(lr(count)) == pytest.approx(expected, rel=1e-5)


def test_cosine_and_constant_schedules():
  lr = optimization.learning_rate_schedule(
      optimizer_config(schedule='cosine', learning_rate=1.0, warmup_steps=10,
                       end_learning_rate_factor=0.1), 110)
  assert float(lr(0)) == pytest.approx(0.1) and float(lr(9)) == pytest.approx(1.0)
  mid = float(lr(59))  # halfway through the decay: (peak + end) / 2
  assert mid == pytest.approx(0.55, abs=0.01)
  assert 0.1 < float(lr(109)) < 0.11  # the last update keeps a little more than the end value
  values = [float(lr(c)) for c in range(10, 110)]
  assert all(a >= b for a, b in zip(values, values[1:]))
  const = optimization.learning_rate_schedule(
      optimizer_config(schedule='constant', learning_rate=0.3, warmup_steps=0), 100)
  assert float(const(0)) == float(const(99)) == pytest.approx(0.3)


@pytest.mark.parametrize('field, value, message', [
    ('schedule', 'linear', 'optimizer.schedule must be one of'),
    ('learning_rate', 0.0, 'learning_rate must be a finite number > 0'),
    ('learning_rate', math.inf, 'learning_rate must be a finite number > 0, got inf'),
    ('warmup_steps', -1, 'warmup_steps must be an integer >= 0'),
    ('b2', 1.0, r'b2 must be in \[0, 1\)'),
    ('b1', math.nan, r'b1 must be in \[0, 1\)'),
    ('grad_clip_norm', -1.0, 'grad_clip_norm must be a finite number >= 0'),
    ('eps', math.nan, 'eps must be a finite number >= 0, got nan'),
    ('weight_decay', math.inf, 'weight_decay must be a finite number >= 0, got inf'),
])
def test_bad_optimizer_options(field, value, message):
  with pytest.raises(ValueError, match=message):
    optimization.check_optimizer_config(optimizer_config(**{field: value}))


def test_adamw_decays_matrices_only_and_clips():
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}
  zero = jax.tree.map(jnp.zeros_like, params)
  tx, _ = optimization.make_optimizer(
      optimizer_config(schedule='constant', learning_rate=0.1, warmup_steps=0, weight_decay=0.5,
                       grad_clip_norm=0.0), 10)
  updates, _ = tx.update(zero, tx.init(params), params)
  # Zero gradients: only weight decay moves the weights, and only the matrix.
  np.testing.assert_allclose(updates['kernel'], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates['bias'], np.zeros(2))
  tx, _ = optimization.make_optimizer(
      optimizer_config(schedule='constant', learning_rate=0.1, warmup_steps=0, weight_decay=0.0,
                       grad_clip_norm=1.0), 10)
  state = tx.init(params)
  huge = jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), params)
  clipped = optax.clip_by_global_norm(1.0).update(huge, optax.EmptyState())[0]
  assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-5)
  updates, _ = tx.update(huge, state, params)
  assert np.all(np.isfinite(updates['kernel']))


# -- objectives ------------------------------------------------------------------------------------


def test_classification_sums_respect_weights():
  logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [5.0, 0.0]])
  batch = {'labels': jnp.array([0, 0, 1]), 'weights': jnp.array([1.0, 1.0, 0.0])}
  sums = objectives.batch_sums('classify', logits, batch)
  assert float(sums['count']) == 2 and float(sums['correct']) == 1
  nll = -jax.nn.log_softmax(logits)
  assert float(sums['loss_sum']) == pytest.approx(float(nll[0, 0] + nll[1, 0]))
  metrics = objectives.summarize('classify', jax.device_get(sums))
  assert metrics['accuracy'] == 0.5


def test_lm_bits_per_byte_of_a_uniform_model_is_log2_of_the_vocabulary():
  labels = jnp.array([[5, 6, 7, 0]])  # the last position is padding
  batch = {'labels': labels, 'mask': jnp.array([[True, True, True, False]]),
           'weights': jnp.array([1.0])}
  logits = jnp.zeros((1, 4, 256))
  metrics = objectives.summarize('lm', jax.device_get(objectives.batch_sums('lm', logits, batch)))
  assert metrics['count'] == 3
  assert metrics['bits_per_byte'] == pytest.approx(8.0, rel=1e-6)
  assert objectives.selection_metric('lm') == ('bits_per_byte', 'min')
  assert objectives.selection_metric('classify') == ('accuracy', 'max')


# -- checkpoints -----------------------------------------------------------------------------------


def test_best_checkpoint_keeps_the_best_score_across_restarts(tmp_path):
  state = {'w': jnp.arange(3.0)}
  ckpt = checkpointing.Checkpointer(str(tmp_path), mode='max')
  assert ckpt.best_record() is None and ckpt.is_improvement(0.0)
  for step, score in ((2, 0.3), (4, 0.5), (6, 0.4), (8, 0.5)):
    if ckpt.is_improvement(score):
      ckpt.save_best(step, {'w': state['w'] + step}, metric='accuracy', score=score,
                     metrics={'accuracy': score})
  ckpt.wait()
  ckpt.close()
  again = checkpointing.Checkpointer(str(tmp_path), mode='max')  # a resumed run
  record = again.best_record()
  assert record['step'] == 4 and record['score'] == 0.5  # ties keep the earlier step
  restored, record = again.restore_best(jax.eval_shape(lambda: state))
  np.testing.assert_array_equal(restored['w'], np.arange(3.0) + 4)
  assert not again.is_improvement(0.5) and again.is_improvement(0.51)
  again.close()
  low = checkpointing.Checkpointer(str(tmp_path / 'lm'), mode='min')
  low.save_best(1, state, metric='bits_per_byte', score=3.0, metrics={})
  assert low.is_improvement(2.9) and not low.is_improvement(3.1)
  low.close()


def test_latest_checkpoints_keep_the_last_few(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2)
  for step in (1, 2, 3):
    ckpt.save_latest(step, {'w': jnp.full((2,), float(step)), 'k': jax.random.key(step)})
  ckpt.wait()
  assert ckpt.latest_step() == 3
  assert sorted(p.name for p in (tmp_path / 'checkpoints' / 'latest').iterdir()) == ['2', '3']
  abstract = jax.eval_shape(lambda: {'w': jnp.zeros(2), 'k': jax.random.key(0)})
  restored = ckpt.restore_latest(abstract)
  np.testing.assert_array_equal(restored['w'], [3.0, 3.0])
  np.testing.assert_array_equal(jax.random.key_data(restored['k']),
                                jax.random.key_data(jax.random.key(3)))
  ckpt.close()
  with pytest.raises(ValueError, match='mode'):
    checkpointing.Checkpointer(str(tmp_path), mode='best')


# -- metric files ----------------------------------------------------------------------------------


def test_metric_writer_drops_records_after_the_resume_step(tmp_path):
  writer = metrics_lib.MetricWriter(str(tmp_path), enabled=True)
  for step in range(1, 6):
    writer.write(step, {'train/loss': 1.0 / step, 'train/peak_memory_bytes': None})
  writer.close()
  assert [r['step'] for r in metrics_lib.read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5]
  writer = metrics_lib.MetricWriter(str(tmp_path), enabled=True, resume_step=3)
  writer.write(4, {'train/loss': 0.0})
  writer.close()
  records = metrics_lib.read_metrics(str(tmp_path))
  assert [r['step'] for r in records] == [1, 2, 3, 4] and records[-1]['train/loss'] == 0.0
  assert 'train/peak_memory_bytes' not in records[0]
  assert metrics_lib.series(records, 'train/loss') == ([1, 2, 3, 4], [1.0, 0.5, 1 / 3, 0.0])
  silent = metrics_lib.MetricWriter(str(tmp_path / 'other'), enabled=False)
  silent.write(1, {'train/loss': 1.0})
  assert not (tmp_path / 'other').exists()


def test_peak_memory_device_and_host():
  """The device figure is what the backend reports: nothing on CPU (its devices keep no memory
  statistics), bytes elsewhere. The host figure (peak resident memory) is always there and grows when
  the process holds more memory."""
  peak = metrics_lib.peak_memory_bytes()
  if jax.default_backend() == 'cpu':
    assert peak is None
  else:
    assert isinstance(peak, int) and peak > 0
  with open('/proc/self/status') as f:  # the current resident size, which the peak bounds
    rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmRSS:'))
  before = metrics_lib.peak_host_memory_bytes()
  # ru_maxrss trails the kernel's counters by up to a few hundred KiB.
  assert isinstance(before, int) and before >= 0.95 * rss > 0, (before, rss)
  # Beyond the peak so far by 64 MiB; np.ones touches every page, so all of it is resident.
  block = np.ones((max(before - rss, 0) + (64 << 20)) // 8)
  after = metrics_lib.peak_host_memory_bytes()
  assert after >= rss + 0.9 * block.nbytes, (rss, block.nbytes, after)


# -- mesh and config errors ------------------------------------------------------------------------


def test_mesh_shape_resolves_minus_one_and_rejects_bad_sizes():
  assert sharding.mesh_shape({'data': -1, 'fsdp': 1, 'tensor': 1, 'sequence': 1}, 8) == (8, 1, 1, 1)
  assert sharding.mesh_shape({'data': 2, 'fsdp': -1, 'tensor': 2, 'sequence': 1}, 8) == (2, 2, 2, 1)
  with pytest.raises(ValueError, match='unknown axis'):
    sharding.mesh_shape({'model': 2}, 2)
  with pytest.raises(ValueError, match='at most one axis'):
    sharding.mesh_shape({'data': -1, 'fsdp': -1}, 2)
  with pytest.raises(ValueError, match='multiply to 3'):
    sharding.mesh_shape({'data': 3}, 2)
  with pytest.raises(ValueError, match='does not divide'):
    sharding.mesh_shape({'data': -1, 'tensor': 3}, 4)
  with pytest.raises(ValueError, match='mesh_axis_types'):
    sharding.make_mesh({'data': -1}, 'manual')


def test_batches_are_placed_over_the_batch_axes():
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1, 'sequence': 1})
  placed = sharding.place_batch({'inputs': np.arange(8).reshape(4, 2)}, mesh)
  assert placed['inputs'].shape == (4, 2)
  assert placed['inputs'].sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'))
  np.testing.assert_array_equal(placed['inputs'], np.arange(8).reshape(4, 2))


def test_check_config_names_the_bad_field():
  from configs import listops  # pylint: disable=import-outside-toplevel
  config = listops.get_config('tiny')
  train_lib.check_config(config)
  config.train.eval_every = 0
  with pytest.raises(train_lib.ConfigError, match='train.eval_every must be a positive integer'):
    train_lib.check_config(config)
  config = listops.get_config('tiny')
  config.train.max_eval_batches = 0
  with pytest.raises(train_lib.ConfigError, match='max_eval_batches'):
    train_lib.check_config(config)
  config = listops.get_config('tiny')
  config.rng_impl = 'philox'
  with pytest.raises(train_lib.ConfigError, match='rng_impl must be one of'):
    train_lib.check_config(config)
  with pytest.raises(train_lib.ConfigError, match='lacks section'):
    train_lib.check_config(ml_collections.ConfigDict({'task': 'listops'}))


def test_one_line_error_finds_the_readable_cause():
  try:
    try:
      raise ValueError('Unknown attention variant x; valid: full.')
    except ValueError as inner:
      raise RuntimeError('Traceback (most recent call last):\n  File "x"\nValueError: ...') from inner
  except RuntimeError as outer:
    assert cli.one_line_error(outer) == 'Unknown attention variant x; valid: full.'
  assert cli.one_line_error(ValueError('bad value')) == 'bad value'


def test_override_paths_are_checked_on_the_config():
  """Misspelt --config.* paths are found on the config itself (no parsing of the flag library's
  messages), with the closest field names."""
  from configs import listops  # pylint: disable=import-outside-toplevel
  config = listops.get_config('tiny')
  argv = ['--config=x.py', '--config.train.steps=3', '--noconfig.train.progress_bar',
          '--workdir=w', '--config.attention.options.window', '8']
  assert cli.override_paths(argv) == ['train.steps', 'train.progress_bar',
                                      'attention.options.window']
  for path in cli.override_paths(argv):
    cli.check_override_path(config, path)
  with pytest.raises(ValueError, match=r"unknown config field 'stpes' in config.train \(did you "
                                       r"mean 'steps'\?\)"):
    cli.check_override_path(config, 'train.stpes')
  with pytest.raises(ValueError, match=r"unknown config field 'trian' in the config"):
    cli.check_override_path(config, 'trian.steps')
  with pytest.raises(ValueError, match=r"train.steps is a value \(int\), not a section"):
    cli.check_override_path(config, 'train.steps.x')
  assert cli.flag_value(argv, 'config') == 'x.py'
  assert cli.flag_value(['--config', 'y.py:tiny'], 'config') == 'y.py:tiny'
  assert cli.flag_value([], 'config', 'default.py') == 'default.py'


def test_default_workdir_follows_the_environment(monkeypatch):
  from configs import listops  # pylint: disable=import-outside-toplevel
  config = listops.get_config('tiny')
  now = datetime.datetime(2025, 1, 2, 3, 4, 5)
  monkeypatch.delenv(cli.RUNS_ENV, raising=False)
  assert cli.default_workdir(config, 'local+0:full', now) == os.path.join(
      'runs', 'listops-local+0-full-20250102-030405')
  monkeypatch.setenv(cli.RUNS_ENV, '/scratch/runs')
  assert cli.default_workdir(config, 'local', now) == '/scratch/runs/listops-local-20250102-030405'


def test_format_results_names_the_best_step():
  line = cli.format_results({'task': 'listops', 'variant': 'local', 'kind': 'classify',
                             'test/accuracy': 0.375, 'validation/accuracy': 0.4,
                             'best_step': 1250, 'steps': 1500}, 'runs/x')
  assert 'test accuracy 0.3750' in line and 'step 1250 of 1500' in line and 'runs/x' in line
  line = cli.format_results({'kind': 'lm', 'test/bits_per_byte': 2.5,
                             'validation/bits_per_byte': 2.4, 'best_step': 3})
  assert 'test bits per byte 2.5000' in line
  json.dumps(line)
