"""Training and evaluation of one run: `train_and_evaluate(config, workdir)`.

The loop, step by step (s counts optimizer updates, 1..config.train.steps):
  1. batch s-1 of the deterministic training stream (`train_batches(..., start_step=...)`), placed on
     the mesh over the batch axes; one jitted, state-donating update.
  2. every `log_every` steps: train loss/accuracy (over the steps since the last record), learning
     rate, steps/s, tokens/s, peak device memory and peak host memory; a NaN/inf loss or parameter
     stops the run naming the first bad step, before anything of that step is saved.
  3. every `eval_every` steps and at the end: validation; a better selection score (accuracy, or bits
     per byte for 'lm') saves the model to the 'best' checkpoint.
  4. every `checkpoint_every` steps, at the end and on SIGTERM or SIGINT (Ctrl-C): the whole train
     state to 'latest'.
The work of step s is done before its checkpoint, so a run resumed from step s (same workdir) redoes
nothing and skips nothing: it reads the same batches, draws the same random numbers (the NNX RNG state
is checkpointed) and ends with the same parameters and metrics as an uninterrupted run. Finally the
test split is evaluated with the BEST validation checkpoint (not the last one).

Launching on a workdir:
  - Everything is validated first (config, data options, the workdir: creatable and writable), then
    the workdir is locked (`train.lock`, an flock the OS releases when the process dies, so a killed
    run leaves nothing stuck): a second run on a workdir in use stops with WorkdirError.
  - A finished run (results.json for the same train.steps) is not trained or tested again: its saved
    results are returned. More steps extend it (its old test record is dropped; it is tested again).
  - Resuming from a damaged newest checkpoint falls back to the newest one that restores (one log
    line; see checkpointing.py); a missing or damaged best checkpoint is reported, and the resumed
    state is validated in its place, so the test uses the best of it and every later validation.
  - Resuming with a changed config logs one warning naming every changed field, old -> new.
  - SIGTERM or SIGINT: the pending train metrics are written, a checkpoint is saved, and
    TrainingInterrupted is raised (a second SIGINT exits at once, saving nothing more).

Outputs in `workdir`: config.json, metrics.jsonl, tensorboard/ (with the config as hyper-parameters),
checkpoints/{latest,best}/ and results.json (the dict `train_and_evaluate` returns).

Self-pretraining (config.pretrain.steps > 0; efficient_attn/pretraining.py): the same loop first runs
the pretraining stage in workdir/pretrain/ (pretrain_config.json, metrics.jsonl, tensorboard/,
checkpoints/, results.json; the best checkpoint by validation loss), then the task's training starts
from its best checkpoint's encoder, a state saved at once as checkpoints/latest/0 (a relaunch resumes
from there without the pretraining directory). A relaunch finishes whichever stage was interrupted,
exactly. With pretrain.init_from the first stage is skipped and the weights come from there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from efficient_attn import checkpointing
from efficient_attn import cli
from efficient_attn import metrics as metrics_lib
from efficient_attn import models
from efficient_attn import objectives
from efficient_attn import optimization
from efficient_attn import pretraining
from efficient_attn import sharding
from efficient_attn import train_state as ts

# jax.random implementations a run may use (config.rng_impl): threefry is JAX's portable default;
# rbg compiles much faster on CPU (tests) and runs faster on accelerators, but its streams are only
# reproducible on the same backend.
RNG_IMPLS = ('threefry2x32', 'rbg', 'unsafe_rbg')
CONFIG_FILE = 'config.json'
RESULTS_FILE = 'results.json'
LOCK_FILE = 'train.lock'
# The step counter (and optax's) is int32.
MAX_STEPS = 2**31 - 1
# Signals that stop a run cleanly (checkpoint first); a second SIGINT exits at once.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REQUIRED_SECTIONS = ('task', 'seed', 'data', 'model', 'attention', 'optimizer', 'train', 'mesh')
TRAIN_FIELDS = ('batch_size', 'steps', 'eval_batch_size', 'max_eval_batches', 'log_every',
                'eval_every', 'checkpoint_every', 'keep_checkpoints', 'async_checkpointing',
                'progress_bar')


class ConfigError(ValueError):
  """An invalid config: bad section, value, data, model or attention option. One line."""


class WorkdirError(ValueError):
  """The workdir cannot be used: not creatable or writable, in use by another run, or holding
  checkpoints none of which restores. The message is one line and names the directory."""


class NonFiniteLossError(FloatingPointError):
  """The training loss (or the parameters after an update) became NaN or infinite."""

  def __init__(self, step: int, value: float, *, params: bool = False):
    what = (f'The parameters became non-finite in update {step} (its loss was {value})' if params
            else f'Training loss is {value} at step {step}')
    super().__init__(f'{what}; stopping (the last good checkpoint is kept; lower the learning rate '
                     'or enable gradient clipping).')
    self.step = step


class TrainingInterrupted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint of `step` was saved. Launch again on the workdir to
  resume. `signum` is the signal (a command line exits with 128 + signum)."""

  def __init__(self, step: int, signum: int = signal.SIGTERM):
    self.signal_name = signal.Signals(signum).name
    super().__init__(f'Interrupted by {self.signal_name}; saved a checkpoint at step {step}.')
    self.step = step
    self.signum = int(signum)


@dataclasses.dataclass(frozen=True)
class Components:
  """What a run builds on: the data and model libraries (tests substitute tiny ones)."""

  load_task: Callable[[Any], Any]  # config.data -> efficient_attn.data.base.TaskData
  train_batches: Callable[..., Iterator[dict[str, np.ndarray]]]
  eval_batches: Callable[..., Iterator[dict[str, np.ndarray]]]
  create_model: Callable[..., nnx.Module]  # (model_cfg, attention_cfg, *, kind, ..., rngs)
  count_params: Callable[[nnx.Module], int]


def default_components() -> Components:
  """The project's data pipelines and models."""
  from efficient_attn import data  # pylint: disable=import-outside-toplevel  (heavy: datasets)
  from efficient_attn import models  # pylint: disable=import-outside-toplevel
  from efficient_attn.data import iterators  # pylint: disable=import-outside-toplevel
  return Components(load_task=data.load_task, train_batches=iterators.train_batches,
                    eval_batches=iterators.eval_batches, create_model=models.create_model,
                    count_params=models.count_params)


# -- config ----------------------------------------------------------------------------------------


