"""Every task trains two steps and evaluates through `train_and_evaluate`, for two variants each.

The data are the tiny fixtures of test_data_tasks.py (IMDB-like reviews, AAN-format pairs, CIFAR-like
images in the `datasets` on-disk format, a small text corpus) and a few generated Pathfinder images.
"""
from __future__ import annotations

import importlib
import math

import pytest

from efficient_attn import train_lib
# The fixtures that write the tiny datasets (pytest puts tests/ on sys.path).
from test_data_tasks import aan_dir, cifar_saved, corpus_dir, imdb_saved  # noqa: F401

STEPS = 2
SMALL_OPTIONS = {  # options that fit sequences of tens of tokens
    'local': dict(window=4),
    'longformer': dict(window=4),
    'bigbird': dict(block_size=8, num_random_blocks=1),
    'strided': dict(stride=8),
    'fixed': dict(stride=16, summary=2),
    'dilated': dict(window=4, dilation=2),
    'lsh': dict(bucket_size=16),
}
CASES = [('text', 'local'), ('text', 'longformer'), ('retrieval', 'bigbird'),
         ('retrieval', 'strided'), ('image', 'fixed'), ('image', 'dilated'),
         ('pathfinder', 'local'), ('pathfinder', 'lsh'), ('lm', 'local'), ('lm', 'bigbird')]


def task_config(task, variant, tmp_path, fixture_path):
  config = importlib.import_module(f'configs.{task}').get_config(f'attention={variant},tiny')
  config.attention.options.update(SMALL_OPTIONS[variant])
  config.train.steps = STEPS
  config.train.eval_every = STEPS
  config.train.checkpoint_every = STEPS
  config.train.log_every = 1
  config.model.dropout_rate = 0.0
  data = config.data
  data.cache_dir = str(tmp_path / 'cache')
  if task == 'text':
    data.path, data.max_length, data.num_validation = fixture_path, 48, 3
  elif task == 'retrieval':
    data.path, data.max_length = fixture_path, 32
  elif task == 'image':
    data.path, data.num_validation = fixture_path, 3
  elif task == 'pathfinder':
    data.resolution, data.num_train, data.num_validation, data.num_test = 32, 16, 8, 8
  elif task == 'lm':
    data.corpus, data.path, data.max_length, data.file_suffixes = 'files', fixture_path, 64, ('.txt',)
  return config


@pytest.mark.parametrize('task, variant', CASES)
def test_task_trains_and_evaluates(task, variant, tmp_path, request):
  fixture = {'text': 'imdb_saved', 'retrieval': 'aan_dir', 'image': 'cifar_saved',
             'lm': 'corpus_dir'}.get(task)
  path = request.getfixturevalue(fixture) if fixture else None
  config = task_config(task, variant, tmp_path, path)
  results = train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['steps'] == STEPS and results['variant'] == variant
  metric = 'bits_per_byte' if task == 'lm' else 'accuracy'
  for split in ('validation', 'test'):
    assert math.isfinite(results[f'{split}/loss'])
    assert math.isfinite(results[f'{split}/{metric}'])
  if task == 'lm':  # an untrained byte model is near uniform: about 8 bits per byte, never 0
    assert 4.0 < results['test/bits_per_byte'] < 12.0
