"""Training and evaluation of one run: `train_and_evaluate(config, workdir)`.

The loop, step by step (s counts optimizer updates, 1..config.train.steps):
  1. batch s-1 of the deterministic training stream (`train_batches(..., start_step=...)`), placed on
     the mesh over the batch axes; one jitted, state-donating update.
  2. every `log_every` steps: train loss/accuracy, learning rate, steps/s, tokens/s, peak memory;
     a NaN/inf loss stops the run naming the first bad step.
  3. every `eval_every` steps and at the end: validation; a better selection score (accuracy, or bits
     per byte for 'lm') saves the model to the 'best' checkpoint.
  4. every `checkpoint_every` steps, at the end and on SIGTERM: the whole train state to 'latest'.
The work of step s is done before its checkpoint, so a run resumed from step s (same workdir) redoes
nothing and skips nothing: it reads the same batches, draws the same random numbers (the NNX RNG state
is checkpointed) and ends with the same parameters and metrics as an uninterrupted run. Finally the
test split is evaluated with the BEST validation checkpoint (not the last one).

Outputs in `workdir`: config.json, metrics.jsonl, tensorboard/, checkpoints/{latest,best}/ and
results.json (the dict `train_and_evaluate` returns).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import signal
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
from efficient_attn import metrics as metrics_lib
from efficient_attn import models
from efficient_attn import objectives
from efficient_attn import optimization
from efficient_attn import sharding
from efficient_attn import train_state as ts

# jax.random implementations a run may use (config.rng_impl): threefry is JAX's portable default;
# rbg compiles much faster on CPU (tests) and runs faster on accelerators, but its streams are only
# reproducible on the same backend.
RNG_IMPLS = ('threefry2x32', 'rbg', 'unsafe_rbg')
CONFIG_FILE = 'config.json'
RESULTS_FILE = 'results.json'
REQUIRED_SECTIONS = ('task', 'seed', 'data', 'model', 'attention', 'optimizer', 'train', 'mesh')
TRAIN_FIELDS = ('batch_size', 'steps', 'eval_batch_size', 'max_eval_batches', 'log_every',
                'eval_every', 'checkpoint_every', 'keep_checkpoints', 'async_checkpointing',
                'progress_bar')


class ConfigError(ValueError):
  """An invalid config: bad section, value, model or attention option. The message is one line."""


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""

  def __init__(self, step: int, value: float):
    super().__init__(f'Training loss is {value} at step {step}; stopping (the last good checkpoint '
                     'is kept; lower the learning rate or enable gradient clipping).')
    self.step = step


class TrainingInterrupted(Exception):
  """SIGTERM arrived; a checkpoint of `step` was saved. Launch again on the workdir to resume."""

  def __init__(self, step: int):
    super().__init__(f'Interrupted by SIGTERM; saved a checkpoint at step {step}.')
    self.step = step


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


def one_line_error(error: BaseException) -> str:
  """A readable one-line account of `error` and its causes, for command-line tools.

  Flag parsing wraps errors raised inside config files (with their traceback text) in its own
  errors; this returns the outermost message that is a single line ("flag --config.train.steps=abc:
  invalid literal ..."), else the last line of the innermost one (the config file's ValueError).
  ConfigDict's unknown-field errors become "unknown config field 'stpes' (Did you mean ...)".
  """
  chain = []
  while error is not None and len(chain) < 20:
    chain.append(error)
    error = error.__cause__ or error.__context__

  def lines_of(e):
    text = str(e.args[0]) if len(e.args) == 1 else str(e)
    text = text.replace('\\n', '\n')
    return [line.strip() for line in text.splitlines() if line.strip()]

  for e in chain:
    lines = lines_of(e)
    if isinstance(e, (AttributeError, KeyError)) and len(lines) == 2 and 'mean' in lines[1]:
      field = re.sub(r'[\\\'"]', '', lines[0])
      return f'unknown config field {field!r} ({lines[1].rstrip(chr(39) + chr(34))})'
  for e in chain:
    lines = lines_of(e)
    if len(lines) == 1:
      return lines[0]
  lines = lines_of(chain[-1])
  return lines[-1] if lines else type(chain[-1]).__name__


def quiet_library_logs() -> None:
  """Keeps the absl log to what a user wants to see: this package's INFO lines, other libraries'
  warnings (Orbax's only from ERROR up: it warns about routine things) and everyone's errors."""
  package_dir = os.path.dirname(os.path.abspath(__file__))

  def keep(record: logging.LogRecord) -> bool:
    if record.pathname.startswith(package_dir):
      return True
    if 'orbax' in record.pathname:
      return record.levelno >= logging.ERROR
    return record.levelno >= logging.WARNING

  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.get_absl_handler().addFilter(keep)


# -- config ----------------------------------------------------------------------------------------


def _positive_int(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def check_config(config: ml_collections.ConfigDict) -> None:
  """Validates everything the loop reads. Raises ConfigError naming the field and what is valid.

  The model and attention sections are checked here too, before any data is loaded or generated, so a
  bad option fails at once (the model build re-checks them against the task).
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
  if not isinstance(train.max_eval_batches, int) or (train.max_eval_batches < 1
                                                     and train.max_eval_batches != -1):
    raise ConfigError('train.max_eval_batches must be a positive integer or -1 (all), got '
                      f'{train.max_eval_batches!r}.')
  try:
    model_config = models.resolve_model_config(config.model)
    models.resolve_layer_attentions(config.attention, model_config['num_layers'])
    optimization.check_optimizer_config(config.optimizer)
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


def variant_name(config: ml_collections.ConfigDict) -> str:
  """The attention variant of a config, with its layer overrides: 'local', 'local+3:full'."""
  name = config.attention.get('name', 'full')
  overrides = config.attention.get('layer_overrides', '')
  return f'{name}+{overrides}' if overrides else name


def format_results(results: Mapping[str, Any], workdir: str | None = None) -> str:
  """One line: the test metric of the best validation checkpoint and which step that was."""
  if results.get('kind') == 'lm':
    test = f'test bits per byte {results["test/bits_per_byte"]:.4f}'
    val = f'validation bits per byte {results["validation/bits_per_byte"]:.4f}'
  else:
    test = f'test accuracy {results["test/accuracy"]:.4f}'
    val = f'validation accuracy {results["validation/accuracy"]:.4f}'
  where = f' -- {workdir}' if workdir else ''
  return (f'{results.get("task", "?")}/{results.get("variant", "?")}: {test} (best validation '
          f'checkpoint: step {results["best_step"]} of {results.get("steps", "?")}, {val}){where}')


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in `workdir/config.json`."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir!r} is not a training workdir (no {CONFIG_FILE}).')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


# -- model and steps -------------------------------------------------------------------------------


def build_model(config: ml_collections.ConfigDict, task: Any, components: Components) -> nnx.Module:
  """The model of `config` for `task`, initialised from config.seed. ConfigError on bad options.

  The initialisation runs as one jitted program: op-by-op it would compile every initializer
  separately, which costs seconds on CPU.
  """
  impl = config.get('rng_impl', 'threefry2x32')
  keys = jax.random.split(jax.random.key(config.seed, impl=impl), 3)

  def create(keys):
    rngs = nnx.Rngs(params=keys[0], dropout=keys[1], attention=keys[2])
    return components.create_model(config.model, config.attention, kind=task.kind,
                                   vocab_size=task.vocab_size, num_classes=task.num_classes,
                                   max_length=task.max_length, rngs=rngs)

  try:
    return nnx.jit(create)(keys)
  except (ValueError, TypeError) as e:
    raise ConfigError(f'model/attention config: {e}') from e


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    lr_schedule: Callable[[jax.Array], jax.Array], kind: str):
  """(state, batch) -> (state, metrics): one AdamW update; metrics hold device scalars."""

  def loss_fn(params, rngs, other, batch):
    model = ts.merge_model(graphdef, {'params': params, 'rngs': rngs, 'other': other})
    logits = model(batch['inputs'], batch['mask'], train=True)
    sums = objectives.batch_sums(kind, logits, batch)
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
    return new_state, {'loss': loss, 'grad_norm': optax.tree.norm(grads),
                       'learning_rate': lr_schedule(state['step']), **sums}

  return step


def make_eval_step(graphdef: nnx.GraphDef, kind: str):
  """(model_state, batch) -> sums; deterministic (train=False: no dropout, fixed attention keys)."""

  def step(model_state, batch):
    model = ts.merge_model(graphdef, model_state)
    logits = model(batch['inputs'], batch['mask'], train=False)
    return objectives.batch_sums(kind, logits, batch)

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


class _SigtermFlag:
  """Turns SIGTERM into a flag the loop polls (only the main thread may install handlers)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False

  def poll(self) -> bool:
    """Whether any process got SIGTERM (all processes must stop at the same step to save)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    flags = multihost_utils.process_allgather(np.array(self.requested))
    return bool(np.any(flags))


def _write_json(path: str, obj: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _save_config(config: ml_collections.ConfigDict, workdir: str, *, resuming: bool) -> None:
  path = os.path.join(workdir, CONFIG_FILE)
  new = json.loads(config.to_json_best_effort())
  if resuming and os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != new:
      # Legitimate (e.g. more steps), but the data order and schedule may no longer match the
      # checkpoint's, so say so; config.json then describes the resumed run.
      logging.warning('Resuming %s with a config that differs from its config.json.', workdir)
  _write_json(path, new)


def _prefixed(prefix: str, values: Mapping[str, float]) -> dict[str, float]:
  return {f'{prefix}/{k}': v for k, v in values.items() if k != 'count'}


class _TrainLog:
  """Per-step device metrics waiting to be read; reading them checks the loss for NaN/inf.

  Reading waits for the device, so the time between two timed flushes is the time of the steps in
  between; `restart_clock` leaves out what is not training (compilation, evaluation, saving).
  """

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self.pending: list[tuple[int, dict[str, jax.Array]]] = []
    self.restart_clock()

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self.pending.append((step, metrics))
    self.clock_steps += 1

  def restart_clock(self) -> None:
    self.clock_start = time.perf_counter()
    self.clock_steps = 0

  def flush(self, *, timed: bool) -> dict[str, float] | None:
    """Reads pending metrics (NonFiniteLossError on a bad loss); their summary, or None if none."""
    if not self.pending:
      return None
    steps = [s for s, _ in self.pending]
    host = jax.device_get([m for _, m in self.pending])
    self.pending = []
    for step, m in zip(steps, host):
      if not np.isfinite(m['loss']):
        raise NonFiniteLossError(step, float(m['loss']))
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
    'steps_per_sec' and 'tokens_per_sec', 'peak_memory_bytes' (None where the device does not say),
    'task', 'variant', 'selection_metric'.

  Raises:
    ConfigError: an invalid config (before any work).
    NonFiniteLossError: the training loss became NaN/inf.
    TrainingInterrupted: SIGTERM arrived; a checkpoint was saved first.
  """
  # Multi-process runs (JAX_NUM_PROCESSES > 1, or a TPU pod slice) join before JAX lists devices.
  sharding.initialize_distributed()
  check_config(config)
  components = components or default_components()
  is_chief = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh.to_dict(), config.get('mesh_axis_types', 'auto'))
  rules = sharding.config_rules(config)
  with (jax.set_mesh(mesh), sharding.use_rules(rules,
                                               sequence_parallel=config.get('sequence_parallel', True)),
        _SigtermFlag() as sigterm):
    return _run(config, workdir, components, mesh, is_chief, sigterm)


def _run(config, workdir, components, mesh, is_chief, sigterm) -> dict[str, Any]:
  """The body of `train_and_evaluate`, under the mesh and the SIGTERM handler."""
  tc = config.train
  total = tc.steps
  task = components.load_task(config.data)
  kind = task.kind
  metric, mode = objectives.selection_metric(kind)

  model = build_model(config, task, components)
  os.makedirs(workdir, exist_ok=True)  # only now: a config error leaves no empty workdir behind
  num_params = int(components.count_params(model))
  graphdef, model_state = ts.split_model(model)
  del model
  tx, lr_schedule = optimization.make_optimizer(config.optimizer, total)
  # One jitted program (op by op, every optimizer-state leaf would compile its own zeros), whose
  # outputs land directly in their shardings.
  init = functools.partial(ts.init_train_state, tx=tx)
  state_shardings = sharding.state_sharding(jax.eval_shape(init, model_state), mesh,
                                            sharding.config_rules(config))
  state = jax.jit(init, out_shardings=state_shardings)(model_state)
  del model_state

  ckpt = checkpointing.Checkpointer(workdir, keep=tc.keep_checkpoints, mode=mode,
                                    async_save=tc.async_checkpointing)
  start = 0
  latest = ckpt.latest_step()
  if latest is not None:
    if latest > total:
      ckpt.close()
      raise ConfigError(f'{workdir} holds a checkpoint of step {latest}, beyond train.steps={total}; '
                        'raise train.steps or use another workdir.')
    state = ckpt.restore_latest(ts.abstract(state))
    start = int(jax.device_get(state['step']))
    logging.info('Resumed from step %d in %s.', start, workdir)
  if is_chief:
    _save_config(config, workdir, resuming=latest is not None)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_chief, resume_step=start)

  train_step = jax.jit(make_train_step(graphdef, tx, lr_schedule, kind), donate_argnums=(0,),
                       out_shardings=(state_shardings, sharding.replicated(mesh)))
  eval_step = jax.jit(make_eval_step(graphdef, kind))
  pindex, pcount = jax.process_index(), jax.process_count()

  def validate(model_state):
    batches = components.eval_batches(task.validation, tc.eval_batch_size, process_index=pindex,
                                      process_count=pcount)
    return evaluate(eval_step, model_state, batches, mesh, kind, tc.max_eval_batches)

  batches = components.train_batches(task.train, tc.batch_size, seed=config.seed, start_step=start,
                                     process_index=pindex, process_count=pcount)
  log = None
  bar = tqdm.tqdm(total=total, initial=start, disable=not (is_chief and tc.progress_bar),
                  desc=f'{config.task}/{variant_name(config)}', unit='step', dynamic_ncols=True)
  try:
    step = start
    while step < total:
      batch = next(batches)
      if log is None:
        tokens = int(np.prod(np.shape(batch['inputs'])[1:])) * tc.batch_size
        log = _TrainLog(tokens)
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
          summary['peak_memory_bytes'] = metrics_lib.peak_memory_bytes()
          writer.write(step, _prefixed('train', summary))
          bar.set_postfix(loss=f'{summary["loss"]:.4f}', acc=f'{summary["accuracy"]:.3f}')
      if step % tc.eval_every == 0 or last:
        log.flush(timed=False)  # never evaluate or save NaN parameters
        val = validate(ts.model_part(state))
        writer.write(step, _prefixed('validation', val))
        logging.info('step %d validation %s', step, val)
        if ckpt.is_improvement(val[metric]):
          ckpt.save_best(step, ts.model_part(state), metric=metric, score=val[metric],
                         metrics=val)
        log.restart_clock()
      if step % tc.checkpoint_every == 0 or last:
        log.flush(timed=False)
        ckpt.save_latest(step, state)
        log.restart_clock()
      # A multi-process run must agree on the stopping step, which costs a collective: ask only at
      # logging steps there.
      if not last and (pcount == 1 or step % tc.log_every == 0) and sigterm.poll():
        log.flush(timed=False)
        ckpt.save_latest(step, state)
        ckpt.wait()
        raise TrainingInterrupted(step)
    ckpt.wait()

    # Test with the best validation checkpoint.
    best_state, record = ckpt.restore_best(ts.abstract(ts.model_part(state)))
    test_batches = components.eval_batches(task.test, tc.eval_batch_size, process_index=pindex,
                                           process_count=pcount)
    test = evaluate(eval_step, best_state, test_batches, mesh, kind)
    writer.write(total, {**_prefixed('test', test), 'test/best_step': record['step']})
    logging.info('test (best validation checkpoint, step %d): %s', record['step'], test)

    history = metrics_lib.read_metrics(workdir) if is_chief else []
    _, sps = metrics_lib.series(history, 'train/steps_per_sec')
    _, tps = metrics_lib.series(history, 'train/tokens_per_sec')
    _, mem = metrics_lib.series(history, 'train/peak_memory_bytes')
    results = {
        'task': config.task, 'kind': kind, 'variant': variant_name(config), 'steps': total,
        'best_step': int(record['step']), 'selection_metric': metric,
        **{f'validation/{k}': v for k, v in record['metrics'].items() if k != 'count'},
        **_prefixed('test', test),
        'num_params': num_params,
        'steps_per_sec': float(np.median(sps)) if sps else None,
        'tokens_per_sec': float(np.median(tps)) if tps else None,
        'peak_memory_bytes': int(max(mem)) if mem else None,
    }
    if is_chief:
      _write_json(os.path.join(workdir, RESULTS_FILE), results)
    return results
  finally:
    bar.close()
    writer.close()
    ckpt.close()


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