def _positive_int(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def check_config(config: ml_collections.ConfigDict) -> None:
  """Validates everything the loop reads. Raises ConfigError naming the field and what is valid.

  The data, model and attention sections are checked here too, before any data is loaded or
  generated, so a bad option fails at once (the loaders and the model build re-check them).
  """
  missing = [k for k in REQUIRED_SECTIONS if k not in config]
  if missing:
    raise ConfigError(f'config lacks section(s) {", ".join(missing)}; a config needs '
                      f'{", ".join(REQUIRED_SECTIONS)} (see configs/common.py).')
  if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
    raise ConfigError(f'seed must be an integer >= 0, got {config.seed!r}.')
  if config.get('rng_impl', 'threefry2x32') not in RNG_IMPLS:
    raise ConfigError(f'rng_impl must be one of {", ".join(RNG_IMPLS)}, got {config.rng_impl!r}.')
  train = config.train
  missing = [k for k in TRAIN_FIELDS if k not in train]
  if missing:
    raise ConfigError(f'config.train lacks {", ".join(missing)}.')
  for key in ('batch_size', 'steps', 'eval_batch_size', 'log_every', 'eval_every',
              'checkpoint_every', 'keep_checkpoints'):
    if not _positive_int(train[key]):
      raise ConfigError(f'train.{key} must be a positive integer, got {train[key]!r}.')
  if train.steps > MAX_STEPS:
    raise ConfigError(f'train.steps must be at most {MAX_STEPS} (the step counter is int32), got '
                      f'{train.steps}.')
  if not isinstance(train.max_eval_batches, int) or (train.max_eval_batches < 1
                                                     and train.max_eval_batches != -1):
    raise ConfigError('train.max_eval_batches must be a positive integer or -1 (all), got '
                      f'{train.max_eval_batches!r}.')
  try:
    from efficient_attn import data  # pylint: disable=import-outside-toplevel  (heavy: datasets)
    data.check_data_config(config.data)
    model_config = models.resolve_model_config(config.model)
    attentions = models.resolve_layer_attentions(config.attention, model_config['num_layers'],
                                                 model_config['num_heads'])
    if config.task == 'lm':  # otherwise the first traced step fails, after the data has loaded
      models.require_causal(attentions, "the 'lm' task (its model attends causally in every "
                            'layer)')
    optimization.check_optimizer_config(config.optimizer)
    _check_pretrain_config(config, attentions)
    sharding.config_rules(config)
    if not isinstance(config.get('sequence_parallel', True), bool):
      raise ValueError(f'sequence_parallel must be True or False, got {config.sequence_parallel!r}.')
    mesh_shape = sharding.mesh_shape(config.mesh.to_dict(), jax.device_count())
    axis_types = config.get('mesh_axis_types', 'auto')
    if axis_types not in sharding.AXIS_TYPES:
      raise ValueError(f'mesh_axis_types must be one of {", ".join(sharding.AXIS_TYPES)}, got '
                       f'{axis_types!r}.')
  except ValueError as e:
    raise ConfigError(str(e)) from e
  ways = int(np.prod([s for a, s in zip(sharding.MESH_AXES, mesh_shape)
                      if a in sharding.BATCH_AXES]))
  for key in ('batch_size', 'eval_batch_size'):
    for divisor, what in ((ways, 'the batch-parallel mesh size (data x fsdp)'),
                          (jax.process_count(), 'the process count')):
      if train[key] % divisor:
        raise ConfigError(f'train.{key}={train[key]} is not divisible by {what}, {divisor}.')


def _check_pretrain_config(config: ml_collections.ConfigDict, attentions) -> None:
  """config.pretrain (optional: configs without it never pretrain); ValueError if invalid.
  `attentions`: the layers' attentions, as check_config resolved them."""
  pretraining.check_config(config, 'lm' if config.task == 'lm' else None)
  p = pretraining.section(config)
  if (p is None or not pretraining.configured(config) or p.init_from
      or (p.objective != 'causal' and config.task != 'lm')):
    return
  models.require_causal(
      attentions, f'causal pretraining (pretrain.objective={p.objective!r})',
      "use pretrain.objective='masked' or another variant")


def variant_name(config: ml_collections.ConfigDict) -> str:
  """The attention variant of a config, with its layer overrides: 'local', 'local+3:full'."""
  name = config.attention.get('name', 'full')
  overrides = config.attention.get('layer_overrides', '')
  return f'{name}+{overrides}' if overrides else name


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in `workdir/config.json`."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir!r} is not a training workdir (no {CONFIG_FILE}).')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


# -- model and steps -------------------------------------------------------------------------------


def build_model(config: ml_collections.ConfigDict, task: Any, components: Components, *,
                pretrain: pretraining.Spec | None = None) -> nnx.Module:
  """The model of `config` for `task`, initialised from config.seed. ConfigError on bad options.

  With `pretrain`, the pretraining model (efficient_attn/models/pretraining.py: the same encoder
  under a token head). Where pretraining is configured, the vocabulary holds the [MASK] id
  (pretraining.model_vocab_size), in both stages. The initialisation runs as one jitted program:
  op-by-op it would compile every initializer separately, which costs seconds on CPU.
  """
  impl = config.get('rng_impl', 'threefry2x32')
  keys = jax.random.split(jax.random.key(config.seed, impl=impl), 3)
  vocab_size = pretraining.model_vocab_size(config, task.kind, task.vocab_size)

  def create(keys):
    rngs = nnx.Rngs(params=keys[0], dropout=keys[1], attention=keys[2])
    if pretrain is not None:
      return models.create_pretraining_model(
          config.model, config.attention, kind=task.kind, vocab_size=vocab_size,
          max_length=task.max_length, causal=pretrain.objective == 'causal', rngs=rngs)
    return components.create_model(config.model, config.attention, kind=task.kind,
                                   vocab_size=vocab_size, num_classes=task.num_classes,
                                   max_length=task.max_length, rngs=rngs)

  try:
    return nnx.jit(create)(keys)
  except (ValueError, TypeError) as e:
    raise ConfigError(f'model/attention config: {e}') from e


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    lr_schedule: Callable[[jax.Array], jax.Array], kind: str,
                    batch_sums: Callable | None = None):
  """(state, batch) -> (state, metrics): one AdamW update; metrics hold device scalars (loss,
  grad_norm, learning_rate, params_finite: whether every updated parameter is finite, and the
  objective's sums). `batch_sums(logits, batch)` replaces the task objective (pretraining)."""
  batch_sums = batch_sums or functools.partial(objectives.batch_sums, kind)

  def loss_fn(params, rngs, other, batch):
    model = ts.merge_model(graphdef, {'params': params, 'rngs': rngs, 'other': other})
    logits = model(batch['inputs'], batch['mask'], train=True)
    sums = batch_sums(logits, batch)
    new = ts.model_state_of(model)  # RNG counters advanced by this step's draws
    return objectives.mean_loss(sums), (sums, new['rngs'], new['other'])

  def step(state, batch):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (sums, rngs, other)), grads = grad_fn(state['params'], state['rngs'], state['other'],
                                                 batch)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new_state = {'step': state['step'] + 1, 'params': params, 'rngs': rngs, 'other': other,
                 'opt_state': opt_state}
    # Checked on the host before anything is saved: a finite loss can still come with an update
    # that overflowed the parameters, and the next checkpoint must not hold them.
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    return new_state, {'loss': loss, 'grad_norm': optax.tree.norm(grads),
                       'learning_rate': lr_schedule(state['step']), 'params_finite': finite,
                       **sums}

  return step


