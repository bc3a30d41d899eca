"""Self-pretraining then fine-tuning (efficient_attn/pretraining.py) on tiny ListOps.

One uninterrupted two-stage run (`full`, 6 + 6 steps) is the reference: an interrupted one resumed
in each stage ends bit-identical to it; one whose labels are shuffled pretrains bit-identical
weights; fine-tuning from it with `local` works, with other sizes or learned weights it fails in one
line. A run on a 4-device mesh (data=2, tensor=2) runs in a subprocess alongside. Runs are
in-process; an "interruption" is an exception raised by the data stream after k batches, so
nothing is saved at that point (as after SIGKILL) and the relaunch restarts from the last periodic
checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import listops
from efficient_attn import cli
from efficient_attn import data
from efficient_attn import metrics as metrics_lib
from efficient_attn import models
from efficient_attn import pretraining
from efficient_attn import train_lib
# The tiny datasets and configs of the end-to-end task tests (pytest puts tests/ on sys.path).
import test_tasks_end_to_end as e2e
from test_train_resume import restore_state_arrays
from test_data_tasks import aan_dir, corpus_dir  # noqa: F401  (fixtures)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ('steps_per_sec', 'tokens_per_sec', 'peak_memory_bytes', 'host_memory_bytes')
OVERRIDES = {'steps': 6, 'eval_every': 2, 'checkpoint_every': 2, 'log_every': 1,
             'keep_checkpoints': 10, 'async_checkpointing': False, 'progress_bar': False}


def tiny_config(cache_dir: str, attention: str = 'full', **fields):
  config = listops.get_config(f'attention={attention},tiny,pretrain')
  config.data.cache_dir = cache_dir
  config.pretrain.steps = 6
  for key, value in {**OVERRIDES, **fields}.items():
    config.train[key] = value
  return config


class _Crash(Exception):
  """Stands for a killed process."""


def _components(crash_at: tuple[int, int] | None = None, labels=None):
  """The project's components; `crash_at=(call, k)`: the `call`-th training stream of the run
  raises after k batches; `labels(split)`: replaces the labels of every split."""
  base = train_lib.default_components()
  calls = []

  def train_batches(split, *args, **kwargs):
    stream = base.train_batches(split, *args, **kwargs)
    index = len(calls)
    calls.append(index)

    def generate():
      for k, batch in enumerate(stream):
        if crash_at is not None and crash_at[0] == index and k == crash_at[1]:
          raise _Crash()
        yield batch

    return generate()

  def load_task(data_config):
    task = base.load_task(data_config)
    if labels is None:
      return task
    return dataclasses.replace(task, train=labels(task.train), validation=labels(task.validation),
                               test=labels(task.test))

  return dataclasses.replace(base, train_batches=train_batches, load_task=load_task)


class _ShuffledLabels:
  """A split whose labels are shifted by 1-3 classes (so training on them would differ)."""

  def __init__(self, split):
    self.split = split
    self.num_examples = split.num_examples

  def get(self, indices):
    batch = self.split.get(indices)
    batch['labels'] = (batch['labels'] + 1 + np.asarray(indices) % 3) % 10
    return batch


def _arrays(directory: str) -> dict[str, np.ndarray]:
  """{path: array} of the newest checkpoint in `directory` (checkpoints/latest or best)."""
  step = max(int(n) for n in os.listdir(directory) if n.isdigit())
  return _arrays_at(os.path.join(directory, str(step)))


def _arrays_at(step_dir: str) -> dict[str, np.ndarray]:
  return restore_state_arrays(step_dir)[0]


def _encoder(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: v for k, v in arrays.items() if k.startswith("['params']['encoder']")}


def _records(workdir: str) -> list[dict]:
  return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)}
          for r in metrics_lib.read_metrics(workdir)]


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
  assert a.keys() == b.keys() and a
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp('cache'))
  config = listops.get_config('tiny')
  config.data.cache_dir = cache
  data.load_task(config.data)  # once, before the mesh subprocess reads the same cache
  return cache


@pytest.fixture(scope='module')
def mesh_run(cache_dir, tmp_path_factory):
  """A two-stage run on 4 fake devices (data=2, tensor=2), started at once, awaited when needed."""
  workdir = str(tmp_path_factory.mktemp('mesh') / 'run')
  argv = [sys.executable, os.path.join(REPO, 'train.py'),
          f'--config={REPO}/configs/listops.py:attention=local,tiny,pretrain',
          f'--config.data.cache_dir={cache_dir}', '--config.train.progress_bar=False',
          '--config.mesh.data=2', '--config.mesh.tensor=2', '--config.train.keep_checkpoints=10',
          f'--workdir={workdir}']
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  yield proc, workdir
  if proc.poll() is None:
    proc.kill()
    proc.wait()


@pytest.fixture(scope='module')
def reference(cache_dir, tmp_path_factory, mesh_run):
  """The uninterrupted two-stage run: (workdir, results)."""
  del mesh_run  # started first, so it runs alongside
  workdir = str(tmp_path_factory.mktemp('reference'))
  results = train_lib.train_and_evaluate(tiny_config(cache_dir), workdir,
                                         components=_components())
  return workdir, results


# -- host-side masking (no compilation) ------------------------------------------------------------


def test_span_mask_masks_real_tokens_only_at_the_rate():
  rng = np.random.default_rng(0)
  mask = np.arange(400)[None] < rng.integers(50, 400, size=(64, 1))
  for mean_span in (1.0, 3.0):
    masked = pretraining.span_mask(mask, 0.15, mean_span, rng)
    assert not (masked & ~mask).any()
    rate = masked.sum() / mask.sum()
    assert 0.12 < rate < 0.16, (mean_span, rate)
    runs = np.diff(np.concatenate([np.zeros((64, 1), bool), masked, np.zeros((64, 1), bool)],
                                  axis=1).astype(np.int8), axis=1)
    mean_run = masked.sum() / (runs == 1).sum()
    assert (mean_run < 1.3) if mean_span == 1 else (2.5 < mean_run < 4.5), (mean_span, mean_run)


def test_mask_streams_differ_per_process_and_repeat_per_step():
  spec = pretraining.Spec(steps=1, objective='masked', mask_rate=0.3, mean_span=1.0, init_from='',
                          mask_id=17)
  inputs = np.arange(1, 16 * 64 + 1).reshape(16, 64) % 16 + 1  # no padding: every position counts
  batches = [{'inputs': inputs, 'mask': inputs > 0, 'labels': np.zeros(16)}] * 3

  def masks(stream, process_index, **kw):
    return [b['token_weights'] > 0 for b in stream(iter(batches), spec, prepend_cls=False,
                                                    process_index=process_index, seed=5, **kw)]

  for stream, kw in ((pretraining.train_stream, {'start_step': 7}), (pretraining.eval_stream, {})):
    first, again, other = masks(stream, 0, **kw), masks(stream, 0, **kw), masks(stream, 1, **kw)
    for a, b, c in zip(first, again, other):
      np.testing.assert_array_equal(a, b)  # the same key: the same mask (resume, re-validation)
      # Another process's rows of the same step get another pattern (they used to share one).
      assert (a != c).mean() > 0.2, stream.__name__
  # Process 0 keeps the single-process key [seed, stream, step].
  expected = pretraining.make_batch(batches[0], spec, prepend_cls=False,
                                    rng=np.random.default_rng([5, 1, 7]))['token_weights'] > 0
  np.testing.assert_array_equal(masks(pretraining.train_stream, 0, start_step=7)[0], expected)


def test_batches_carry_no_labels_and_line_up_targets():
  spec = pretraining.Spec(steps=1, objective='masked', mask_rate=0.5, mean_span=1.0, init_from='',
                          mask_id=17)
  inputs = np.array([[[3, 4, 5, 0], [6, 7, 0, 0]]], np.int32)  # one pair: [1, 2, 4]
  batch = {'inputs': inputs, 'mask': inputs > 0, 'labels': np.array([1]),
           'weights': np.array([1.0], np.float32)}
  out = pretraining.make_batch(batch, spec, prepend_cls=True, rng=np.random.default_rng(1))
  assert sorted(out) == ['inputs', 'mask', 'targets', 'token_weights']
  assert out['inputs'].shape == (2, 4)  # both documents of the pair
  masked = out['token_weights'] > 0
  assert masked.any() and not (masked & (inputs.reshape(2, 4) == 0)).any()
  assert (out['inputs'][masked] == 17).all()
  np.testing.assert_array_equal(out['inputs'][~masked], inputs.reshape(2, 4)[~masked])
  np.testing.assert_array_equal(out['targets'], inputs.reshape(2, 4))
  causal = dataclasses.replace(spec, objective='causal', mask_id=None)
  shifted = pretraining.make_batch({'inputs': inputs[0], 'mask': inputs[0] > 0}, causal,
                                   prepend_cls=False, rng=np.random.default_rng(1))
  np.testing.assert_array_equal(shifted['targets'], [[4, 5, 0, 0], [7, 0, 0, 0]])
  np.testing.assert_array_equal(shifted['token_weights'], [[1, 1, 0, 0], [1, 0, 0, 0]])


def test_pretraining_encoder_has_the_task_encoders_parameters():
  model_config = {'num_layers': 1, 'num_heads': 2, 'emb_dim': 8, 'mlp_dim': 8, 'classifier_dim': 8}
  for kind, attention in (('pair', 'synthesizer'), ('lm', 'local')):
    shape = lambda m: jax.tree.map(lambda x: x.shape, nnx.state(m, nnx.Param))
    task_model = nnx.eval_shape(lambda: models.create_model(
        model_config, {'name': attention}, kind=kind, vocab_size=18, num_classes=18,
        max_length=12, rngs=nnx.Rngs(0)))
    pre = nnx.eval_shape(lambda: models.create_pretraining_model(
        model_config, {'name': attention}, kind=kind, vocab_size=18, max_length=12,
        causal=kind == 'lm', rngs=nnx.Rngs(0)))
    assert shape(pre)['encoder'] == shape(task_model)['encoder']
    if kind == 'lm':  # the next-token head is the task's own
      assert shape(pre)['head'] == shape(task_model)['head']
  with pytest.raises(ValueError, match='causal'):
    models.create_pretraining_model(model_config, {'name': 'linformer'}, kind='classify',
                                    vocab_size=18, max_length=12, causal=True, rngs=nnx.Rngs(0))


def test_config_section_and_errors(cache_dir, tmp_path):
  scratch = listops.get_config('quick')
  config = listops.get_config('quick,pretrain')
  assert scratch.pretrain.steps == 0 and not pretraining.configured(scratch)
  assert config.pretrain.steps + config.train.steps == scratch.train.steps == 800
  bad = tiny_config(cache_dir)
  bad.pretrain.mask_rate = 1.5
  with pytest.raises(train_lib.ConfigError, match='pretrain.mask_rate'):
    train_lib.check_config(bad)
  bad = tiny_config(cache_dir, 'linformer')
  bad.pretrain.objective = 'causal'
  with pytest.raises(train_lib.ConfigError, match="causal pretraining.*'linformer'"):
    train_lib.check_config(bad)
  missing = tiny_config(cache_dir)
  missing.pretrain.init_from = str(tmp_path)
  with pytest.raises(train_lib.ConfigError, match='holds no pretraining checkpoint') as e:
    train_lib.train_and_evaluate(missing, str(tmp_path / 'run'))
  assert cli.exit_status(e.value)[0] == cli.EXIT_USAGE


# -- runs ------------------------------------------------------------------------------------------


def test_fine_tuning_starts_from_the_best_pretrained_encoder(reference):
  workdir, results = reference
  pre = os.path.join(workdir, 'pretrain')
  best = _arrays(os.path.join(pre, 'checkpoints', 'best'))
  start = _arrays_at(os.path.join(workdir, 'checkpoints', 'latest', '0'))
  _assert_same(_encoder(best), _encoder(start))
  assert not any(k.startswith("['params']['head']['hidden']") for k in best)  # a new head
  with open(os.path.join(pre, 'results.json')) as f:
    pre_results = json.load(f)
  assert results['pretrain_best_step'] == pre_results['best_step'] == int(
      sorted(os.listdir(os.path.join(pre, 'checkpoints', 'best')))[0])
  assert results['steps'] == 6 and pre_results['steps'] == 6
  assert pre_results['objective'] == 'masked'
  pre_records = metrics_lib.read_metrics(pre)
  assert [r['step'] for r in pre_records if 'validation/loss' in r] == [2, 4, 6]
  assert any('test/accuracy' in r for r in metrics_lib.read_metrics(workdir))
  assert not any('test/accuracy' in r for r in pre_records)


def test_pretraining_never_reads_labels(reference, cache_dir, tmp_path):
  workdir, _ = reference
  other = str(tmp_path / 'shuffled')
  # Stops at the first fine-tuning batch: only the pretraining stage is compared.
  with pytest.raises(_Crash):
    train_lib.train_and_evaluate(tiny_config(cache_dir), other,
                                 components=_components((1, 0), labels=_ShuffledLabels))
  for kind in ('best', 'latest'):
    _assert_same(_arrays(os.path.join(workdir, 'pretrain', 'checkpoints', kind)),
                 _arrays(os.path.join(other, 'pretrain', 'checkpoints', kind)))
  assert _records(os.path.join(workdir, 'pretrain')) == _records(os.path.join(other, 'pretrain'))


def test_resume_in_either_stage_is_exact(reference, cache_dir, tmp_path):
  workdir, results = reference
  run = str(tmp_path / 'interrupted')
  config = tiny_config(cache_dir)
  # Pretraining dies in step 6 (its checkpoint of step 4 is the latest), fine-tuning in step 4.
  with pytest.raises(_Crash):
    train_lib.train_and_evaluate(config, run, components=_components((0, 5)))
  assert not os.path.exists(os.path.join(run, 'pretrain', 'results.json'))
  with pytest.raises(_Crash):
    train_lib.train_and_evaluate(config, run, components=_components((1, 3)))
  assert os.path.exists(os.path.join(run, 'pretrain', 'results.json'))
  resumed = train_lib.train_and_evaluate(config, run, components=_components())
  strip = lambda r: {k: v for k, v in r.items() if k not in TIMING and k != 'pretrained_from'}
  assert strip(resumed) == strip(results)
  for stage in ('', 'pretrain'):
    _assert_same(_arrays(os.path.join(workdir, stage, 'checkpoints', 'latest')),
                 _arrays(os.path.join(run, stage, 'checkpoints', 'latest')))
    assert _records(os.path.join(workdir, stage)) == _records(os.path.join(run, stage))
  # A finished run reports its results without training again.
  assert strip(train_lib.train_and_evaluate(config, run)) == strip(results)


def test_init_from_other_variant_and_mismatches(reference, cache_dir, tmp_path, caplog):
  workdir, _ = reference
  best = _encoder(_arrays(os.path.join(workdir, 'pretrain', 'checkpoints', 'best')))
  # full -> local: the same weights; the run directory (holding pretrain/) is accepted.
  config = tiny_config(cache_dir, 'local', steps=2)
  config.pretrain.init_from = workdir
  with caplog.at_level(logging.WARNING), pytest.raises(_Crash):  # stops at the first batch: the
    # initial state is saved by then
    train_lib.train_and_evaluate(config, str(tmp_path / 'local'), components=_components((0, 0)))
  assert not os.path.exists(tmp_path / 'local' / 'pretrain')
  # Its own pretrain.steps (6, from the `pretrain` argument) are skipped, and the log says so.
  assert any('pretrain.steps=6 are skipped' in r.getMessage() for r in caplog.records)
  _assert_same(best, _encoder(_arrays_at(str(tmp_path / 'local' / 'checkpoints' / 'latest' / '0'))))

  def error(config, name):
    with pytest.raises(train_lib.ConfigError) as e:
      train_lib.train_and_evaluate(config, str(tmp_path / name))
    line = cli.exit_status(e.value)[1]
    assert '\n' not in line and cli.exit_status(e.value)[0] == cli.EXIT_USAGE
    return line

  wider = tiny_config(cache_dir, 'local', steps=2)
  wider.pretrain.init_from = os.path.join(workdir, 'pretrain')
  wider.model.emb_dim = 32
  line = error(wider, 'wider')
  assert 'has shape' in line and 'encoder/' in line and 'emb_dim=16' in line, line
  assert 'emb_dim=32' in line, line
  learned = tiny_config(cache_dir, 'synthesizer', steps=2)
  learned.pretrain.init_from = os.path.join(workdir, 'pretrain')
  line = error(learned, 'learned')
  assert 'is not in the pretrained weights' in line and 'variant full' in line, line
  assert 'variant synthesizer' in line, line


def test_two_stages_on_a_data_and_tensor_mesh(mesh_run, reference):
  del reference  # awaited after the in-process runs
  proc, workdir = mesh_run
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  assert results['pretrain_steps'] == 5 and results['steps'] == 5
  best = _arrays(os.path.join(workdir, 'pretrain', 'checkpoints', 'best'))
  start = _arrays_at(os.path.join(workdir, 'checkpoints', 'latest', '0'))
  _assert_same(_encoder(best), _encoder(start))


@pytest.mark.parametrize('task', ['retrieval', 'lm'])
def test_pair_and_lm_tasks_pretrain_then_fine_tune(task, tmp_path, request):
  """Retrieval pretrains its shared encoder on both documents (masked); lm pretrains causally and
  fine-tunes the whole model, its next-token head included."""
  config = e2e.task_config(task, 'local', tmp_path, e2e.task_fixture(task, request))
  config.pretrain.steps = 2
  config.train.keep_checkpoints = 5
  workdir = str(tmp_path / 'run')
  results = train_lib.train_and_evaluate(config, workdir)
  e2e.assert_finite_results(results, task)
  assert results['pretrain_objective'] == ('causal' if task == 'lm' else 'masked')
  best = _arrays(os.path.join(workdir, 'pretrain', 'checkpoints', 'best'))
  start = _arrays_at(os.path.join(workdir, 'checkpoints', 'latest', '0'))
  groups = ("['params']['encoder']", "['params']['head']") if task == 'lm' else (
      "['params']['encoder']",)
  moved = lambda arrays: {k: v for k, v in arrays.items() if k.startswith(groups)}
  _assert_same(moved(best), moved(start))
  vocab = 257 if task == 'lm' else 257 + 1 + 1  # bytes (+ [MASK] + CLS for the classifier)
  assert start["['params']['encoder']['token_embedding']['value']"].shape[0] == vocab
