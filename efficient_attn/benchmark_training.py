r"""Training speed and memory of every attention variant on LRA Text: LRA's Table 2 on this machine.

  python -m efficient_attn.benchmark_training                  # 1K, 2K, 4K; every variant
  python -m efficient_attn.benchmark_training --lengths 1024 --variants full,local,bigbird --steps 3
  python -m efficient_attn.benchmark_training --render bench_train/results.json  # re-render

Tay et al., "Long Range Arena" (ICLR 2021), Table 2 gives the training steps per second and the peak
memory per device of each model on byte-level Text at 1K-4K tokens, as ratios to the vanilla
Transformer. This command measures the same for our models:

  * the model is the LRA Text model of configs/text.py (4 layers, emb 256, 4 heads, MLP 1024, CLS
    pooling, dropout 0.1; `--model quick|tiny` for smaller ones), float32 by default;
  * model, optimizer, initial state and jitted, state-donating train step come from
    `train_lib.setup_training`, the code `train_and_evaluate` trains with (same mesh, sharding
    rules and RNG streams: variants that draw random numbers get the trainer's 'attention' stream);
  * inputs are random byte ids (1..256) of length n, every position real, and random labels (the
    content does not change the speed); the model prepends its CLS token, so attention runs over
    n + 1 positions, exactly as in training with `data.max_length = n`;
  * every variant runs with the options it trains with by default (`--options default`: what
    `configs/text.py:attention=<variant>` gives; the LRA paper also timed each model in its own
    setup) or with the presets of `efficient_attn.benchmark` (`--options preset`: about `--keys`
    keys per query for every sparse variant, the like-for-like setting);
  * each (variant, length) runs in its own Python process, so its peak resident memory (ru_maxrss)
    is its own; the resident memory after the imports and the backend start, before anything is
    built, is reported as the process baseline. The train step is compiled once
    (`lower(...).compile()`), its XLA memory analysis read, then it runs `--warmup` untimed and
    `--steps` timed steps (every batch placed on the mesh as the trainer places it).

Reported per (variant, length): steps/s and its ratio to `full`; the compiled memory of the train
step (XLA's memory analysis: arguments + outputs + temporaries, minus the outputs that reuse donated
argument buffers; deterministic, and the memory figure comparable across machines) and its ratio to
`full`; the measured peak memory (device peak bytes in use where the device reports them, e.g. a
GPU; else the process's peak resident memory) and its ratio to `full`. `full` is always run (it is
the baseline). A run that fails (out of memory, an invalid option at that length, a crash) is
reported as failed with its one-line reason; the others go on. Written to `--out`: results.json
(every figure and setting), table.md and plot.png (steps/s and compiled memory against length).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import efficient_attn as ea

MODELS = ('text', 'quick', 'tiny')  # configs/text.py: the LRA model, its 'quick' and 'tiny' sizes
OPTIONS = ('default', 'preset')
DTYPES = ('float32', 'bfloat16')
BASELINE = 'full'
RESULTS_FILE = 'results.json'
TABLE_FILE = 'table.md'
PLOT_FILE = 'plot.png'
MIN_LENGTH = 2  # the Text data config's minimum max_length
EXIT_USAGE = 2
# A run past this is reported as failed and the next one starts (the slowest run measured here, full
# at 4K on 2 CPU cores, takes a minute or two; the Performer hang of an older version never ended).
DEFAULT_RUN_TIMEOUT_S = 3600.0


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One (variant, length) measurement; JSON-able, handed to the worker process."""

  variant: str
  length: int
  batch_size: int
  steps: int
  warmup: int
  model: str
  options: str
  keys: int
  dtype: str
  memory_budget_gb: float


# -- command line ----------------------------------------------------------------------------------


def _parse_ints(text: str, flag: str, minimum: int) -> list[int]:
  items = [x.strip() for x in text.split(',') if x.strip()]
  try:
    values = [int(x) for x in items]
  except ValueError:
    raise ValueError(f'{flag} takes comma-separated integers >= {minimum} (e.g. {flag} '
                     f'1024,2048,4096), got {text!r}.') from None
  if not values or min(values) < minimum:
    raise ValueError(f'{flag} takes comma-separated integers >= {minimum} (e.g. {flag} '
                     f'1024,2048,4096), got {text!r}.')
  return list(dict.fromkeys(values))


