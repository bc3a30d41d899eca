r"""Every attention variant on every task, one run after another, then one table of the results.

  python -m efficient_attn.sweep --tasks=listops,pathfinder,lm --variants=all --protocol=quick
  python -m efficient_attn.sweep --tasks=listops --variants=full,local,bigbird --protocol=lra \
      --workdir=runs/sweep-lra --set train.eval_every=100
  python -m efficient_attn.sweep --tasks=listops,pathfinder --variants=all --protocol=lra \
      --print_commands > sweep.txt    # one line per run, then the table's line (job arrays)

Each run is `train.py --config=configs/<task>.py:attention=<variant>[,quick|,tiny]
--workdir=<sweep dir>/<task>/<variant>` in its own subprocess (protocols: `lra` is the task's
default config, the published LRA setup; `quick` and `tiny` are the config arguments of those
names), with every `--set key=value` passed on as `--config.key=value`. A run that has finished (its
results.json holds the configured number of steps) is skipped without starting a process; an
interrupted one is resumed by the trainer from its workdir; a failed one (non-zero exit) is recorded
with its exit code and the sweep goes on. The sweep's exit code: 0 when every run finished, 1 when
any failed, 2 for a bad command line (one line, before any run starts), 128 + the signal number
when SIGTERM or SIGINT stopped it (the running child is stopped with SIGTERM first and saves a
checkpoint; launch the same command again to go on).

The child dies with the sweep however the sweep dies: it runs in the sweep's process group (Ctrl-C
and `kill -- -<pgid>` reach both), a SIGTERM or SIGINT to the sweep is forwarded to it, and on Linux
the kernel sends it SIGTERM when the sweep itself is killed (PR_SET_PDEATHSIG), even by SIGKILL. A
relaunched sweep waits for such a child to release its workdir lock before it resumes the run.

At the end (and with --table_only, from whatever the workdirs hold) it writes to --out:
  results.md          the variants x tasks table of the test metric (the test split evaluated with
                      the best validation checkpoint, as train_lib records it), LRA's published
                      number beside ours where LRA has that model (efficient_attn/lra_reference.py),
                      then one row per run with steps/s, tokens/s and peak memory
                      (efficient_attn/compare.py's table)
  results_heatmap.png the same test metrics as a heat map, coloured per task column (best bright)
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags

from efficient_attn import cli

PROTOCOLS = ('quick', 'lra', 'tiny')
PRETRAIN_MODES = ('off', 'also', 'only')
PRETRAIN_SUFFIX = '+pretrain'  # the row (and workdir) of a pretrained run: '<variant>+pretrain'
# The config argument each protocol adds to `attention=<variant>` ('' = the task's default config).
PROTOCOL_ARGS = {'quick': 'quick', 'lra': '', 'tiny': 'tiny'}
# The tasks whose data need no download (generated, or Python's own standard library): the default.
DEFAULT_TASKS = 'listops,pathfinder,lm'
TABLE_FILE = 'results.md'
HEATMAP_FILE = 'results_heatmap.png'
STATUS_DIR = 'status'  # <sweep dir>/status/<task>.<variant>.json: the exit code of a failed run
RESULTS_FILE = 'results.json'  # = train_lib.RESULTS_FILE (not imported: it pulls in the trainer)
LOCK_FILE = 'train.lock'  # = train_lib.LOCK_FILE
LOCK_WAIT_S = 300.0  # how long a relaunch waits for a dying child of the previous sweep
ACCURACY_HEADING = '## Test metric (best validation checkpoint)'
RUNS_HEADING = '## Runs'
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

_TASKS = flags.DEFINE_string('tasks', DEFAULT_TASKS,
                             'Comma list of tasks (configs/<task>.py), or "all".')
_VARIANTS = flags.DEFINE_string(
    'variants', 'all', 'Comma list of attention variants, or "all" (every registered one).')
_PROTOCOL = flags.DEFINE_string(
    'protocol', 'quick', 'quick (CPU-sized configs), lra (the published LRA setup: each task\'s '
    'default config) or tiny (seconds per run, for smoke tests).')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, f'Sweep directory; run <task>/<variant> goes to <workdir>/<task>/<variant> '
    f'(default: ${cli.RUNS_ENV}/sweep-<protocol>, or {cli.DEFAULT_RUNS_DIR}/sweep-<protocol>).')
_OUT = flags.DEFINE_string('out', None, f'Where {TABLE_FILE} and {HEATMAP_FILE} go (default: the '
                           'sweep directory).')
_SET = flags.DEFINE_multi_string('set', [], 'key=value: a config override for every run, passed '
                                 'as --config.key=value (repeatable), e.g. --set train.steps=100.')
_PRINT_COMMANDS = flags.DEFINE_bool(
    'print_commands', False, 'Print one shell line per run (in order, leaving out the runs that '
    'are not applicable; usable with a job array, e.g. `sed -n ${SLURM_ARRAY_TASK_ID}p`) and a last '
    'line that writes the table; run nothing.')
_PRETRAIN = flags.DEFINE_enum(
    'pretrain', 'off', PRETRAIN_MODES, 'Self-pretraining (the config argument `pretrain`: half the '
    'steps pretrain on the task\'s inputs, half fine-tune; README "Self-pretraining"): off, also '
    '(every variant twice, from scratch and pretrained, as rows <variant> and '
    '<variant>+pretrain) or only (pretrained runs only).')
_TABLE_ONLY = flags.DEFINE_bool('table_only', False,
                                'Write the table from what the workdirs hold; launch nothing.')


class UsageError(ValueError):
  """A bad sweep command line: one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of the sweep: `task` trained with `variant` under `protocol` in `workdir`."""

  index: int  # 1-based position in the sweep
  task: str
  variant: str
  protocol: str
  workdir: str  # absolute
  config_file: str  # absolute path of configs/<task>.py
  overrides: tuple[str, ...]  # '--config.key=value' each
  pretrain: bool = False  # self-pretraining then fine-tuning (config argument `pretrain`)
  # Why the task cannot train this variant at all (e.g. 'no causal form' for the lm task), found
  # from its config before the sweep starts; such a run is never launched. '' = it can.
  not_applicable: str = ''

  @property
  def label(self) -> str:
    """The table row: the variant, with PRETRAIN_SUFFIX for a pretrained run."""
    return self.variant + (PRETRAIN_SUFFIX if self.pretrain else '')

  @property
  def name(self) -> str:
    return f'{self.task}/{self.label}'

  @property
  def config_spec(self) -> str:
    args = (f'attention={self.variant}', PROTOCOL_ARGS[self.protocol],
            'pretrain' if self.pretrain else '')
    return f'{self.config_file}:{",".join(a for a in args if a)}'

  def command(self) -> list[str]:
    """The training command of this run (train.py next to the package, else the installed one)."""
    return [*_train_command(), f'--config={self.config_spec}', f'--workdir={self.workdir}',
            *self.overrides]


def _train_command() -> list[str]:
  """`python <repo>/train.py` in a source tree, else `python -m train` (installed beside the
  package, see efficient_attn/entry_points.py)."""
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'train.py')
  return [sys.executable, script] if os.path.isfile(script) else [sys.executable, '-m', 'train']


def _configs_dir() -> str:
  import configs  # pylint: disable=import-outside-toplevel  (a docstring-only package: cheap)
  return os.path.dirname(os.path.abspath(configs.__file__))


def available_tasks() -> tuple[str, ...]:
  """The registered data tasks that have a config file, in registration order."""
  from efficient_attn import data  # pylint: disable=import-outside-toplevel
  folder = _configs_dir()
  return tuple(t for t in data.task_names() if os.path.isfile(os.path.join(folder, f'{t}.py')))


def parse_names(value: str, valid: Sequence[str], what: str, flag: str) -> list[str]:
  """'all' -> every valid name; else the comma list, each checked. UsageError naming the first
  unknown one and the valid names."""
  if value.strip() == 'all':
    return list(valid)
  names = [n.strip() for n in value.split(',') if n.strip()]
  if not names:
    raise UsageError(f'--{flag} is empty; give a comma list of {what}s or "all" (valid: '
                     f'{", ".join(valid)}).')
  for name in names:
    if name not in valid:
      raise UsageError(f'--{flag}: unknown {what} {name!r}; valid {what}s: {", ".join(valid)} '
                       '(or "all").')
  if len(set(names)) != len(names):
    raise UsageError(f'--{flag} names a {what} twice: {value!r}.')
  return names


def parse_overrides(values: Sequence[str]) -> tuple[str, ...]:
  """['train.steps=3'] -> ('--config.train.steps=3',); UsageError for an item without key=value."""
  out = []
  for item in values:
    key, eq, value = item.partition('=')
    key = key.strip()
    if not eq or not key or key.startswith('-'):
      raise UsageError(f'--set {item!r}: write key=value with a config field path as the key, '
                       'e.g. --set train.steps=100.')
    out.append(f'--config.{key}={value}')
  return tuple(out)


def default_sweep_dir(protocol: str) -> str:
  return os.path.join(os.path.expanduser(os.environ.get(cli.RUNS_ENV) or cli.DEFAULT_RUNS_DIR),
                      f'sweep-{protocol}')


def plan(tasks: Sequence[str], variants: Sequence[str], protocol: str, sweep_dir: str,
         overrides: Sequence[str] = (), pretrain: str = 'off') -> list[Run]:
  """The runs of the sweep, task by task, each task's variants in the order given (with
  pretrain='also', each variant's scratch run first, then its pretrained run)."""
  if protocol not in PROTOCOLS:
    raise UsageError(f'--protocol: unknown protocol {protocol!r}; valid protocols: '
                     f'{", ".join(PROTOCOLS)}.')
  if pretrain not in PRETRAIN_MODES:
    raise UsageError(f'--pretrain: unknown mode {pretrain!r}; valid modes: '
                     f'{", ".join(PRETRAIN_MODES)}.')
  arms = {'off': (False,), 'also': (False, True), 'only': (True,)}[pretrain]
  sweep_dir = os.path.abspath(sweep_dir)
  folder = _configs_dir()
  runs = []
  for task in tasks:
    for variant in variants:
      for pretrained in arms:
        run = Run(index=len(runs) + 1, task=task, variant=variant, protocol=protocol, workdir='',
                  config_file=os.path.join(folder, f'{task}.py'), overrides=tuple(overrides),
                  pretrain=pretrained)
        runs.append(dataclasses.replace(run, workdir=os.path.join(sweep_dir, task, run.label)))
  return runs


