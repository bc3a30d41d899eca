"""train_and_evaluate with every registered attention variant on tiny ListOps (two steps each).

Compilation dominates these runs, so they run in one child process with XLA's CPU backend at
optimisation level 0 (same programs, compiled about twice as fast; the flag stays out of this
process); each variant is then checked by its own test.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import traceback

import pytest

import efficient_attn as ea
from efficient_attn import metrics as metrics_lib
from efficient_attn import train_lib
from test_train import tiny_config

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
STEPS = 2


def run_all(root: str) -> None:
  """Child process: trains every variant under root/<name>, writes root/outcomes.json."""
  outcomes = {}
  for name in ea.ATTENTION_NAMES:
    workdir = os.path.join(root, name)
    try:
      config = tiny_config(os.path.join(root, 'cache'), name, steps=STEPS, eval_every=STEPS,
                           checkpoint_every=STEPS, log_every=1)
      config.model.dropout_rate = 0.0  # a smaller program to compile; dropout is tested elsewhere
      outcomes[name] = {'results': train_lib.train_and_evaluate(config, workdir)}
    except Exception:  # pylint: disable=broad-except  (one broken variant must not hide the rest)
      outcomes[name] = {'error': traceback.format_exc()}
  with open(os.path.join(root, 'outcomes.json'), 'w') as f:
    json.dump(outcomes, f)


@pytest.fixture(scope='module')
def outcomes(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('variants'))
  flags = os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=flags.strip())
  script = (f'import sys; sys.path[:0] = [{REPO!r}, {TESTS!r}]; '
            f'import test_train_variants as t; t.run_all({root!r})')
  proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  with open(os.path.join(root, 'outcomes.json')) as f:
    return root, json.load(f)


@pytest.mark.parametrize('name', ea.ATTENTION_NAMES)
def test_every_variant_trains_validates_and_tests(name, outcomes):
  root, by_name = outcomes
  outcome = by_name[name]
  assert 'error' not in outcome, outcome.get('error')
  results = outcome['results']
  workdir = os.path.join(root, name)
  assert results['variant'] == name and results['steps'] == STEPS
  assert results['best_step'] == STEPS  # the only validation
  for key in ('test/loss', 'test/accuracy', 'validation/loss', 'validation/accuracy'):
    assert math.isfinite(results[key]), key
  assert 0.0 <= results['test/accuracy'] <= 1.0
  assert results['num_params'] > 0 and results['steps_per_sec'] > 0
  records = metrics_lib.read_metrics(workdir)
  train_losses = [r['train/loss'] for r in records if 'train/loss' in r]
  assert len(train_losses) == STEPS and all(math.isfinite(x) for x in train_losses)
  assert [r['step'] for r in records if 'test/accuracy' in r] == [STEPS]
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f) == results
  saved = train_lib.load_config(workdir)
  assert saved.attention.name == name and saved.train.steps == STEPS