def parse_variants(text: str) -> list[str]:
  """'all' or a comma list of registered names -> names, `full` first (the baseline). ValueError
  naming the unknown ones."""
  names = list(ea.ATTENTION_NAMES)
  if text.strip() == 'all':
    chosen = names
  else:
    chosen = list(dict.fromkeys(v.strip() for v in text.split(',') if v.strip()))
    unknown = [v for v in chosen if v not in names]
    if unknown or not chosen:
      raise ValueError(f'--variants: unknown variant(s) {", ".join(map(repr, unknown)) or "(none)"}'
                       f'; write "all" or a comma list of {", ".join(names)}.')
  return [BASELINE] + [v for v in chosen if v != BASELINE]


class _OneLineParser(argparse.ArgumentParser):
  """argparse's own errors (a bad choice, `--steps abc`) as one line on stderr and exit code 2."""

  def error(self, message):
    self.exit(EXIT_USAGE, f'error: {message} (see --help)\n')


def build_parser() -> argparse.ArgumentParser:
  parser = _OneLineParser(prog='python -m efficient_attn.benchmark_training',
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--lengths', default='1024,2048,4096',
                      help='comma-separated sequence lengths n (integers >= 2; the input length, '
                           'the model adds its CLS token). Default: 1024,2048,4096')
  parser.add_argument('--variants', default='all',
                      help='"all" or a comma list of ' + ', '.join(ea.ATTENTION_NAMES) +
                           ' (full is always run: it is the baseline). Default: all')
  parser.add_argument('--batch_size', type=int, default=2,
                      help='global batch size (split over the devices, as in training). Default: 2')
  parser.add_argument('--steps', type=int, default=10,
                      help='timed train steps per run, after the warm-up. Default: 10')
  parser.add_argument('--warmup', type=int, default=2,
                      help='untimed train steps per run after compiling. Default: 2')
  parser.add_argument('--model', default='text', choices=MODELS,
                      help='text: the LRA Text model of configs/text.py (4 layers, emb 256, 4 '
                           'heads, MLP 1024); quick / tiny: that config\'s small sizes (smoke '
                           'checks, tests). Default: text')
  parser.add_argument('--options', default='default', choices=OPTIONS,
                      help='default: each variant\'s own defaults (what it trains with); preset: '
                           'the benchmark presets, about --keys keys per query. Default: default')
  parser.add_argument('--keys', type=int, default=512,
                      help='keys per query of --options preset. Default: 512')
  parser.add_argument('--dtype', default='float32', choices=DTYPES,
                      help='compute dtype (config.model.dtype; parameters stay float32). '
                           'Default: float32')
  parser.add_argument('--memory_budget_gb', type=float, default=0.0,
                      help='report a run whose compiled memory exceeds this many GiB as out of '
                           'reach instead of running it (0: no limit). Default: 0')
  parser.add_argument('--run_timeout_s', type=float, default=DEFAULT_RUN_TIMEOUT_S,
                      help='stop a run that takes longer (reported as failed; 0: no limit), so '
                           'that one hung run cannot hold up the rest. '
                           f'Default: {DEFAULT_RUN_TIMEOUT_S:g}')
  parser.add_argument('--out', default='bench_train',
                      help=f'folder for {RESULTS_FILE}, {TABLE_FILE} and {PLOT_FILE}. '
                           'Default: bench_train')
  parser.add_argument('--render', metavar='JSON',
                      help=f'only re-render the table and plot of a saved {RESULTS_FILE} into '
                           '--out')
  parser.add_argument('--worker', help=argparse.SUPPRESS)  # internal: one run, as JSON
  parser.add_argument('--worker_out', help=argparse.SUPPRESS)
  return parser


def check_args(args: argparse.Namespace) -> tuple[list[int], list[str]]:
  """(lengths, variants) of the command line; ValueError (one line, naming the flag) if invalid."""
  lengths = _parse_ints(args.lengths, '--lengths', MIN_LENGTH)
  variants = parse_variants(args.variants)
  for flag, value, minimum in (('--batch_size', args.batch_size, 1), ('--steps', args.steps, 1),
                               ('--warmup', args.warmup, 0), ('--keys', args.keys, 1)):
    if value < minimum:
      raise ValueError(f'{flag} must be an integer >= {minimum}, got {value}.')
  for flag, value in (('--memory_budget_gb', args.memory_budget_gb),
                      ('--run_timeout_s', args.run_timeout_s)):
    if not value >= 0:
      raise ValueError(f'{flag} must be >= 0 (0: no limit), got {value}.')
  return lengths, variants