def resolve_config(run: Run):
  """The config train.py will build for `run` (its config file, argument and overrides): raises
  ValueError (one line via cli.one_line_error) for a bad override, before anything is launched."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  argv = [f'--config={run.config_spec}', *run.overrides]
  cli.check_config_args(argv, run.config_spec)  # misspelt fields: named, with suggestions
  values = flags.FlagValues()
  full_argv = ['sweep', *argv]
  config_flags.DEFINE_config_file('config', None, flag_values=values, lock_config=True,
                                  sys_argv=full_argv)
  values(full_argv)
  return values.config


def not_applicable(config) -> str:
  """Why the task of `config` cannot train its attention at all, or '' if it can: the lm task's
  model attends causally in every layer, so a variant without a causal form (linformer, nystrom)
  has no lm run; the table shows 'n/a (no causal form)' there rather than a failed run."""
  from efficient_attn import models  # pylint: disable=import-outside-toplevel
  attentions = models.resolve_layer_attentions(config.attention, config.model.num_layers)
  if config.task == 'lm' and not all(a.supports_causal for a in attentions):
    return 'no causal form'
  return ''


# -- the state of a run ----------------------------------------------------------------------------


def status_path(sweep_dir: str, run: Run) -> str:
  return os.path.join(sweep_dir, STATUS_DIR, f'{run.task}.{run.variant}.json')


@dataclasses.dataclass
class RunState:
  """What a run's workdir says: 'finished' (with results), 'failed' (with the exit code of the
  sweep's last attempt), 'unfinished' (started, not done) or 'not run'; or 'not applicable' (the
  task cannot train the variant: Run.not_applicable says why)."""

  state: str
  results: dict[str, Any] | None = None
  exit_code: int | None = None


def run_state(run: Run, steps: int, sweep_dir: str) -> RunState:
  """The state of `run`, whose config trains `steps` steps (train_lib's rule for a finished run:
  results.json for the same train.steps); 'not applicable' for a run the task cannot train."""
  if run.not_applicable:
    return RunState('not applicable')
  results = cli.read_json(os.path.join(run.workdir, RESULTS_FILE))
  if isinstance(results, dict) and results.get('steps') == steps:
    return RunState('finished', results=results)
  status = cli.read_json(status_path(sweep_dir, run))
  if isinstance(status, dict) and status.get('exit_code'):
    return RunState('failed', exit_code=int(status['exit_code']))
  if os.path.exists(os.path.join(run.workdir, 'config.json')):
    return RunState('unfinished')
  return RunState('not run')


def _write_status(sweep_dir: str, run: Run, exit_code: int) -> None:
  path = status_path(sweep_dir, run)
  if exit_code == 0:
    if os.path.exists(path):
      os.remove(path)
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump({'exit_code': exit_code, 'command': shlex.join(run.command())}, f, indent=1)
  os.replace(tmp, path)


def _wait_for_workdir(workdir: str, timeout: float = LOCK_WAIT_S) -> None:
  """Returns once no process holds workdir/train.lock (e.g. the child of a killed sweep that is
  still saving its checkpoint), or after `timeout` seconds (the run then reports the lock)."""
  path = os.path.join(workdir, LOCK_FILE)
  if not os.path.exists(path):
    return
  deadline = time.monotonic() + timeout
  told = False
  with open(path, 'a+') as lock:
    while True:
      try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(lock, fcntl.LOCK_UN)
        return
      except BlockingIOError:
        if time.monotonic() > deadline:
          return
        if not told:
          _say(f'waiting for the process holding {path} to end')
          told = True
        time.sleep(0.2)
      except OSError:
        return  # no flock on this filesystem: nothing to wait for


# -- launching -------------------------------------------------------------------------------------


def _die_with_parent(parent_pid: int):
  """A preexec_fn: the child gets SIGTERM when the sweep dies (Linux; elsewhere a no-op)."""

  def setup():
    if not sys.platform.startswith('linux'):
      return
    import ctypes  # pylint: disable=import-outside-toplevel
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
      return
    if os.getppid() != parent_pid:  # the sweep died before prctl took effect
      os.kill(os.getpid(), signal.SIGTERM)

  return setup


class _Stop:
  """SIGTERM and SIGINT while the sweep runs: remembered, and passed to the running child as
  SIGTERM (which saves a checkpoint and exits 143). A child that got the Ctrl-C itself (same process
  group) ignores the extra SIGTERM, so one Ctrl-C never becomes the trainer's 'exit at once'."""

  def __init__(self):
    self.signum: int | None = None
    self.child: subprocess.Popen | None = None
    self._previous = {}

  def __enter__(self):
    for signum in (signal.SIGTERM, signal.SIGINT):
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.signum = self.signum or signum
    child = self.child
    if child is not None and child.poll() is None:
      try:
        child.send_signal(signal.SIGTERM)
      except ProcessLookupError:
        pass

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    return False