@dataclasses.dataclass
class TrainingSetup:
  """What a run trains: the initial train state (in its shardings) and its jitted update."""

  num_params: int
  graphdef: nnx.GraphDef
  state: dict  # ts.init_train_state's layout
  train_step: Callable  # jitted (state, batch) -> (state, metrics); donates `state`


def setup_training(config: ml_collections.ConfigDict, task: Any, components: Components,
                   mesh: jax.sharding.Mesh, *,
                   pretrain: pretraining.Spec | None = None) -> TrainingSetup:
  """The model, optimizer, initial state and jitted train step of `config` for `task` (only its
  kind, vocab_size, num_classes and max_length are read): what `train_and_evaluate` trains, and what
  efficient_attn.benchmark_training times. Call it under the run's mesh and sharding rules.

  With `pretrain`: the pretraining stage's (its model and objective, config.optimizer scheduled
  over pretrain.steps)."""
  model = build_model(config, task, components, pretrain=pretrain)
  num_params = int(components.count_params(model))
  graphdef, model_state = ts.split_model(model)
  del model
  steps = config.train.steps if pretrain is None else pretrain.steps
  tx, lr_schedule = optimization.make_optimizer(config.optimizer, steps)
  # One jitted program (op by op, every optimizer-state leaf would compile its own zeros), whose
  # outputs land directly in their shardings.
  init = functools.partial(ts.init_train_state, tx=tx)
  state_shardings = sharding.state_sharding(jax.eval_shape(init, model_state), mesh,
                                            sharding.config_rules(config))
  state = jax.jit(init, out_shardings=state_shardings)(model_state)
  del model_state
  sums = None if pretrain is None else functools.partial(pretraining.batch_sums, pretrain.objective)
  train_step = jax.jit(make_train_step(graphdef, tx, lr_schedule, task.kind, sums),
                       donate_argnums=(0,),
                       out_shardings=(state_shardings, sharding.replicated(mesh)))
  return TrainingSetup(num_params=num_params, graphdef=graphdef, state=state,
                       train_step=train_step)


def make_eval_step(graphdef: nnx.GraphDef, kind: str, batch_sums: Callable | None = None):
  """(model_state, batch) -> sums; deterministic (train=False: no dropout, fixed attention keys).
  `batch_sums(logits, batch)` replaces the task objective (pretraining)."""
  batch_sums = batch_sums or functools.partial(objectives.batch_sums, kind)

  def step(model_state, batch):
    model = ts.merge_model(graphdef, model_state)
    logits = model(batch['inputs'], batch['mask'], train=False)
    return batch_sums(logits, batch)

  return step


@jax.jit
def _tree_add(a, b):
  return jax.tree.map(jnp.add, a, b)


def evaluate(eval_step: Callable, model_state: Any, batches: Iterator[dict[str, np.ndarray]],
             mesh: jax.sharding.Mesh, kind: str, max_batches: int = -1) -> dict[str, float]:
  """Loss and accuracy (and bits per byte for 'lm') over `batches` (all, or the first max_batches)."""
  totals = None
  for i, batch in enumerate(batches):
    if 0 <= max_batches <= i:
      break
    sums = eval_step(model_state, sharding.place_batch(batch, mesh))
    totals = sums if totals is None else _tree_add(totals, sums)
  if totals is None:
    raise ValueError('The evaluation split yielded no batches.')
  return objectives.summarize(kind, jax.device_get(totals))


# -- the loop --------------------------------------------------------------------------------------


class _StopSignals:
  """Turns SIGTERM and SIGINT into a request the loop polls (only the main thread may install
  handlers): the loop then saves a checkpoint and stops. A second SIGINT (Ctrl-C pressed again)
  exits at once with status 130, saving nothing more; the checkpoints on disk stay intact (Orbax
  renames a checkpoint into place only once it is complete)."""

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in STOP_SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.signum is not None:
      if signum == signal.SIGINT:
        os.write(2, b'Interrupted again: exiting now, without saving a checkpoint.\n')
        os._exit(128 + signal.SIGINT)  # pylint: disable=protected-access  (no unwinding: at once)
      return
    self.signum = signum
    # os.write: safe inside a signal handler, and says why the run goes on for a moment.
    os.write(2, f'{signal.Signals(signum).name}: stopping after the current step, with a '
                f'checkpoint (Ctrl-C again exits at once, without it).\n'.encode())

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    return False

  def poll(self) -> int | None:
    """The stop signal, if any process got one (all processes must stop at the same step to save)."""
    if jax.process_count() == 1:
      return self.signum
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    got = [int(s) for s in np.ravel(multihost_utils.process_allgather(np.array(self.signum or 0)))
           if s]
    return got[0] if got else None