# -- one run (in its own process) ------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  return f'{type(error).__name__}: {lines[0][:200] if lines else ""}'.rstrip(': ')


def run_config(spec: RunSpec):
  """The training config of a run: configs/text.py for the variant and model size, at length n."""
  from configs import text  # pylint: disable=import-outside-toplevel
  from efficient_attn import benchmark  # pylint: disable=import-outside-toplevel
  arg = f'attention={spec.variant}' + ('' if spec.model == 'text' else f',{spec.model}')
  config = text.get_config(arg)
  config.data.max_length = spec.length
  config.train.batch_size = spec.batch_size
  config.model.dtype = spec.dtype
  if spec.options == 'preset':
    for key, value in benchmark.preset_options(spec.variant, spec.keys).items():
      config.attention.options[key] = value
  return config


def measure(spec: RunSpec) -> dict[str, Any]:
  """Builds, compiles and times one run in this process; the row of the results (with 'error' if it
  could not be measured). Exceptions of the run itself are turned into 'error'."""
  row: dict[str, Any] = dataclasses.asdict(spec)
  # pylint: disable=import-outside-toplevel,unused-import  (the worker's own: in its baseline)
  import jax
  import numpy as np
  import configs.text
  from efficient_attn import benchmark, sharding, train_lib
  from efficient_attn import metrics as metrics_lib
  from efficient_attn.data import base, text, tokenizers
  from efficient_attn.models import variant_option_defaults
  # pylint: enable=import-outside-toplevel
  row['machine'] = benchmark.machine_name()
  row['jax_version'] = jax.__version__
  row['device_count'] = jax.device_count()
  # Imports done and the backend started, nothing built yet: what every run pays anyway.
  row['baseline_host_bytes'] = metrics_lib.peak_host_memory_bytes()
  try:
    config = run_config(spec)
    set_options = {k: v for k, v in config.attention.options.items() if v is not None}
    row['attention_options'] = {**variant_option_defaults(spec.variant), **set_options}
    row['attention_options'] = {k: list(v) if isinstance(v, tuple) else v
                                for k, v in row['attention_options'].items()}
    train_lib.check_config(config)
    # Only the shapes of the task matter to the model; no data is loaded.
    task = base.TaskData(train=None, validation=None, test=None,
                         vocab_size=tokenizers.byte_vocab_size(config.data.add_cls),
                         num_classes=text.NUM_CLASSES, kind='classify',
                         max_length=config.data.max_length)
    components = train_lib.default_components()
    mesh = sharding.make_mesh(config.mesh.to_dict(), config.get('mesh_axis_types', 'auto'))
    rules = sharding.config_rules(config)
    with jax.set_mesh(mesh), sharding.use_rules(
        rules, sequence_parallel=config.get('sequence_parallel', True)):
      setup = train_lib.setup_training(config, task, components, mesh)
      row['num_params'] = setup.num_params
      state = setup.state
      rng = np.random.default_rng(spec.length)
      shape = (spec.batch_size, spec.length)
      # Two different batches in turn, as fresh host arrays every step like the data iterator's.
      batches = [{'inputs': rng.integers(1, tokenizers.BYTE_VOCAB_SIZE, shape, dtype=np.int32),
                  'mask': np.ones(shape, bool),
                  'labels': rng.integers(0, text.NUM_CLASSES, shape[:1], dtype=np.int32)}
                 for _ in range(2)]
      start = time.perf_counter()
      step = setup.train_step.lower(state, sharding.place_batch(batches[0], mesh)).compile()
      row['compile_s'] = time.perf_counter() - start
      analysis = step.memory_analysis()
      if analysis is not None:
        parts = {k: int(getattr(analysis, f'{k}_size_in_bytes')) for k in
                 ('argument', 'output', 'temp', 'alias', 'generated_code')}
        row.update({f'{k}_bytes': v for k, v in parts.items()})
        row['compiled_bytes'] = (parts['argument'] + parts['output'] + parts['temp']
                                 - parts['alias'])
        if spec.memory_budget_gb and row['compiled_bytes'] > spec.memory_budget_gb * 2**30:
          row['error'] = (f'out of reach: compiled memory {row["compiled_bytes"] / 2**30:.1f} '
                          f'GiB > --memory_budget_gb {spec.memory_budget_gb:g}')
          return row
      metrics = None
      for i in range(spec.warmup):
        state, metrics = step(state, sharding.place_batch(batches[i % 2], mesh))
      jax.block_until_ready((state, metrics))
      start = time.perf_counter()
      for i in range(spec.steps):
        state, metrics = step(state, sharding.place_batch(batches[i % 2], mesh))
      jax.block_until_ready((state, metrics))
      elapsed = time.perf_counter() - start
      row['timed_s'] = elapsed
      row['steps_per_sec'] = spec.steps / elapsed
      row['loss'] = float(jax.device_get(metrics['loss']))
      if not np.isfinite(row['loss']):
        row['error'] = f'non-finite training loss {row["loss"]}'
  except Exception as e:  # noqa: BLE001  (reported as this row's failure; the others go on)
    row['error'] = _one_line(e)
  row['device_peak_bytes'] = metrics_lib.peak_memory_bytes()
  row['host_peak_bytes'] = metrics_lib.peak_host_memory_bytes()
  return row