def _say(message: str) -> None:
  print(f'[sweep] {message}', flush=True)


def launch(run: Run, stop: _Stop) -> int:
  """Runs `run` in a subprocess (output inherited) and returns its exit code."""
  # pylint: disable-next=subprocess-popen-preexec-fn  (only prctl and getppid run in it)
  child = subprocess.Popen(run.command(), preexec_fn=_die_with_parent(os.getpid()))
  stop.child = child
  _say(f'run {run.index}: pid {child.pid}')
  try:
    return child.wait()
  finally:
    stop.child = None


def run_sweep(runs: Sequence[Run], steps: Mapping[str, int], sweep_dir: str) -> tuple[int, int]:
  """Runs every unfinished run in order. Returns (number of failed runs, signal that stopped the
  sweep or 0)."""
  failed = 0
  total = len(runs)
  with _Stop() as stop:
    for run in runs:
      head = f'run {run.index} of {total}: {run.name}'
      if run.not_applicable:
        _say(f'{head}: not applicable ({run.not_applicable}), skipped')
        continue
      if run_state(run, steps[run.name], sweep_dir).state == 'finished':
        _say(f'{head}: finished earlier, skipped')
        continue
      _wait_for_workdir(run.workdir)
      if run_state(run, steps[run.name], sweep_dir).state == 'finished':
        _say(f'{head}: finished by another process, skipped')
        continue
      _say(f'{head} -> {run.workdir}')
      started = time.monotonic()
      code = launch(run, stop)
      if stop.signum is not None:
        _say(f'{head}: stopped by {signal.Signals(stop.signum).name} (exit code {code}); launch '
             'the same command again to resume')
        return failed, stop.signum
      _write_status(sweep_dir, run, code)
      if code == 0:
        _say(f'{head}: done in {time.monotonic() - started:.1f} s')
      else:
        failed += 1
        _say(f'{head}: FAILED with exit code {code}; going on with the next run')
  return failed, 0


