"""train_and_evaluate end to end on tiny ListOps: learning, NaN stop, best checkpoint, config errors.

Runs in-process with `configs/listops.py:tiny` (a 1-layer, 16-wide model, ten steps on 64 examples of
10-40 tokens). Every variant: test_train_variants.py; interrupted and resumed runs:
test_train_resume.py; the pieces (schedules, checkpoints, metric files, mesh): test_train_parts.py.
"""
from __future__ import annotations

import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import listops
from efficient_attn import checkpointing
from efficient_attn import metrics as metrics_lib
from efficient_attn import train_lib
from efficient_attn.attention import api

@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data_cache'))


def tiny_config(cache_dir: str, attention: str = 'full', **train):
  config = listops.get_config(f'attention={attention},tiny')
  config.data.cache_dir = cache_dir
  config.train.progress_bar = False
  # The variant's own small options, so its sparse path (not a window wider than the sequence) runs.
  config.attention.options.update(
      api.variant_class(attention).small_options(heads=config.model.num_heads))
  for key, value in train.items():
    config.train[key] = value
  return config


def test_loss_falls_and_everything_is_logged(cache_dir, tmp_path):
  config = tiny_config(cache_dir, 'local', steps=40, eval_every=20, checkpoint_every=20,
                       log_every=5)
  config.optimizer.learning_rate = 1e-2
  config.optimizer.warmup_steps = 5
  results = train_lib.train_and_evaluate(config, str(tmp_path))
  records = metrics_lib.read_metrics(str(tmp_path))
  _, losses = metrics_lib.series(records, 'train/loss')
  assert len(losses) == 8
  assert np.mean(losses[-2:]) < losses[0] - 0.2, losses
  train = [r for r in records if 'train/loss' in r]
  for key in ('train/accuracy', 'train/learning_rate', 'train/steps_per_sec',
              'train/tokens_per_sec', 'train/grad_norm'):
    assert all(key in r for r in train), key
  # tokens/s = steps/s x global batch x padded tokens per example (CLS excluded: it is the model's).
  r = train[-1]
  assert math.isclose(r['train/tokens_per_sec'],
                      r['train/steps_per_sec'] * config.train.batch_size * config.data.max_length,
                      rel_tol=1e-6)
  # Warmup then cosine decay: the lr rises over the first 5 steps, then falls.
  lrs = metrics_lib.series(records, 'train/learning_rate')[1]
  assert lrs[0] == pytest.approx(1e-2) and lrs[-1] < lrs[1] < lrs[0]
  steps, _ = metrics_lib.series(records, 'validation/accuracy')
  assert steps == [20, 40] and results['best_step'] in (20, 40)
  assert os.listdir(tmp_path / 'tensorboard')
  assert sorted(os.listdir(tmp_path / 'checkpoints' / 'latest')) == ['20', '40']


class _PoisonModel(nnx.Module):
  """Wraps a model: a batch whose first token id is negative gives NaN logits."""

  def __init__(self, inner):
    self.inner = inner

  def __call__(self, inputs, mask, *, train):
    poisoned = jnp.any(inputs < 0)
    logits = self.inner(jnp.maximum(inputs, 0), mask, train=train)
    return jnp.where(poisoned, jnp.nan, logits)


def test_nan_loss_stops_the_run_naming_the_step(cache_dir, tmp_path):
  base = train_lib.default_components()

  def create_model(*args, **kwargs):
    return _PoisonModel(base.create_model(*args, **kwargs))

  def train_batches(split, batch_size, *, seed, start_step=0, **kw):
    for step, batch in enumerate(base.train_batches(split, batch_size, seed=seed,
                                                    start_step=start_step, **kw), start_step):
      if step == 6:  # the batch of update 7
        batch['inputs'] = batch['inputs'].copy()
        batch['inputs'][0, 0] = -1
      yield batch

  components = train_lib.Components(base.load_task, train_batches, base.eval_batches, create_model,
                                    base.count_params)
  config = tiny_config(cache_dir, steps=10, log_every=5, eval_every=10, checkpoint_every=5)
  with pytest.raises(train_lib.NonFiniteLossError, match=r'Training loss is nan at step 7\b'):
    train_lib.train_and_evaluate(config, str(tmp_path), components=components)
  # The check ran before the step-10 checkpoint: only the good step-5 one exists.
  ckpt = checkpointing.Checkpointer(str(tmp_path), read_only=True)
  assert ckpt.latest_step() == 5
  ckpt.close()


def test_test_split_uses_the_best_validation_checkpoint_not_the_last(cache_dir, tmp_path):
  """Validation is rigged: every evaluation but the second sees impossible labels (accuracy 0), so
  the best checkpoint is step 4 of 10 whatever the model learns; test must use it."""
  base = train_lib.default_components()
  calls = {'validation': 0}
  task = base.load_task(tiny_config(cache_dir).data)

  def eval_batches(split, batch_size, **kw):
    is_validation = split is task.validation
    if is_validation:
      calls['validation'] += 1
    for batch in base.eval_batches(split, batch_size, **kw):
      if is_validation and calls['validation'] != 2:
        batch['labels'] = np.full_like(batch['labels'], -1)  # argmax is never -1: accuracy 0
      yield batch

  def load_task(data_config):
    return task

  components = train_lib.Components(load_task, base.train_batches, eval_batches,
                                    base.create_model, base.count_params)
  config = tiny_config(cache_dir, steps=10, eval_every=2, checkpoint_every=5)
  results = train_lib.train_and_evaluate(config, str(tmp_path), components=components)
  assert calls['validation'] == 5
  assert results['best_step'] == 4 and results['validation/accuracy'] > 0
  records = metrics_lib.read_metrics(str(tmp_path))
  steps, accuracies = metrics_lib.series(records, 'validation/accuracy')
  assert steps == [2, 4, 6, 8, 10] and accuracies[0] == accuracies[2] == 0.0
  [test_record] = [r for r in records if 'test/accuracy' in r]
  assert test_record['test/best_step'] == 4

  # Evaluating the best checkpoint again gives the reported test numbers; the last (step 10)
  # parameters are different ones.
  metrics, record = train_lib.evaluate_workdir(str(tmp_path), components=components)
  assert record['step'] == 4
  assert metrics['accuracy'] == results['test/accuracy']
  assert metrics['loss'] == pytest.approx(results['test/loss'], rel=1e-6)
  best_dir = tmp_path / 'checkpoints' / 'best'
  assert os.listdir(best_dir) == ['4']
  latest = checkpointing.Checkpointer(str(tmp_path), read_only=True)
  assert latest.latest_step() == 10
  latest.close()


def test_config_errors_are_raised_before_any_work(cache_dir, tmp_path):
  config = tiny_config(cache_dir)
  config.train.batch_size = 0
  with pytest.raises(train_lib.ConfigError, match='train.batch_size must be a positive integer'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'a'))
  config = tiny_config(cache_dir)
  config.optimizer.schedule = 'linear'
  with pytest.raises(train_lib.ConfigError, match='optimizer.schedule must be one of rsqrt'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'b'))
  config = tiny_config(cache_dir)
  config.mesh.data = 3
  with pytest.raises(train_lib.ConfigError, match='mesh'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'c'))
  config = tiny_config(cache_dir)
  config.model.emb_dim = 15
  with pytest.raises(train_lib.ConfigError, match='emb_dim'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'd'))
  config = tiny_config(cache_dir, 'local')
  config.attention.options.window = -2
  with pytest.raises(train_lib.ConfigError, match='window'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'e'))
  assert not any(os.path.exists(tmp_path / d) for d in 'abcde')