@contextlib.contextmanager
def _locked_workdir(workdir: str, *, enabled: bool) -> Iterator[None]:
  """Creates `workdir` and holds an exclusive flock on workdir/train.lock for the block.

  The OS releases an flock when its process ends, however it ends, so a killed run leaves no stale
  lock. WorkdirError if the directory cannot be created or written, or another run holds the lock.
  A workdir this call created is removed again if the block leaves nothing in it but the lock file.
  """
  if not enabled:  # processes other than 0: the chief locks the (shared) workdir
    yield
    return
  absolute = os.path.abspath(workdir)
  created = not os.path.isdir(absolute)
  try:
    os.makedirs(absolute, exist_ok=True)
    lock = open(os.path.join(absolute, LOCK_FILE), 'a+')  # pylint: disable=consider-using-with
  except OSError as e:
    raise WorkdirError(f'cannot use --workdir={workdir} ({absolute}): {e.strerror or e}; give a '
                       'writable directory.') from e
  try:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      lock.seek(0)
      holder = lock.read().strip() or '?'
      raise WorkdirError(f'workdir {absolute} is in use by another run (process {holder} holds '
                         f'{LOCK_FILE}); wait for it to end, or give another --workdir.') from None
    except OSError as e:  # a filesystem without flock: train unprotected rather than not at all
      logging.warning('Cannot lock %s (%s); nothing stops a second run on it.', absolute, e)
    lock.truncate(0)
    lock.write(f'{os.getpid()}\n')
    lock.flush()
    logging.info('Run directory: %s', absolute)
    yield
  finally:
    lock.close()  # releases the flock
    if created and os.listdir(absolute) == [LOCK_FILE]:
      os.remove(os.path.join(absolute, LOCK_FILE))
      os.rmdir(absolute)