# -- the table -------------------------------------------------------------------------------------


def _metric(task: str) -> str:
  return 'bits_per_byte' if task == 'lm' else 'accuracy'


@dataclasses.dataclass
class Cell:
  """One (task, variant) entry: our test metric (accuracy in %, or bits per byte) or why none."""

  value: float | None
  text: str  # what the table shows: '37.25', 'failed (exit 3)', 'unfinished', 'not run'
  lra: float | None  # LRA Table 1's accuracy (%), where LRA has the model and the task


def table_cells(runs: Sequence[Run], states: Mapping[str, RunState]) -> dict[str, Cell]:
  """{run name: Cell}."""
  from efficient_attn import lra_reference  # pylint: disable=import-outside-toplevel
  cells = {}
  for run in runs:
    st = states[run.name]
    lra = lra_reference.published_accuracy(run.variant, run.task)
    if st.state == 'finished':
      raw = st.results.get(f'test/{_metric(run.task)}')
      value = None if raw is None else (float(raw) if run.task == 'lm' else 100 * float(raw))
      text = 'n/a' if value is None else (f'{value:.4f}' if run.task == 'lm' else f'{value:.2f}')
      cells[run.name] = Cell(value, text, lra)
    elif st.state == 'failed':
      cells[run.name] = Cell(None, f'failed (exit {st.exit_code})', lra)
    elif st.state == 'not applicable':
      cells[run.name] = Cell(None, f'n/a ({run.not_applicable})', lra)
    else:
      cells[run.name] = Cell(None, st.state, lra)
  return cells