def _worker(spec_json: str, out_path: str) -> int:
  row = measure(RunSpec(**json.loads(spec_json)))
  with open(out_path, 'w') as f:
    json.dump(row, f)
  return 0


def _repo_root() -> str:
  """The folder holding the efficient_attn package (and `configs`, from a checkout)."""
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_subprocess(spec: RunSpec, timeout_s: float = 0.0) -> dict[str, Any]:
  """`measure(spec)` in a fresh Python process (so ru_maxrss is this run's); a process that dies
  (killed for memory, a crash, past `timeout_s`) gives a row with 'error' saying so."""
  row: dict[str, Any] = dataclasses.asdict(spec)
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (_repo_root(), env.get('PYTHONPATH')) if p)
  with tempfile.TemporaryDirectory(prefix='bench_train_') as tmp:
    out_path = os.path.join(tmp, 'row.json')
    command = [sys.executable, '-m', 'efficient_attn.benchmark_training', '--worker',
               json.dumps(dataclasses.asdict(spec)), '--worker_out', out_path]
    start = time.perf_counter()
    try:
      proc = subprocess.run(command, env=env, capture_output=True, text=True,
                            timeout=timeout_s or None, check=False)
    except subprocess.TimeoutExpired:
      row['error'] = f'timed out after {timeout_s:g} s (--run_timeout_s)'
      return row
    row['wall_s'] = time.perf_counter() - start
    if os.path.exists(out_path):
      with open(out_path) as f:
        row.update(json.load(f))
      return row
  last = [l.strip() for l in (proc.stderr or '').splitlines() if l.strip()]
  if proc.returncode < 0:
    name = signal.Signals(-proc.returncode).name
    why = f'killed by {name}' + (' (out of memory?)' if name == 'SIGKILL' else '')
  else:
    why = f'process exited with code {proc.returncode}'
  row['error'] = why + (f': {last[-1][:200]}' if last else '')
  return row


# -- report ----------------------------------------------------------------------------------------


def _mib(x: float) -> str:
  """Bytes as MiB (3 significant digits below 100 MiB) or, from 10 GiB, GiB."""
  if x >= 10 * 2**30:
    return f'{x / 2**30:.1f} GiB'
  return f'{x / 2**20:.3g} MiB' if x < 100 * 2**20 else f'{x / 2**20:.0f} MiB'


def peak_bytes(row: dict[str, Any]) -> int | None:
  """The measured peak of a row: device peak where reported (GPU/TPU), else host peak RSS."""
  return row.get('device_peak_bytes') or row.get('host_peak_bytes')