class _AboveBarStream:
  """A text stream whose writes go above an active tqdm bar (tqdm.write clears and redraws it)."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text: str) -> int:
    tqdm.tqdm.write(text, file=self._stream, end='')
    return len(text)

  def __getattr__(self, name):
    return getattr(self._stream, name)


@contextlib.contextmanager
def _logs_above_bar(bar: tqdm.tqdm) -> Iterator[None]:
  """While the bar is shown, log lines (and anything else written to stderr) go above it instead of
  into it: sys.stderr (which absl's handler looks up for every record) and every logging handler
  writing to the bar's stream write through `_AboveBarStream`."""
  if bar.disable:
    yield
    return
  original = sys.stderr
  proxy = _AboveBarStream(original)
  handlers = [h for logger in (logging.getLogger(), logging.getLogger('absl'))
              for h in logger.handlers]
  handlers += [h.python_handler for h in handlers if hasattr(h, 'python_handler')]  # absl's
  swapped = [h for h in handlers if isinstance(h, logging.StreamHandler) and h.stream is original]
  sys.stderr = proxy
  for h in swapped:
    h.stream = proxy
  try:
    yield
  finally:
    for h in swapped:
      if h.stream is proxy:
        h.stream = original
    if sys.stderr is proxy:
      sys.stderr = original


def _write_json(path: str, obj: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """'field: old -> new' (values as JSON, '(absent)' for a missing field) for every field, by dotted
  path, that differs between two configs given as dicts (config.json's form)."""
  a, b = metrics_lib.flatten(old), metrics_lib.flatten(new)
  missing = object()

  def show(value):
    return '(absent)' if value is missing else json.dumps(value)

  return [f'{k}: {show(a.get(k, missing))} -> {show(b.get(k, missing))}'
          for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def _saved_config_changes(config: ml_collections.ConfigDict, workdir: str,
                          filename: str = CONFIG_FILE) -> list[str]:
  path = os.path.join(workdir, filename)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    old = json.load(f)
  return config_changes(old, json.loads(config.to_json_best_effort()))


def _save_config(config: ml_collections.ConfigDict, workdir: str, *, resuming: bool,
                 step: int, filename: str = CONFIG_FILE) -> None:
  if resuming:
    changes = _saved_config_changes(config, workdir, filename)
    if changes:
      # Legitimate (e.g. more steps), but the data order and the learning-rate schedule may no
      # longer match the checkpoint's, so say exactly what changed; config.json then describes the
      # resumed run.
      schedule = any(c.startswith(('optimizer.', 'train.steps:')) for c in changes)
      logging.warning('Resuming %s at step %d with a config that differs from its config.json in '
                      '%d field(s): %s.%s', workdir, step, len(changes), '; '.join(changes),
                      ' The learning-rate schedule follows the new values from this step on.'
                      if schedule else '')
  _write_json(os.path.join(workdir, filename), json.loads(config.to_json_best_effort()))


def _finished_results(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """The saved results of a run that has finished `config.train.steps` in `workdir`, else None."""
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      results = json.load(f)
  except (OSError, ValueError):
    return None  # unreadable: train (resume) and test again, which rewrites it
  if not isinstance(results, dict) or results.get('steps') != config.train.steps:
    return None
  changes = _saved_config_changes(config, workdir)
  logging.warning('%s has already finished its %d steps: reporting the results it saved, without '
                  'training or testing again%s (delete %s to test again, or raise train.steps to '
                  'train on).', workdir, config.train.steps,
                  f' (the config differs in {"; ".join(changes)}: not applied)' if changes else '',
                  RESULTS_FILE)
  return results


def _prefixed(prefix: str, values: Mapping[str, float]) -> dict[str, float]:
  return {f'{prefix}/{k}': v for k, v in values.items() if k != 'count'}


class _TrainLog:
  """Per-step device metrics waiting to be read; reading them checks the loss and the parameters
  for NaN/inf.

  `check` reads what is pending (before every evaluation and save) and keeps it, so `flush`, at a
  logging step, summarises every step since the previous summary. Reading waits for the device, so
  the time between two timed flushes is the time of the steps in between; `restart_clock` leaves out
  what is not training (compilation, evaluation, saving).
  """

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self.pending: list[tuple[int, dict[str, jax.Array]]] = []
    self.checked: list[dict[str, Any]] = []
    self.restart_clock()

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self.pending.append((step, metrics))
    self.clock_steps += 1

  def restart_clock(self) -> None:
    self.clock_start = time.perf_counter()
    self.clock_steps = 0

  def check(self) -> None:
    """Reads the pending metrics; NonFiniteLossError at the first step with a NaN/inf loss or
    non-finite updated parameters."""
    if not self.pending:
      return
    steps = [s for s, _ in self.pending]
    host = jax.device_get([m for _, m in self.pending])
    self.pending = []
    for step, m in zip(steps, host):
      if not np.isfinite(m['loss']):
        raise NonFiniteLossError(step, float(m['loss']))
      if not m['params_finite']:
        raise NonFiniteLossError(step, float(m['loss']), params=True)
    self.checked.extend(host)

  def flush(self, *, timed: bool) -> dict[str, float] | None:
    """Checks and summarises the steps since the last flush; None if there are none."""
    self.check()
    if not self.checked:
      return None
    host, self.checked = self.checked, []
    count = sum(float(m['count']) for m in host)
    out = {'loss': sum(float(m['loss_sum']) for m in host) / max(count, 1.0),
           'accuracy': sum(float(m['correct']) for m in host) / max(count, 1.0),
           'grad_norm': float(np.mean([m['grad_norm'] for m in host])),
           'learning_rate': float(host[-1]['learning_rate'])}  # of the interval's last update
    if timed and self.clock_steps:
      out['steps_per_sec'] = self.clock_steps / (time.perf_counter() - self.clock_start)
      out['tokens_per_sec'] = out['steps_per_sec'] * self.tokens_per_step
      self.restart_clock()
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       components: Components | None = None) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and tests the best model.

  Returns:
    The final metrics (also in workdir/results.json): 'test/<metric>' of the best validation
    checkpoint, 'best_step', 'validation/<metric>' at that step, 'steps', 'num_params', mean
    'steps_per_sec' and 'tokens_per_sec', 'peak_memory_bytes' (device memory; None where the device
    does not report it, e.g. on CPU), 'host_memory_bytes' (the process's peak resident memory),
    'task', 'variant', 'selection_metric'. For a run that had already finished: its saved results.

  Raises:
    ConfigError: an invalid config (before any work).
    WorkdirError: the workdir is unusable, in use by another run, or none of its checkpoints
      restores (before any training).
    NonFiniteLossError: the training loss or the parameters became NaN/inf (nothing of that step is
      saved).
    TrainingInterrupted: SIGTERM or SIGINT arrived; a checkpoint was saved first.
  """
  # Multi-process runs (JAX_NUM_PROCESSES > 1, or a TPU pod slice) join before JAX lists devices.
  sharding.initialize_distributed()
  check_config(config)
  components = components or default_components()
  is_chief = jax.process_index() == 0
  with _locked_workdir(workdir, enabled=is_chief):
    finished = _finished_results(config, workdir)
    if finished is not None:
      return finished
    mesh = sharding.make_mesh(config.mesh.to_dict(), config.get('mesh_axis_types', 'auto'))
    rules = sharding.config_rules(config)
    sequence_parallel = config.get('sequence_parallel', True)
    with (jax.set_mesh(mesh), sharding.use_rules(rules, sequence_parallel=sequence_parallel),
          _StopSignals() as signals):
      return _run(config, workdir, components, mesh, is_chief, signals)


@dataclasses.dataclass
class _Stage:
  """One training stage of a run: pretraining (in <workdir>/pretrain) or the task's training."""

  label: str  # progress-bar suffix: '' or ' pretrain'
  workdir: str
  steps: int
  steps_field: str  # the config field of `steps`, for messages
  config_file: str
  metric: str  # validation metric that picks the best checkpoint
  mode: str  # 'max' or 'min'
  kind: str  # the task kind (how evaluation sums are summarised)
  setup: TrainingSetup
  eval_step: Callable
  train_batches: Callable[[int], Iterator[dict[str, np.ndarray]]]  # start step -> stream
  validation_batches: Callable[[], Iterator[dict[str, np.ndarray]]]
  # Applied to a fresh state (not on resume): fine-tuning loads the pretrained weights here.
  initialize: Callable[[dict], dict] | None = None
  hparam_metrics: tuple[str, ...] = ()


def _run(config, workdir, components, mesh, is_chief, signals) -> dict[str, Any]:
  """The body of `train_and_evaluate`, under the mesh, the workdir lock and the signal handlers:
  the pretraining stage if configured (pretraining.py), then the task's training and its test."""
  tc = config.train
  task = components.load_task(config.data)
  kind = task.kind
  metric, mode = objectives.selection_metric(kind)
  pindex, pcount = jax.process_index(), jax.process_count()
  try:
    spec = pretraining.resolve(config, kind, task.vocab_size)
  except ValueError as e:
    raise ConfigError(str(e)) from e

  initialize = source = None
  started = spec is not None and _has_latest_checkpoint(workdir)
  if spec is not None:
    if spec.init_from:
      source = pretrained_dir(spec.init_from, must_exist=not started)
      if spec.steps and is_chief and not started:
        # The `pretrain` config argument sets pretrain.steps; with init_from those steps are not
        # taken, and saying so is kinder than a run that silently trains for half its budget.
        logging.warning('pretrain.init_from is set: this run does not pretrain itself (its '
                        'pretrain.steps=%d are skipped); it fine-tunes the weights of %s for '
                        'train.steps=%d.', spec.steps, source, config.train.steps)
    else:
      source = os.path.join(workdir, pretraining.PRETRAIN_DIR)
      if not started:  # once fine-tuning has begun, its checkpoints hold everything it needs
        _pretrain(config, spec, task, components, mesh, is_chief, signals, source)
  setup = setup_training(config, task, components, mesh)
  if spec is not None and not started:
    # The pretrained weights are checked against this model before any training.
    loaded = _load_pretrained(config, source, ts.abstract(setup.state['params']), kind, mesh)

    def initialize(state):
      flat, treedef = jax.tree_util.tree_flatten_with_path(state['params'])
      state['params'] = jax.tree_util.tree_unflatten(
          treedef, [loaded.get(_key_names(p), leaf) for p, leaf in flat])
      return state

  stage = _Stage(
      label='', workdir=workdir, steps=tc.steps, steps_field='train.steps',
      config_file=CONFIG_FILE, metric=metric, mode=mode, kind=kind, setup=setup,
      eval_step=jax.jit(make_eval_step(setup.graphdef, kind)),
      train_batches=lambda start: components.train_batches(
          task.train, tc.batch_size, seed=config.seed, start_step=start, process_index=pindex,
          process_count=pcount),
      validation_batches=lambda: components.eval_batches(
          task.validation, tc.eval_batch_size, process_index=pindex, process_count=pcount),
      initialize=initialize, hparam_metrics=(f'validation/{metric}', f'test/{metric}'))

  def finish(state, ckpt, writer):
    # Test with the best validation checkpoint.
    best_state, record = ckpt.restore_best(ts.abstract(ts.model_part(state)))
    test_batches = components.eval_batches(task.test, tc.eval_batch_size, process_index=pindex,
                                           process_count=pcount)
    test = evaluate(stage.eval_step, best_state, test_batches, mesh, kind)
    writer.write(tc.steps, {**_prefixed('test', test), 'test/best_step': record['step']})
    logging.info('test (best validation checkpoint, step %d): %s', record['step'], test)
    results = {
        'task': config.task, 'kind': kind, 'variant': variant_name(config), 'steps': tc.steps,
        'best_step': int(record['step']), 'selection_metric': metric,
        **{f'validation/{k}': v for k, v in record['metrics'].items() if k != 'count'},
        **_prefixed('test', test),
        'num_params': setup.num_params,
        **_timing_results(workdir, is_chief),
    }
    if source is not None:
      results.update(_pretrain_summary(source))
    if is_chief:
      _write_json(os.path.join(workdir, RESULTS_FILE), results)
    return results

  return _train_stage(config, stage, mesh, is_chief, signals, finish)


def _has_latest_checkpoint(workdir: str) -> bool:
  directory = os.path.join(workdir, checkpointing.CHECKPOINT_DIR, 'latest')
  return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


def _timing_results(workdir: str, is_chief: bool) -> dict[str, Any]:
  history = metrics_lib.read_metrics(workdir) if is_chief else []
  _, sps = metrics_lib.series(history, 'train/steps_per_sec')
  _, tps = metrics_lib.series(history, 'train/tokens_per_sec')
  _, mem = metrics_lib.series(history, 'train/peak_memory_bytes')
  _, host_mem = metrics_lib.series(history, 'train/host_memory_bytes')
  return {
      'steps_per_sec': float(np.median(sps)) if sps else None,
      'tokens_per_sec': float(np.median(tps)) if tps else None,
      'peak_memory_bytes': int(max(mem)) if mem else None,
      'host_memory_bytes': int(max(host_mem)) if host_mem else None,
  }


# -- pretraining -----------------------------------------------------------------------------------

PRETRAIN_CONFIG_FILE = 'pretrain_config.json'  # in <workdir>/pretrain: the config it ran with


def _pretrain(config, spec: pretraining.Spec, task, components, mesh, is_chief, signals,
              workdir: str) -> dict[str, Any]:
  """The pretraining stage in `workdir` (<run>/pretrain): resumable as the task's training; its best
  checkpoint is the lowest validation denoising (or next-token) loss. Returns its results (also in
  workdir/results.json); a finished stage returns them without building anything."""
  done = cli.read_json(os.path.join(workdir, RESULTS_FILE))
  if done is not None and done.get('steps') == spec.steps:
    logging.info('Pretraining in %s has finished its %d steps.', workdir, spec.steps)
    return done
  tc = config.train
  pindex, pcount = jax.process_index(), jax.process_count()
  prepend_cls = models.pretraining.encoder_prepends_cls(config.model, task.kind)
  setup = setup_training(config, task, components, mesh, pretrain=spec)
  stream = functools.partial(pretraining.train_stream, spec=spec, seed=config.seed,
                             prepend_cls=prepend_cls, process_index=pindex)
  stage = _Stage(
      label=' pretrain', workdir=workdir, steps=spec.steps, steps_field='pretrain.steps',
      config_file=PRETRAIN_CONFIG_FILE, metric='loss', mode='min', kind=task.kind, setup=setup,
      eval_step=jax.jit(make_eval_step(setup.graphdef, task.kind, functools.partial(
          pretraining.batch_sums, spec.objective))),
      train_batches=lambda start: stream(components.train_batches(
          task.train, tc.batch_size, seed=config.seed, start_step=start, process_index=pindex,
          process_count=pcount), start_step=start),
      validation_batches=lambda: pretraining.eval_stream(components.eval_batches(
          task.validation, tc.eval_batch_size, process_index=pindex, process_count=pcount),
          spec, seed=config.seed, prepend_cls=prepend_cls, process_index=pindex),
      hparam_metrics=('validation/loss',))

  def finish(state, ckpt, writer):
    del state, writer
    record = ckpt.best_record()
    results = {'task': config.task, 'kind': task.kind, 'variant': variant_name(config),
               'objective': spec.objective, 'steps': spec.steps, 'best_step': int(record['step']),
               'selection_metric': 'loss', 'num_params': setup.num_params,
               **{f'validation/{k}': v for k, v in record['metrics'].items() if k != 'count'},
               **_timing_results(workdir, is_chief)}
    if is_chief:
      _write_json(os.path.join(workdir, RESULTS_FILE), results)
    logging.info('pretraining done (best validation loss %.4f at step %d)',
                 record['metrics']['loss'], record['step'])
    return results

  return _train_stage(config, stage, mesh, is_chief, signals, finish)


def pretrained_dir(path: str, *, must_exist: bool = True) -> str:
  """The pretraining directory `pretrain.init_from` names: `path` itself, or its pretrain/
  subdirectory (a run directory). ConfigError (one line) if neither holds a best checkpoint (or,
  with must_exist=False, `path`)."""
  for candidate in (os.path.join(path, pretraining.PRETRAIN_DIR), path):
    # A training workdir (config.json) holds a classifier, not pretrained weights.
    if (os.path.isdir(os.path.join(candidate, checkpointing.CHECKPOINT_DIR, 'best'))
        and not os.path.exists(os.path.join(candidate, CONFIG_FILE))):
      return candidate
  if not must_exist:
    return path
  raise ConfigError(f'pretrain.init_from={path!r} holds no pretraining checkpoint (no '
                    f'checkpoints/best there or in its {pretraining.PRETRAIN_DIR}/); give the '
                    'pretrain/ directory of a run launched with the pretrain config argument.')


def _describe_model(config: Mapping[str, Any] | None) -> str:
  if not config:
    return '?'
  m, a = config.get('model', {}), config.get('attention', {})
  name = a.get('name', 'full') + (f"+{a['layer_overrides']}" if a.get('layer_overrides') else '')
  return (f"variant {name}, num_layers={m.get('num_layers')}, num_heads={m.get('num_heads')}, "
          f"emb_dim={m.get('emb_dim')}, mlp_dim={m.get('mlp_dim')}")


def _key_names(path) -> tuple[str, ...]:
  """A tree path as plain names: nnx.State (dict keys, `.value`) and Orbax metadata (dict keys)
  name the same parameter alike."""
  names = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  return tuple(names)


def _load_pretrained(config, source: str, abstract_params: Any, kind: str,
                     mesh: jax.sharding.Mesh) -> dict[tuple[str, ...], jax.Array]:
  """{parameter path (`_key_names`): array} of the transferred groups (pretraining.transferred_keys)
  from the best checkpoint in `source`, in the shardings of `abstract_params` (a fresh fine-tuning
  state's parameters, as ShapeDtypeStructs).

  Raises ConfigError (one line naming the parameter path, the shapes and both models' variant and
  sizes) when the pretrained weights do not fit: another size, or a variant with other learned
  weights. Variants without weights (full, local, ...) fit each other.
  """
  groups = pretraining.transferred_keys(kind)
  ckpt = checkpointing.Checkpointer(source, mode='min', read_only=True)
  try:
    record = ckpt.best_record()
    if record is None:
      raise ConfigError(f'{source} holds no usable pretraining checkpoint'
                        f'{": " + ckpt.best_problem if ckpt.best_problem else ""}.')
    metadata = ckpt.best_metadata()
    pretrained = {_key_names(p): m for p, m in jax.tree_util.tree_flatten_with_path(
        metadata.get('params', {}), is_leaf=lambda x: hasattr(x, 'shape'))[0]}
    pretrained = {k: m for k, m in pretrained.items() if k[0] in groups}
    here = {_key_names(p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    here_groups = {k: leaf for k, leaf in here.items() if k[0] in groups}
    problem = None
    for k in sorted(set(pretrained) | set(here_groups)):
      name = '/'.join(n for n in k if n != 'value')
      if k not in here_groups:
        problem = f'parameter {name} is in the pretrained weights only'
      elif k not in pretrained:
        problem = f'parameter {name} is not in the pretrained weights'
      elif tuple(pretrained[k].shape) != tuple(here_groups[k].shape):
        problem = (f'parameter {name} has shape {tuple(pretrained[k].shape)} pretrained, '
                   f'{tuple(here_groups[k].shape)} here')
      if problem:
        break
    if problem:
      source_config = cli.read_json(os.path.join(source, PRETRAIN_CONFIG_FILE))
      raise ConfigError(
          f'the pretrained weights of {source} do not fit this model: {problem} (pretrained: '
          f'{_describe_model(source_config)}; this run: '
          f'{_describe_model(json.loads(config.to_json_best_effort()))}); fine-tune the same '
          'sizes, with a variant of the same learned weights (variants without weights mix).')
    # Restore the whole saved model state (Orbax restores trees whole): the transferred groups
    # straight into this run's shardings, the rest replicated and dropped.
    replicated = sharding.replicated(mesh)

    def target(path, m):
      names = _key_names(path)
      leaf = here_groups.get(names[1:]) if names[:1] == ('params',) else None
      return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                  sharding=replicated if leaf is None else leaf.sharding)

    abstract = jax.tree_util.tree_map_with_path(target, metadata,
                                                is_leaf=lambda x: hasattr(x, 'shape'))
    restored, _ = ckpt.restore_best(abstract)
  finally:
    ckpt.close()
  loaded = {_key_names(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(
      restored['params'])[0] if _key_names(p)[0] in groups}
  logging.info('Fine-tuning from the pretrained %s of %s (step %d, validation loss %.4f).',
               ' and '.join(groups), source, record['step'],
               record['metrics'].get('loss', math.nan))
  return loaded


def _pretrain_summary(source: str) -> dict[str, Any]:
  """What the fine-tuning results record of the pretraining they started from."""
  done = cli.read_json(os.path.join(source, RESULTS_FILE)) or {}
  return {'pretrained_from': os.path.abspath(source), 'pretrain_steps': done.get('steps'),
          'pretrain_best_step': done.get('best_step'),
          'pretrain_objective': done.get('objective'),
          'pretrain_validation_loss': done.get('validation/loss')}


# -- one stage -------------------------------------------------------------------------------------


def _train_stage(config, stage: _Stage, mesh, is_chief, signals, finish) -> dict[str, Any]:
  """Trains `stage` (resuming from its latest checkpoint) and returns finish(state, ckpt, writer),
  called once the last step is done and saved (see the module docstring for the loop)."""
  tc = config.train
  total = stage.steps
  workdir = stage.workdir
  state, train_step = stage.setup.state, stage.setup.train_step
  stage.setup.state = None  # donated to the first step; the stage holds the only reference

  ckpt = checkpointing.Checkpointer(workdir, keep=tc.keep_checkpoints, mode=stage.mode,
                                    async_save=tc.async_checkpointing)
  start = 0
  latest = ckpt.latest_step()
  history = metrics_lib.read_metrics(workdir) if latest is not None else []
  if latest is not None:
    if latest > total:
      ckpt.close()
      raise ConfigError(f'{workdir} holds a checkpoint of step {latest}, beyond '
                        f'{stage.steps_field}={total}; raise {stage.steps_field} or use another '
                        'workdir.')
    try:
      state = ckpt.restore_latest(ts.abstract(state))
    except checkpointing.NoRestorableCheckpointError as e:
      ckpt.close()
      raise WorkdirError(str(e)) from e
    start = int(jax.device_get(state['step']))
    logging.info('Resumed from step %d in %s.', start, workdir)
    if is_chief and os.path.exists(os.path.join(workdir, RESULTS_FILE)):
      os.remove(os.path.join(workdir, RESULTS_FILE))  # an extended run: tested again at its end
  elif stage.initialize is not None:
    state = stage.initialize(state)
    # Checkpointed at once: a relaunch resumes from here, without the pretrained directory.
    ckpt.save_latest(0, state)
  if is_chief:
    _save_config(config, workdir, resuming=latest is not None, step=start,
                 filename=stage.config_file)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_chief, resume_step=start)
  writer.write_config(json.loads(config.to_json_best_effort()), list(stage.hparam_metrics),
                      step=start)

  metric = stage.metric

  def validate(model_state):
    return evaluate(stage.eval_step, model_state, stage.validation_batches(), mesh, stage.kind,
                    tc.max_eval_batches)

  if start > 0:
    _check_best(ckpt, ts.model_part(state), start, history, metric, validate, workdir)

  batches = stage.train_batches(start)
  log = None
  bar = tqdm.tqdm(total=total, initial=start, disable=not (is_chief and tc.progress_bar),
                  desc=f'{config.task}/{variant_name(config)}{stage.label}', unit='step',
                  dynamic_ncols=True)

  def write_train(step, summary):
    summary['peak_memory_bytes'] = metrics_lib.peak_memory_bytes()
    summary['host_memory_bytes'] = metrics_lib.peak_host_memory_bytes()
    writer.write(step, _prefixed('train', summary))
    bar.set_postfix(loss=f'{summary["loss"]:.4f}', acc=f'{summary["accuracy"]:.3f}')

  with contextlib.ExitStack() as cleanup:  # on the way out: streams, bar, writer, checkpoints
    cleanup.callback(ckpt.close)
    cleanup.callback(writer.close)
    cleanup.callback(bar.close)
    cleanup.enter_context(_logs_above_bar(bar))  # log lines go above the bar while it is shown
    step = start
    while step < total:
      batch = next(batches)
      if log is None:
        # Padded tokens of the global batch (this process's rows times the process count).
        log = _TrainLog(int(np.size(batch['inputs'])) * jax.process_count())
      state, step_metrics = train_step(state, sharding.place_batch(batch, mesh))
      step += 1
      log.add(step, step_metrics)
      bar.update(1)
      if step == start + 1:
        # The first step compiled the update; time the steady state only.
        jax.block_until_ready(step_metrics)
        log.restart_clock()
      last = step == total
      if step % tc.log_every == 0 or last:
        summary = log.flush(timed=True)
        if summary is not None:
          write_train(step, summary)
      if step % tc.eval_every == 0 or last:
        log.check()  # never evaluate or save NaN parameters
        val = validate(ts.model_part(state))
        writer.write(step, _prefixed('validation', val))
        logging.info('step %d%s validation %s', step, stage.label, val)
        if ckpt.is_improvement(val[metric]):
          ckpt.save_best(step, ts.model_part(state), metric=metric, score=val[metric],
                         metrics=val)
        log.restart_clock()
      if step % tc.checkpoint_every == 0 or last:
        log.check()
        ckpt.save_latest(step, state)
        log.restart_clock()
      # A multi-process run must agree on the stopping step, which costs a collective: ask only
      # at logging steps there.
      if not last and (jax.process_count() == 1 or step % tc.log_every == 0):
        signum = signals.poll()
        if signum is not None:
          # The steps since the last record would be lost on resume (it restarts after them).
          summary = log.flush(timed=True)
          if summary is not None:
            write_train(step, summary)
          if step % tc.checkpoint_every:  # at a checkpoint step this state has just been saved
            ckpt.save_latest(step, state)
          ckpt.wait()
          raise TrainingInterrupted(step, signum)
    ckpt.wait()
    return finish(state, ckpt, writer)


def _check_best(ckpt: checkpointing.Checkpointer, model_state: Any, step: int,
                history: list[dict[str, Any]], metric: str, validate: Callable,
                workdir: str) -> None:
  """On resume: if the best checkpoint is missing or does not restore although validations ran
  before `step` (metrics.jsonl), says so in one log line and validates the resumed model state in its
  place, so the test uses the best of it and of the validations to come."""
  ckpt.verify_best(ts.abstract(model_state))
  earlier = [r for r in history if f'validation/{metric}' in r and int(r['step']) <= step]
  # No validation has run yet: there is no best checkpoint to miss.
  replace = ckpt.best_record() is None and (bool(earlier) or ckpt.best_problem is not None)
  if jax.process_count() > 1:  # validating is collective: process 0 (which reads metrics) decides
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    replace = bool(multihost_utils.broadcast_one_to_all(np.array(replace)))
  if not replace:
    return
  problem = ckpt.best_problem or (
      f'the best checkpoint of {workdir} is missing (metrics.jsonl holds validations up to step '
      f'{earlier[-1]["step"] if earlier else "?"})')
  val = validate(model_state)
  ckpt.save_best(step, model_state, metric=metric, score=val[metric], metrics=val)
  logging.warning('%s; validated the resumed step %d in its place (validation %s %.4f): the test '
                  'split uses the best of it and of the validations to come.', problem, step,
                  metric, val[metric])


def evaluate_workdir(workdir: str, split: str = 'test', *, components: Components | None = None,
                     mesh_config: Mapping[str, int] | None = None
                     ) -> tuple[dict[str, float], dict[str, Any]]:
  """Evaluates the best validation checkpoint of a run on `split` ('test' or 'validation').

  `mesh_config` ({'data': ..., 'fsdp': ..., 'tensor': ..., 'sequence': ...}) evaluates on another
  mesh than the run's (e.g. fewer devices): the checkpoint is restored into that mesh's shardings.

  Returns:
    (metrics: loss, accuracy (and bits_per_byte for 'lm'), count; the best checkpoint's record:
    'step', 'score', 'metric', 'metrics').
  """
  if split not in ('test', 'validation'):
    raise ValueError(f"split must be 'test' or 'validation', got {split!r}.")
  config = load_config(workdir)
  if mesh_config is not None:
    config.mesh = ml_collections.ConfigDict(dict(mesh_config))
  sharding.initialize_distributed()
  check_config(config)
  components = components or default_components()
  mesh = sharding.make_mesh(config.mesh.to_dict(), config.get('mesh_axis_types', 'auto'))
  task = components.load_task(config.data)
  # Shapes only, no initialisation. Outside the mesh: under one, nnx.eval_shape turns the models'
  # logical axis names (sharding metadata) into mesh shardings, and those names are no mesh axes.
  model = nnx.eval_shape(lambda: build_model(config, task, components))
  graphdef, abstract_state = ts.split_model(model)
  # Restored straight into this mesh's shardings, whatever mesh wrote the checkpoint.
  rules = sharding.config_rules(config)
  abstract_state = sharding.abstract_state(abstract_state, mesh, rules)
  _, mode = objectives.selection_metric(task.kind)
  with jax.set_mesh(mesh), sharding.use_rules(rules,
                                              sequence_parallel=config.get('sequence_parallel', True)):
    ckpt = checkpointing.Checkpointer(workdir, mode=mode, read_only=True)
    try:
      model_state, record = ckpt.restore_best(abstract_state)
    finally:
      ckpt.close()
    batches = components.eval_batches(getattr(task, split), config.train.eval_batch_size,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
    metrics = evaluate(jax.jit(make_eval_step(graphdef, task.kind)), model_state, batches, mesh,
                       task.kind)
  return metrics, record