def _ordered(runs: Sequence[Run]) -> tuple[list[str], list[str]]:
  tasks = list(dict.fromkeys(r.task for r in runs))
  rows = list(dict.fromkeys(r.label for r in runs))
  return tasks, rows


def accuracy_table(runs: Sequence[Run], cells: Mapping[str, Cell]) -> str:
  """Markdown: one row per variant; per task our test metric and, for LRA tasks, LRA's number."""
  tasks, variants = _ordered(runs)
  header, rule = ['variant'], ['---']
  for task in tasks:
    if task == 'lm':
      header.append('lm: bits/byte (lower is better)')
      rule.append('---:')
    else:
      header += [f'{task}: accuracy %', 'LRA']
      rule += ['---:', '---:']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(rule) + '|']
  for variant in variants:
    row = [f'`{variant}`']
    for task in tasks:
      cell = cells.get(f'{task}/{variant}')
      row.append(cell.text if cell else '')
      if task != 'lm':
        row.append('' if cell is None or cell.lra is None else f'{cell.lra:.2f}')
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines) + '\n'


def results_markdown(runs: Sequence[Run], cells: Mapping[str, Cell],
                     states: Mapping[str, RunState]) -> str:
  """The whole results.md: the accuracy table, its legend, and compare.py's per-run table."""
  from efficient_attn import compare  # pylint: disable=import-outside-toplevel
  protocol = runs[0].protocol if runs else '?'
  overrides = ' '.join(runs[0].overrides) if runs and runs[0].overrides else 'none'
  inapplicable = [r for r in runs if r.not_applicable]
  started = [r for r in runs
             if not r.not_applicable and os.path.exists(os.path.join(r.workdir, 'config.json'))]
  notes = {r.workdir: cells[r.name].text for r in started if states[r.name].state != 'finished'}
  per_run = compare.markdown_table([compare.load_run(r.workdir) for r in started], notes=notes)
  return '\n'.join([
      f'# Sweep: protocol `{protocol}`, {len(runs) - len(inapplicable)} runs'
      + (f' ({len(inapplicable)} more not applicable)' if inapplicable else ''),
      '',
      f'Config overrides: {overrides}. Written by `python -m efficient_attn.sweep`.',
      '',
      ACCURACY_HEADING,
      '',
      'Test split, evaluated with the best validation checkpoint of each run. LRA: the published '
      'test accuracy of the same model (Tay et al., ICLR 2021, Table 1; `full` and `chunked` '
      'against the Transformer, `local` and `block_local` against Local Attention, `fixed` '
      'against the Sparse Transformer, whose LRA implementation uses the fixed pattern, `lsh` '
      'against the Reformer); blank where LRA has no such model.',
      '',
      accuracy_table(runs, cells),
      RUNS_HEADING,
      '',
      'Median steps/s and tokens/s over the run\'s logging intervals (compile excluded); peak '
      'device memory, or the process\'s peak resident memory where the device reports none '
      '(CPU, marked "host").',
      '',
      per_run,
  ])