def add_ratios(rows: list[dict[str, Any]]) -> None:
  """Adds 'speed_vs_full', 'compiled_vs_full', 'peak_vs_full' to every measured row whose length has
  a measured `full` row."""
  base = {r['length']: r for r in rows if r['variant'] == BASELINE and 'error' not in r}
  for r in rows:
    b = base.get(r['length'])
    if b is None or 'error' in r:
      continue
    r['speed_vs_full'] = r['steps_per_sec'] / b['steps_per_sec']
    if r.get('compiled_bytes') and b.get('compiled_bytes'):
      r['compiled_vs_full'] = r['compiled_bytes'] / b['compiled_bytes']
    if peak_bytes(r) and peak_bytes(b):
      r['peak_vs_full'] = peak_bytes(r) / peak_bytes(b)


def _cell_escape(text: str) -> str:
  return text.replace('|', '\\|')


def markdown_table(rows: list[dict[str, Any]]) -> str:
  """Rows = variants; per length: steps/s, compiled memory and peak memory, each (x full)."""
  lengths = sorted({r['length'] for r in rows})
  variants = list(dict.fromkeys(r['variant'] for r in rows))
  by = {(r['variant'], r['length']): r for r in rows}
  head = (['variant'] + [f'steps/s n={n}' for n in lengths]
          + [f'compiled mem n={n}' for n in lengths] + [f'peak mem n={n}' for n in lengths])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for v in variants:
    speed, compiled, peak = [], [], []
    for n in lengths:
      r = by.get((v, n))
      if r is None:
        speed.append('')
        compiled.append('')
        peak.append('')
      elif 'error' in r:
        speed.append(_cell_escape(f'failed: {r["error"]}'))
        compiled.append(_mib(r['compiled_bytes']) if r.get('compiled_bytes') else '')
        peak.append('')
      else:
        ratio = r.get('speed_vs_full')
        speed.append(f'{r["steps_per_sec"]:.3g}' + (f' ({ratio:.2f}x)' if ratio else ''))
        c = r.get('compiled_bytes')
        compiled.append((_mib(c) if c else 'n/a') + (f' ({r["compiled_vs_full"]:.2f})'
                                                     if r.get('compiled_vs_full') else ''))
        p = peak_bytes(r)
        peak.append((_mib(p) if p else 'n/a') + (f' ({r["peak_vs_full"]:.2f})'
                                                 if r.get('peak_vs_full') else ''))
    lines.append('| ' + ' | '.join([v] + speed + compiled + peak) + ' |')
  return '\n'.join(lines)


def header_lines(results: dict[str, Any]) -> list[str]:
  s = results['settings']
  rows = results['rows']
  peak_kind = ('device peak bytes in use' if any(r.get('device_peak_bytes') for r in rows)
               else 'process peak resident memory (ru_maxrss)')
  baselines = [r['baseline_host_bytes'] for r in rows if r.get('baseline_host_bytes')]
  low, high = (_mib(min(baselines)), _mib(max(baselines))) if baselines else ('', '')
  span = low if low == high else f'{low}-{high}'
  base = f'; process baseline (imports and backend, before building) {span}' if span else ''
  return [
      f'# Training speed and memory on LRA Text ({results["machine"]})',
      '',
      f'Date {results["date"]}; jax {results["jax_version"]}; {results["device_count"]} device(s).',
      f'Command: `{results["command"]}`',
      f'Model: configs/text.py ({s["model"]}), {s["dtype"]}, batch {s["batch_size"]}, '
      f'{s["warmup"]} warm-up + {s["steps"]} timed steps per run; attention options: '
      f'{s["options"]}' + (f' (~{s["keys"]} keys per query)' if s['options'] == 'preset' else '')
      + '.',
      f'Cells: value (ratio to full at the same length). steps/s: higher is faster. compiled mem: '
      f'XLA memory analysis of the train step (arguments + outputs + temporaries - donated). '
      f'peak mem: {peak_kind}{base}.',
  ]


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax_s, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
  for name in dict.fromkeys(r['variant'] for r in rows):
    ok = sorted((r for r in rows if r['variant'] == name and 'error' not in r),
                key=lambda r: r['length'])
    if not ok:
      continue
    style = dict(marker='o', linestyle='--' if name == BASELINE else '-')
    ax_s.plot([r['length'] for r in ok], [r['steps_per_sec'] for r in ok], label=name, **style)
    mem = [r for r in ok if r.get('compiled_bytes')]
    ax_m.plot([r['length'] for r in mem], [r['compiled_bytes'] / 2**20 for r in mem], label=name,
              **style)
  from efficient_attn import benchmark  # pylint: disable=import-outside-toplevel
  benchmark.save_length_plot(fig, ((ax_s, 'training steps/s'),
                                   (ax_m, 'compiled train-step memory (MiB)')), path, title,
                             legend_columns=2)


