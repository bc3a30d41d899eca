"""Every task trains two steps and evaluates through `train_and_evaluate`: two sparse variants each,
and one model per task whose layers run every linear-time / learned variant (so each of them trains
end to end on every task, the causal LM included where the variant defines causal attention).

The data are the tiny fixtures of test_data_tasks.py (IMDB-like reviews, AAN-format pairs, CIFAR-like
images in the `datasets` on-disk format, a small text corpus) and a few generated Pathfinder images.
"""
from __future__ import annotations

import importlib
import math

import pytest

import efficient_attn as ea
from efficient_attn import train_lib
from efficient_attn.attention import api
# The fixtures that write the tiny datasets (pytest puts tests/ on sys.path).
from test_data_tasks import aan_dir, cifar_saved, corpus_dir, imdb_saved  # noqa: F401

STEPS = 2
CASES = [('text', 'local'), ('text', 'longformer'), ('retrieval', 'bigbird'),
         ('retrieval', 'strided'), ('image', 'fixed'), ('image', 'dilated'),
         ('pathfinder', 'local'), ('pathfinder', 'lsh'), ('lm', 'local'), ('lm', 'bigbird')]


# The variants outside the block-sparse family (kernel, low-rank, learned, block-local): one model per
# task holds them all, one per layer.
MIXED = tuple(n for n in ea.ATTENTION_NAMES
              if n in ('block_local', 'linear', 'performer', 'nystrom', 'linformer', 'sinkhorn',
                       'synthesizer'))
TASKS = ('listops', 'text', 'retrieval', 'image', 'pathfinder', 'lm')


def spec(name: str) -> str:
  """'performer(num_features=16, ...)': the variant with its small options, as a layer override."""
  options = api.variant_class(name).small_options(heads=2)
  return f'{name}({", ".join(f"{k}={v!r}" for k, v in options.items())})'


def task_config(task, variant, tmp_path, fixture_path):
  config = importlib.import_module(f'configs.{task}').get_config(f'attention={variant},tiny')
  config.attention.options.update(api.variant_class(variant).small_options(heads=2))
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


def task_fixture(task, request):
  fixture = {'text': 'imdb_saved', 'retrieval': 'aan_dir', 'image': 'cifar_saved',
             'lm': 'corpus_dir'}.get(task)
  return request.getfixturevalue(fixture) if fixture else None


def assert_finite_results(results, task):
  metric = 'bits_per_byte' if task == 'lm' else 'accuracy'
  for split in ('validation', 'test'):
    assert math.isfinite(results[f'{split}/loss'])
    assert math.isfinite(results[f'{split}/{metric}'])


@pytest.mark.parametrize('task, variant', CASES)
def test_task_trains_and_evaluates(task, variant, tmp_path, request):
  config = task_config(task, variant, tmp_path, task_fixture(task, request))
  results = train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['steps'] == STEPS and results['variant'] == variant
  assert_finite_results(results, task)
  if task == 'lm':  # an untrained byte model is near uniform: about 8 bits per byte, never 0
    assert 4.0 < results['test/bits_per_byte'] < 12.0


@pytest.mark.parametrize('task', TASKS)
def test_every_linear_time_and_learned_variant_trains_on_every_task(task, tmp_path, request):
  causal = task == 'lm'
  names = [n for n in MIXED if api.variant_class(n).supports_causal or not causal]
  assert len(names) >= (5 if causal else 7)
  config = task_config(task, names[0], tmp_path, task_fixture(task, request))
  config.model.num_layers = len(names)
  config.attention.layer_overrides = ','.join(f'{i}:{spec(n)}' for i, n in enumerate(names) if i)
  results = train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['steps'] == STEPS
  assert results['variant'].startswith(names[0] + '+1:' + names[1])
  assert_finite_results(results, task)