def heatmap_figure(runs: Sequence[Run], cells: Mapping[str, Cell]):
  """A matplotlib Figure: variants x tasks, each cell our test metric (and LRA's), coloured per task
  column from its worst (dark) to its best (bright) finished run; bits per byte: lower is better."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  tasks, variants = _ordered(runs)
  score = np.full((len(variants), len(tasks)), np.nan)
  for j, task in enumerate(tasks):
    values = {i: cells[f'{task}/{v}'].value for i, v in enumerate(variants)
              if f'{task}/{v}' in cells and cells[f'{task}/{v}'].value is not None}
    if not values:
      continue
    lo, hi = min(values.values()), max(values.values())
    for i, value in values.items():
      s = (value - lo) / (hi - lo) if hi > lo else 0.5
      score[i, j] = 1.0 - s if task == 'lm' else s
  fig, ax = plt.subplots(figsize=(max(7.0, 2.2 + 2.2 * len(tasks)), 1.8 + 0.45 * len(variants)))
  cmap = matplotlib.colormaps['viridis'].with_extremes(bad='0.85')  # grey: no result
  ax.imshow(np.ma.masked_invalid(score), cmap=cmap, vmin=0.0, vmax=1.0, aspect='auto')
  for i, variant in enumerate(variants):
    for j, task in enumerate(tasks):
      cell = cells.get(f'{task}/{variant}')
      if cell is None:
        continue
      text = cell.text if cell.value is not None else cell.text.replace(' (', '\n(')
      if cell.lra is not None:
        text += f' (LRA {cell.lra:.1f})'
      dark = not math.isnan(score[i, j]) and score[i, j] < 0.6
      ax.text(j, i, text, ha='center', va='center', fontsize=7,
              color='white' if dark else 'black')
  ax.set_xticks(range(len(tasks)),
                [f'{t}\nbits/byte (lower is better)' if t == 'lm' else f'{t}\ntest accuracy %'
                 for t in tasks])
  ax.set_yticks(range(len(variants)), variants)
  ax.set_xlabel('task (colour per column: bright = best of the column)')
  ax.set_ylabel('attention variant')
  ax.set_title(f'Test metric at the best validation checkpoint ({runs[0].protocol} protocol)'
               if runs else 'Test metric', fontsize=10)
  fig.tight_layout()
  return fig


def write_table(runs: Sequence[Run], steps: Mapping[str, int], sweep_dir: str,
                out_dir: str) -> tuple[str, str]:
  """Writes out_dir/results.md and out_dir/results_heatmap.png; returns their paths."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  states = {r.name: run_state(r, steps[r.name], sweep_dir) for r in runs}
  cells = table_cells(runs, states)
  os.makedirs(out_dir, exist_ok=True)
  table = os.path.join(out_dir, TABLE_FILE)
  with open(table, 'w') as f:
    f.write(results_markdown(runs, cells, states))
  heatmap = os.path.join(out_dir, HEATMAP_FILE)
  fig = heatmap_figure(runs, cells)
  fig.savefig(heatmap, dpi=120)
  plt.close(fig)
  return table, heatmap