def write_report(results: dict[str, Any], out: str) -> str:
  """Prints the header and table; writes results.json, table.md and plot.png to `out`. The table."""
  add_ratios(results['rows'])
  text = '\n'.join(header_lines(results)) + '\n\n' + markdown_table(results['rows']) + '\n'
  print(text)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, RESULTS_FILE), 'w') as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(out, TABLE_FILE), 'w') as f:
    f.write(text)
  plot(results['rows'], os.path.join(out, PLOT_FILE),
       f'LRA Text training, {results["machine"]}, jax {results["jax_version"]}, '
       f'batch {results["settings"]["batch_size"]}, {results["settings"]["dtype"]}')
  print(f'wrote {os.path.join(out, RESULTS_FILE)}, {TABLE_FILE} and {PLOT_FILE}')
  return text


def _summary(row: dict[str, Any]) -> str:
  if 'error' in row:
    return f'failed: {row["error"]}'
  p = peak_bytes(row)
  return (f'{row["steps_per_sec"]:.3g} steps/s, compiled '
          f'{_mib(row["compiled_bytes"]) if row.get("compiled_bytes") else "n/a"}, peak '
          f'{_mib(p) if p else "n/a"} (compile {row.get("compile_s", 0):.1f} s)')


def run_benchmark(args: argparse.Namespace, lengths: list[int], variants: list[str],
                  command: str) -> dict[str, Any]:
  """Every (length, variant) in its own process; the results dict (also saved after every run)."""
  import jax  # pylint: disable=import-outside-toplevel  (version only: no backend is started here)
  import tqdm  # pylint: disable=import-outside-toplevel
  specs = [RunSpec(variant=v, length=n, batch_size=args.batch_size, steps=args.steps,
                   warmup=args.warmup, model=args.model, options=args.options, keys=args.keys,
                   dtype=args.dtype, memory_budget_gb=args.memory_budget_gb)
           for n in lengths for v in variants]
  settings = {k: getattr(args, k) for k in ('batch_size', 'steps', 'warmup', 'model', 'options',
                                            'keys', 'dtype', 'memory_budget_gb')}
  settings.update(lengths=lengths, variants=variants)
  results = {'machine': 'unknown (no run started its device)', 'date': str(datetime.date.today()),
             'jax_version': jax.__version__, 'device_count': None, 'command': command,
             'settings': settings, 'rows': []}
  os.makedirs(args.out, exist_ok=True)
  bar = tqdm.tqdm(total=len(specs), desc='benchmark_training', unit='run', dynamic_ncols=True)
  with bar:
    for i, spec in enumerate(specs, 1):
      bar.set_postfix_str(f'{spec.variant} n={spec.length}')
      row = run_in_subprocess(spec, args.run_timeout_s)
      for key in ('machine', 'device_count'):
        if row.get(key) is not None:
          results[key] = row[key]  # the workers' view: this process never starts a backend
      results['rows'].append(row)
      bar.update(1)
      tqdm.tqdm.write(f'run {i} of {len(specs)}: {spec.variant} n={spec.length}: {_summary(row)}')
      with open(os.path.join(args.out, 'partial.json'), 'w') as f:  # kept should a long sweep stop
        json.dump(results, f)
  return results


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit code (2 with one line on stderr for a bad command line)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  if args.worker:
    return _worker(args.worker, args.worker_out)
  if args.render:
    try:
      with open(args.render) as f:
        results = json.load(f)
    except (OSError, ValueError) as e:
      print(f'error: --render {args.render}: cannot read it ({e}); give a {RESULTS_FILE} this '
            'command wrote.', file=sys.stderr)
      return EXIT_USAGE
    write_report(results, args.out)
    return 0
  try:
    lengths, variants = check_args(args)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE
  command = shlex.join(['python', '-m', 'efficient_attn.benchmark_training'] + argv)
  results = run_benchmark(args, lengths, variants, command)
  write_report(results, args.out)
  partial = os.path.join(args.out, 'partial.json')
  if os.path.exists(partial):
    os.remove(partial)
  return 0


if __name__ == '__main__':
  sys.exit(main())
