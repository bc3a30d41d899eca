"""Failure handling of training runs: damaged checkpoints, reruns, config changes, signals, bad input.

In-process where possible (tiny ListOps through `train_and_evaluate`); the command-line behaviours
(exit codes, one line on stderr, the workdir lock, Ctrl-C) run `train.py` as processes, several at a
time where they are independent.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest
import tqdm

from configs import listops
from efficient_attn import checkpointing
from efficient_attn import data
from efficient_attn import metrics as metrics_lib
from efficient_attn import train_lib
from test_train import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ('steps_per_sec', 'tokens_per_sec', 'peak_memory_bytes', 'host_memory_bytes')


def _without_timing(record: dict) -> dict:
  return {k: v for k, v in record.items() if not any(t in k for t in TIMING_KEYS)}


def _warnings(caplog) -> list[str]:
  """The warnings this package logged (libraries log theirs through the 'absl' logger)."""
  return [r.getMessage() for r in caplog.records
          if r.levelno >= logging.WARNING and r.name == 'root']


# -- damaged checkpoints ---------------------------------------------------------------------------


def _damage(kind: str, step_dir: str) -> None:
  """The damage a full disk, a cut-short copy or a stray `rm` leaves in one checkpoint."""
  state = os.path.join(step_dir, 'state')
  if kind == 'truncated_metadata':
    path = os.path.join(state, '_METADATA')
    with open(path, 'r+') as f:
      f.truncate(os.path.getsize(path) // 2)
  elif kind == 'deleted_metadata':
    os.remove(os.path.join(state, '_METADATA'))
  elif kind == 'empty_step_dir':
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)
  elif kind == 'zeroed_data':
    for name in os.listdir(os.path.join(state, 'd')):
      path = os.path.join(state, 'd', name)
      size = os.path.getsize(path)
      with open(path, 'wb') as f:
        f.write(b'\0' * size)
  else:
    raise ValueError(kind)


def _toy_state(value: float) -> dict:
  # Nested like a train state (a tuple inside, as optax's), so a lost _METADATA matters.
  return {'step': jnp.int32(value), 'opt_state': (jnp.full((3,), value), {'mu': jnp.full((2, 2),
                                                                                         value)})}


@pytest.mark.parametrize('kind', ['truncated_metadata', 'deleted_metadata', 'empty_step_dir',
                                  'zeroed_data'])
def test_restore_falls_back_past_a_damaged_newest_checkpoint(kind, tmp_path, caplog):
  workdir = str(tmp_path)
  ckpt = checkpointing.Checkpointer(workdir, keep=3, async_save=False)
  for step in (1, 2):
    ckpt.save_latest(step, _toy_state(float(step)))
  ckpt.close()
  latest = tmp_path / 'checkpoints' / 'latest'
  _damage(kind, str(latest / '2'))

  ckpt = checkpointing.Checkpointer(workdir, keep=3, async_save=False)
  with caplog.at_level(logging.WARNING):
    restored = ckpt.restore_latest(jax.eval_shape(lambda: _toy_state(0.0)))
  assert int(restored['step']) == 1 and float(restored['opt_state'][0][0]) == 1.0
  [line] = _warnings(caplog)  # one line: which step, why, where it went
  assert '\n' not in line and 'Checkpoint(s) 2 in' in line and 'resumed from step 1' in line, line
  assert sorted(os.listdir(latest)) == ['1']
  assert os.listdir(tmp_path / 'checkpoints' / 'corrupt') == ['latest-2']
  # The step number is free again: the resumed run saves it anew.
  ckpt.save_latest(2, _toy_state(2.0))
  assert ckpt.latest_step() == 2
  ckpt.close()


def test_when_no_checkpoint_restores_nothing_is_moved(tmp_path):
  workdir = str(tmp_path)
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  for step in (1, 2):
    ckpt.save_latest(step, _toy_state(float(step)))
  ckpt.close()
  latest = tmp_path / 'checkpoints' / 'latest'
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  # A different structure (what a changed model looks like) restores from no step.
  other = jax.eval_shape(lambda: {'step': jnp.int32(0), 'w': jnp.zeros((5,))})
  with pytest.raises(checkpointing.NoRestorableCheckpointError) as error:
    ckpt.restore_latest(other)
  ckpt.close()
  message = str(error.value)
  assert '\n' not in message and str(latest) in message and 'step 2:' in message
  assert sorted(os.listdir(latest)) == ['1', '2']
  assert not (tmp_path / 'checkpoints' / 'corrupt').exists()


# -- runs: resume, rerun, extend -------------------------------------------------------------------


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data_cache'))


def _config(cache_dir: str, **train):
  settings = dict(steps=6, eval_every=3, checkpoint_every=3, log_every=3)
  settings.update(train)
  return tiny_config(cache_dir, **settings)


@pytest.fixture(scope='module')
def finished_run(cache_dir, tmp_path_factory):
  """A finished 6-step run: latest checkpoints 3 and 6, validations at 3 and 6."""
  workdir = str(tmp_path_factory.mktemp('finished') / 'run')
  results = train_lib.train_and_evaluate(_config(cache_dir), workdir)
  return workdir, results


def _copy(workdir: str, tmp_path) -> str:
  target = str(tmp_path / 'copy')
  shutil.copytree(workdir, target)
  return target


def test_resume_past_a_damaged_checkpoint_and_a_deleted_best(finished_run, cache_dir, tmp_path,
                                                             caplog):
  """The run died after its last checkpoint; then that checkpoint and the best one were damaged.
  It resumes from step 3, reports both in one line each, and (training being exact) ends with the
  same results: the resumed step's state is re-validated in place of the lost best checkpoint."""
  source, results = finished_run
  workdir = _copy(source, tmp_path)
  os.remove(os.path.join(workdir, train_lib.RESULTS_FILE))
  _damage('truncated_metadata', os.path.join(workdir, 'checkpoints', 'latest', '6'))
  shutil.rmtree(os.path.join(workdir, 'checkpoints', 'best'))
  with caplog.at_level(logging.WARNING):
    resumed = train_lib.train_and_evaluate(_config(cache_dir), workdir)
  warnings = _warnings(caplog)
  assert len(warnings) == 2 and all('\n' not in w for w in warnings), warnings
  assert 'Checkpoint(s) 6 in' in warnings[0] and 'resumed from step 3' in warnings[0]
  assert 'best checkpoint' in warnings[1] and 'is missing' in warnings[1]
  assert 'validated the resumed step 3' in warnings[1]
  assert _without_timing(resumed) == _without_timing(results)
  records = metrics_lib.read_metrics(workdir)
  assert [r['step'] for r in records if 'test/accuracy' in r] == [6]
  assert metrics_lib.series(records, 'validation/accuracy')[0] == [3, 6]
  assert os.listdir(os.path.join(workdir, 'checkpoints', 'corrupt')) == ['latest-6']

  # Nothing restores any more: one line naming the directory, and nothing is touched.
  for step in ('3', '6'):
    _damage('empty_step_dir', os.path.join(workdir, 'checkpoints', 'latest', step))
  os.remove(os.path.join(workdir, train_lib.RESULTS_FILE))
  with pytest.raises(train_lib.WorkdirError, match='No checkpoint in .*checkpoints/latest restores'):
    train_lib.train_and_evaluate(_config(cache_dir), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', 'latest'))) == ['3', '6']


def test_a_finished_run_reports_its_results_without_evaluating_again(finished_run, cache_dir,
                                                                     tmp_path, caplog):
  source, results = finished_run
  workdir = _copy(source, tmp_path)
  before = metrics_lib.read_metrics(workdir)
  config = _config(cache_dir)
  config.train.eval_batch_size = 8  # a change that does not extend the run: named, not applied
  with caplog.at_level(logging.WARNING):
    again = train_lib.train_and_evaluate(config, workdir)
  assert again == results
  assert metrics_lib.read_metrics(workdir) == before  # no second test record
  [line] = _warnings(caplog)
  assert 'has already finished its 6 steps' in line and 'train.eval_batch_size: 16 -> 8' in line


def test_extending_a_run_names_the_changed_fields_and_sigterm_keeps_the_interval(
    finished_run, cache_dir, tmp_path, caplog):
  """Resumed with more steps (and another warmup): the warning names every changed field with
  old -> new; the finished run's test record goes (it is tested again at its new end). A SIGTERM at
  step 8, between the logging steps 6 and 9, writes the train metrics of steps 7-8 before saving."""
  source, _ = finished_run
  workdir = _copy(source, tmp_path)
  base = train_lib.default_components()

  def train_batches(split, batch_size, *, seed, start_step=0, **kw):
    for step, batch in enumerate(base.train_batches(split, batch_size, seed=seed,
                                                    start_step=start_step, **kw), start_step):
      if step == 7:  # the batch of update 8: the signal arrives while it runs
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  components = train_lib.Components(base.load_task, train_batches, base.eval_batches,
                                    base.create_model, base.count_params)
  config = _config(cache_dir, steps=12)
  config.optimizer.warmup_steps = 3
  with caplog.at_level(logging.WARNING), pytest.raises(train_lib.TrainingInterrupted) as stop:
    train_lib.train_and_evaluate(config, workdir, components=components)
  assert stop.value.step == 8 and stop.value.signum == signal.SIGTERM
  changed = [w for w in _warnings(caplog) if 'differs from its config.json' in w]
  assert len(changed) == 1 and 'in 2 field(s)' in changed[0], changed
  assert 'optimizer.warmup_steps: 2 -> 3' in changed[0] and 'train.steps: 6 -> 12' in changed[0]
  assert 'learning-rate schedule follows the new values' in changed[0]
  records = metrics_lib.read_metrics(workdir)
  assert not any('test/accuracy' in r for r in records)
  assert metrics_lib.series(records, 'train/loss')[0] == [3, 6, 8]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', 'latest'))) == ['6', '8']
  assert not os.path.exists(os.path.join(workdir, train_lib.RESULTS_FILE))  # no longer finished


def test_sigterm_at_a_checkpoint_step_stops_cleanly(cache_dir, tmp_path):
  """A SIGTERM during update 6, a checkpoint step: the periodic save has written step 6, and the stop
  does not save it again (formerly Orbax's StepAlreadyExistsError: exit 1 with a traceback)."""
  base = train_lib.default_components()

  def train_batches(split, batch_size, *, seed, start_step=0, **kw):
    for step, batch in enumerate(base.train_batches(split, batch_size, seed=seed,
                                                    start_step=start_step, **kw), start_step):
      if step == 5:  # the batch of update 6
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  components = train_lib.Components(base.load_task, train_batches, base.eval_batches,
                                    base.create_model, base.count_params)
  workdir = str(tmp_path / 'run')
  with pytest.raises(train_lib.TrainingInterrupted) as stop:
    train_lib.train_and_evaluate(_config(cache_dir, steps=9), workdir, components=components)
  assert stop.value.step == 6 and stop.value.signum == signal.SIGTERM
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', 'latest'))) == ['3', '6']


def _events(directory: str) -> list:
  """Every Event of the TensorBoard files in `directory` (TFRecord framing: length, crc, data,
  crc)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  events = []
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), 'rb') as f:
      raw = f.read()
    at = 0
    while at < len(raw):
      (length,) = struct.unpack('<Q', raw[at:at + 8])
      events.append(event_pb2.Event.FromString(raw[at + 12:at + 12 + length]))
      at += 12 + length + 4
  return events


def test_tensorboard_holds_the_config_as_hyperparameters(finished_run):
  workdir, _ = finished_run
  values = [v for e in _events(os.path.join(workdir, 'tensorboard')) for v in e.summary.value]
  tags = {v.tag for v in values}
  assert {'_hparams_/experiment', '_hparams_/session_start_info', 'config/text_summary'} <= tags
  [start] = [v for v in values if v.tag == '_hparams_/session_start_info']
  from tensorboardX.proto import plugin_hparams_pb2  # pylint: disable=import-outside-toplevel
  info = plugin_hparams_pb2.HParamsPluginData.FromString(start.metadata.plugin_data.content)
  hparams = info.session_start_info.hparams
  assert hparams['train.steps'].number_value == 6
  assert hparams['attention.name'].string_value == 'full'
  [text] = [v for v in values if v.tag == 'config/text_summary']
  assert '| optimizer.learning_rate | 0.003 |' in text.tensor.string_val[0].decode()


# -- logging above the progress bar ----------------------------------------------------------------


def test_log_lines_go_above_the_progress_bar(monkeypatch):
  stream = io.StringIO()
  monkeypatch.setattr(sys, 'stderr', stream)
  handler = logging.StreamHandler(sys.stderr)
  logging.getLogger().addHandler(handler)
  try:
    bar = tqdm.tqdm(total=10, file=sys.stderr, desc='run', ncols=60, mininterval=0)
    bar.update(3)
    with train_lib._logs_above_bar(bar):  # pylint: disable=protected-access
      logging.getLogger().warning('inside the bar')
    logging.getLogger().warning('after the bar')
    bar.close()
  finally:
    logging.getLogger().removeHandler(handler)
  out = stream.getvalue()
  assert sys.stderr is stream and handler.stream is stream  # both restored
  # Inside: the bar's line is cleared first, the message gets a line of its own, the bar is redrawn.
  at = out.index('inside the bar\n')
  assert out[:at].endswith(' ' * 59 + '\r') and out[at:].split('\n', 1)[1].startswith('\rrun:')
  # Without it a log line lands on the bar's line (what the context manager is for).
  assert 'it/s]after the bar' in out


# -- config validation before any work -------------------------------------------------------------


@pytest.mark.parametrize('task, field, value, message', [
    ('listops', 'data.max_length', 0, 'listops: config.data.max_length must be an integer >= 1'),
    ('listops', 'data.num_train', 0, 'listops: config.data.num_train must be an integer >= 1'),
    ('listops', 'data.max_depth', 0, 'listops: config.data.max_depth must be an integer >= 1'),
    ('listops', 'data.min_length', 40, 'need min_length \\+ 1 < max_length'),
    ('listops', 'data.max_depth', 10**9, None),  # valid, and must not take for ever to check
    ('listops', 'optimizer.learning_rate', math.inf, 'learning_rate must be a finite number > 0'),
    ('listops', 'optimizer.eps', math.nan, 'eps must be a finite number >= 0, got nan'),
    ('listops', 'optimizer.weight_decay', math.inf, 'weight_decay must be a finite number >= 0'),
    ('listops', 'train.steps', 10**12, 'train.steps must be at most 2147483647'),
    ('text', 'data.max_length', 1, 'text: config.data.max_length must be an integer >= 2'),
    ('text', 'data.num_validation', 0, 'text: config.data.num_validation must be'),
    ('retrieval', 'data.max_examples', 0, 'retrieval: config.data.max_examples must be'),
    ('image', 'data.num_validation', -1, 'image: config.data.num_validation must be'),
    ('lm', 'data.corpus', 'wiki', "lm: unknown corpus 'wiki'"),
    ('lm', 'data.max_length', 0, 'lm: config.data.max_length must be an integer >= 1'),
])
def test_bad_values_are_config_errors_before_any_work(task, field, value, message):
  """check_config (which train_and_evaluate runs first) rejects each; no data is read."""
  module = __import__(f'configs.{task}', fromlist=['get_config'])
  config = module.get_config('tiny')
  section, name = field.split('.')
  config[section][name] = value
  if message is None:
    train_lib.check_config(config)
  else:
    with pytest.raises(train_lib.ConfigError, match=message):
      train_lib.check_config(config)


# -- the command line ------------------------------------------------------------------------------


def _train_cli(*args: str, **env: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py'), *args], cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS='cpu', **env), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.strip()]


def _tiny_args(cache: str, *more: str, config: str = 'tiny') -> list[str]:
  return [f'--config={REPO}/configs/listops.py:{config}', f'--config.data.cache_dir={cache}',
          '--config.train.progress_bar=False', *more]


def test_cli_bad_input_is_one_line_and_status_2(tmp_path):
  """Bad values and a bad --workdir fail before the data is touched (its cache stays absent), with
  one line and status 2; --print_config prints the resolved config, a tuple option included."""
  cache = str(tmp_path / 'cache')
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  cases = {
      'data': (['--config.data.max_length=0', f'--workdir={tmp_path / "w1"}'],
               'Config error: listops: config.data.max_length must be an integer >= 1'),
      'optimizer': (['--config.optimizer.eps=nan', f'--workdir={tmp_path / "w2"}'],
                    'Config error: optimizer.eps must be a finite number >= 0, got nan'),
      'workdir': (['--workdir=/dev/null/run'], 'Workdir error: cannot use --workdir=/dev/null/run'),
      'file_workdir': ([f'--workdir={a_file}'], f'Workdir error: cannot use --workdir={a_file}'),
  }
  procs = {name: _train_cli(*_tiny_args(cache, *argv)) for name, (argv, _) in cases.items()}
  printer = _train_cli(*_tiny_args(cache, '--config.attention.options.dilation=(1,2)',
                                   '--print_config', config='attention=dilated,tiny'))
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (name, err[-3000:])
    assert len(_lines(err)) == 1 and _lines(err)[0].startswith(cases[name][1]), (name, err[-3000:])
  out, err = printer.communicate(timeout=300)
  assert printer.returncode == 0, err[-3000:]
  printed = json.loads(out)
  assert printed['attention']['options']['dilation'] == [1, 2]
  assert printed['attention']['name'] == 'dilated' and printed['train']['steps'] == 10
  assert not os.path.exists(cache) and not any(tmp_path.glob('w*'))


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300.0) -> None:
  start = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f'process ended ({proc.returncode}) early:\n{proc.stderr.read()[-3000:]}')
    assert time.time() - start < timeout, 'timed out'
    time.sleep(0.05)


_HOLD_LOCK = '''
import fcntl, sys, time
f = open(sys.argv[1], 'a+')
fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
print('locked', flush=True)
time.sleep(600)
'''


def test_cli_lock_then_ctrl_c_then_resume(tmp_path):
  """One run per workdir: a run held elsewhere refuses it (status 2, one line); SIGKILL of the
  holder frees it. Ctrl-C (SIGINT) then saves a checkpoint and exits 130 with one line, and a resume
  with fewer steps continues from it, naming the changed field. Per-head dilations come from the
  command line throughout."""
  cache = str(tmp_path / 'cache')
  config = listops.get_config('attention=dilated,tiny')
  config.data.cache_dir = cache
  data.load_task(config.data)  # generated once, here: concurrent generation would race
  workdir = tmp_path / 'run'
  workdir.mkdir()
  args = _tiny_args(cache, '--config.attention.options.dilation=(1,2)',
                    '--config.attention.options.window=2', f'--workdir={workdir}',
                    config='attention=dilated,tiny')
  holder = subprocess.Popen([sys.executable, '-c', _HOLD_LOCK, str(workdir / train_lib.LOCK_FILE)],
                            stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == 'locked'
  refused = _train_cli(*args)
  _, err = refused.communicate(timeout=300)
  assert refused.returncode == 2, err[-3000:]
  assert len(_lines(err)) == 1, err
  assert _lines(err)[0].startswith(f'Workdir error: workdir {workdir} is in use by another run')
  holder.kill()  # SIGKILL: the OS drops its lock
  holder.wait(timeout=60)

  long_run = ['--config.train.steps=100000', '--config.train.eval_every=100000',
              '--config.train.checkpoint_every=100000', '--config.train.log_every=2']
  proc = _train_cli(*args, *long_run)

  def trained_a_few_steps():
    return any(r['step'] >= 4 for r in metrics_lib.read_metrics(str(workdir)))

  _wait_for(trained_a_few_steps, proc)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  assert 'Traceback' not in err
  last = _lines(err)[-1]
  assert last.startswith('Interrupted by SIGINT; saved a checkpoint at step '), err[-3000:]
  assert f'Resume with the same command (--workdir={workdir})' in last
  step = int(last.split('checkpoint at step ')[1].split('.')[0])
  assert os.listdir(workdir / 'checkpoints' / 'latest') == [str(step)]
  assert max(r['step'] for r in metrics_lib.read_metrics(str(workdir))) == step

  resumed = _train_cli(*args, *long_run[1:], f'--config.train.steps={step + 2}')
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err[-3000:]
  assert f'Resumed from step {step} in' in err
  assert f'train.steps: 100000 -> {step + 2}' in err
  assert out.strip().splitlines()[-1].startswith('listops/dilated: test accuracy')
  records = metrics_lib.read_metrics(str(workdir))
  assert [r['step'] for r in records if 'test/accuracy' in r] == [step + 2]


def test_cli_divergence_and_a_full_disk_are_one_line(tmp_path):
  """A NaN/inf loss exits 3, a full disk (writes to /dev/full fail with ENOSPC) exits 4, each with
  one line and no traceback. The diverged run has no --workdir: it goes under $EFFICIENT_ATTN_RUNS,
  whose absolute path the log names."""
  cache = str(tmp_path / 'cache')
  config = listops.get_config('tiny')
  config.data.cache_dir = cache
  data.load_task(config.data)
  runs = tmp_path / 'runs'
  full = tmp_path / 'full'
  full.mkdir()
  os.symlink('/dev/full', full / 'config.json.tmp')  # config.json is written through it
  diverging = _train_cli(*_tiny_args(cache, '--config.optimizer.learning_rate=1e30'),
                         EFFICIENT_ATTN_RUNS=str(runs))
  disk_full = _train_cli(*_tiny_args(cache, f'--workdir={full}'))

  _, err = diverging.communicate(timeout=300)
  assert diverging.returncode == 3, err[-3000:]
  assert 'Traceback' not in err
  assert _lines(err)[-1].startswith('Training diverged: Training loss is nan at step '), err[-3000:]
  [run] = runs.iterdir()
  assert run.name.startswith('listops-full-')
  assert f'Run directory: {run}' in err
  assert not os.listdir(run / 'checkpoints' / 'latest')  # nothing saved after the divergence

  _, err = disk_full.communicate(timeout=300)
  assert disk_full.returncode == 4, err[-3000:]
  assert 'Traceback' not in err
  assert _lines(err)[-1].startswith('No space left on device'), err[-3000:]