# -- the command line ------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise UsageError(f'unexpected arguments: {" ".join(argv[1:])} (flags are --tasks, --variants, '
                     '--protocol, --workdir, --out, --set, --pretrain, --print_commands, '
                     '--table_only).')
  import efficient_attn  # pylint: disable=import-outside-toplevel
  try:  # the sweep process never computes: keep it off the accelerators its children need
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update('jax_platforms', 'cpu')
  except Exception:  # pylint: disable=broad-except
    pass
  tasks = parse_names(_TASKS.value, available_tasks(), 'task', 'tasks')
  variants = parse_names(_VARIANTS.value, efficient_attn.ATTENTION_NAMES, 'variant', 'variants')
  protocol = _PROTOCOL.value
  overrides = parse_overrides(_SET.value)
  sweep_dir = os.path.abspath(_WORKDIR.value or default_sweep_dir(protocol))
  out_dir = os.path.abspath(_OUT.value) if _OUT.value else sweep_dir
  runs = plan(tasks, variants, protocol, sweep_dir, overrides, _PRETRAIN.value)
  steps = {}
  for i, run in enumerate(runs):  # every config and override checked before anything starts
    try:
      config = resolve_config(run)
      runs[i] = dataclasses.replace(run, not_applicable=not_applicable(config))
    except Exception as e:  # pylint: disable=broad-except  (config files raise anything)
      raise UsageError(f'{run.name}: {cli.one_line_error(e)}') from e
    steps[run.name] = config.train.steps
  if _PRINT_COMMANDS.value:
    for run in runs:
      if not run.not_applicable:
        print(shlex.join(run.command()))
    table = [sys.executable, '-m', 'efficient_attn.sweep', f'--tasks={",".join(tasks)}',
             f'--variants={",".join(variants)}', f'--protocol={protocol}',
             f'--workdir={sweep_dir}', f'--out={out_dir}', f'--pretrain={_PRETRAIN.value}',
             *[f'--set={s}' for s in _SET.value],
             '--table_only']
    line = shlex.join(table)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if _train_command()[1:2] != ['-m']:  # a source tree: the package imports from its root
      line = f'cd {shlex.quote(root)} && {line}'
    print(line)
    return cli.EXIT_OK
  failed, signum = (0, 0) if _TABLE_ONLY.value else run_sweep(runs, steps, sweep_dir)
  if signum:
    return cli.interrupted_exit_code(signum)
  table, heatmap = write_table(runs, steps, sweep_dir, out_dir)
  with open(table) as f:
    print(f.read(), end='')
  _say(f'wrote {table} and {heatmap}')
  if failed:
    _say(f'{failed} of {len(runs)} runs failed')
    return cli.EXIT_ERROR
  return cli.EXIT_OK


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'Error: {cli.one_line_error(e)}', file=sys.stderr)
    sys.exit(cli.EXIT_USAGE)


def _main(argv):
  try:
    sys.exit(main(argv))
  except UsageError as e:
    print(f'Error: {e}', file=sys.stderr)
    sys.exit(cli.EXIT_USAGE)


def run_cli() -> None:
  cli.quiet_library_logs()
  app.run(_main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run_cli()
