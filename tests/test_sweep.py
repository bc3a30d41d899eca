"""The sweep: kill-and-resume, --print_commands, failed runs, bad names, the table (tiny configs).

Every training run is a subprocess (JAX import and compile each time), so the runs are few and the
independent sweeps run side by side.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from efficient_attn import lra_reference
from efficient_attn import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Long enough that a kill lands inside the third run, short enough for a test: 60 tiny steps with a
# checkpoint every 10.
SETS = ['train.steps=60', 'train.checkpoint_every=10', 'train.eval_every=20', 'train.log_every=5',
        'train.progress_bar=false']
VARIANTS = ['full', 'local', 'linear']


def _env(tmp_path):
  return dict(os.environ, JAX_PLATFORMS='cpu', EFFICIENT_ATTN_CACHE=str(tmp_path / 'cache'))


def _sweep(tmp_path, workdir, *args, variants=VARIANTS, sets=SETS, log=None):
  argv = [sys.executable, '-m', 'efficient_attn.sweep', '--tasks=listops',
          f'--variants={",".join(variants)}', '--protocol=tiny', f'--workdir={workdir}',
          *[f'--set={s}' for s in sets], *args]
  out = open(log, 'w') if log else subprocess.PIPE  # pylint: disable=consider-using-with
  return subprocess.Popen(argv, cwd=REPO, env=_env(tmp_path), stdout=out,
                          stderr=subprocess.STDOUT, text=True)


def _alive(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'  # a zombie has ended
  except FileNotFoundError:
    return False


def _records(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().splitlines()
  records = []
  for line in lines:
    try:
      records.append(json.loads(line))
    except ValueError:
      pass  # a line being written
  return records


def _train_records(workdir):
  return [r for r in _records(workdir) if 'train/loss' in r]


def _snapshot(workdir):
  out = {}
  for name in ('metrics.jsonl', 'results.json', 'config.json'):
    path = os.path.join(workdir, name)
    with open(path, 'rb') as f:
      out[name] = (f.read(), os.stat(path).st_mtime_ns)
  return out


def _section(markdown, heading):
  """The table lines of `markdown` under `heading`, up to the next heading."""
  lines = markdown.split(heading, 1)[1].splitlines()[1:]
  end = next((i for i, line in enumerate(lines) if line.startswith('#')), len(lines))
  return [line for line in lines[:end] if line.startswith('|')]


def test_sweep_killed_in_its_third_run_resumes_without_redoing_the_first_two(tmp_path):
  reference_dir, killed_dir = tmp_path / 'reference', tmp_path / 'killed'
  log = tmp_path / 'killed.log'
  killed = _sweep(tmp_path, killed_dir, log=log)
  # The uninterrupted reference, the way a job array runs it: line 3 of --print_commands (the
  # third run alone, side by side with the sweep), then the table line once all runs are there.
  printed = _sweep(tmp_path, reference_dir, '--print_commands')
  lines = printed.communicate(timeout=120)[0].strip().splitlines()
  assert printed.returncode == 0 and len(lines) == len(VARIANTS) + 1, lines
  reference = subprocess.Popen(lines[2], shell=True, cwd=tmp_path, env=_env(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  third = killed_dir / 'listops' / VARIANTS[2]
  deadline = time.monotonic() + 240
  # Kill once the third run has trained past its step-20 record (two checkpoints written).
  while not any(r['step'] >= 20 for r in _train_records(third)):
    assert killed.poll() is None, log.read_text()[-3000:]
    assert time.monotonic() < deadline, log.read_text()[-3000:]
    time.sleep(0.05)
  os.kill(killed.pid, signal.SIGKILL)  # no handler runs: the child must still die with it
  killed.wait()
  text = log.read_text()
  child = int(text.rsplit('[sweep] run 3: pid ', 1)[1].split()[0])
  while _alive(child):
    assert time.monotonic() < deadline, 'the child outlived the killed sweep'
    time.sleep(0.1)
  assert not (third / 'results.json').exists(), 'the kill did not land inside the third run'
  first_two = {v: _snapshot(killed_dir / 'listops' / v) for v in VARIANTS[:2]}

  relaunch = _sweep(tmp_path, killed_dir)
  out, _ = relaunch.communicate(timeout=300)
  assert relaunch.returncode == 0, out[-8000:]
  for i, variant in enumerate(VARIANTS[:2], start=1):
    assert f'run {i} of 3: listops/{variant}: finished earlier, skipped' in out
    assert _snapshot(killed_dir / 'listops' / variant) == first_two[variant]  # untouched
  assert 'run 3 of 3: listops/linear -> ' in out
  assert 'Resumed from step' in out  # from its checkpoint, not from scratch
  assert out.count('[sweep] run 3: pid ') == 1  # only the third run was launched again

  ref_out, _ = reference.communicate(timeout=300)
  assert reference.returncode == 0, ref_out[-3000:]
  for variant in VARIANTS[:2]:  # never interrupted in either sweep
    shutil.copytree(killed_dir / 'listops' / variant, reference_dir / 'listops' / variant)
  table = subprocess.run(lines[3], shell=True, cwd=tmp_path, env=_env(tmp_path), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
  assert table.returncode == 0, table.stdout[-3000:]
  tables = [(d / sweep.TABLE_FILE).read_text() for d in (reference_dir, killed_dir)]
  accuracy = [_section(t, sweep.ACCURACY_HEADING) for t in tables]
  assert accuracy[0] == accuracy[1] and len(accuracy[0]) == 2 + len(VARIANTS)
  assert all('unfinished' not in row and 'failed' not in row for row in accuracy[0])
  a, b = (json.loads((d / 'listops' / VARIANTS[2] / 'results.json').read_text())
          for d in (reference_dir, killed_dir))
  for key in ('test/accuracy', 'test/loss', 'validation/accuracy', 'best_step', 'steps'):
    assert a[key] == b[key], key
  # Every validation the resumed run logged is the uninterrupted run's (the train records may
  # differ in where their averaging intervals start: SIGTERM flushes the pending ones).
  validations = [[r for r in _records(d / 'listops' / VARIANTS[2]) if 'validation/loss' in r]
                 for d in (reference_dir, killed_dir)]
  assert validations[0] == validations[1] and len(validations[0]) == 3
  assert (killed_dir / sweep.HEATMAP_FILE).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_print_commands_failed_runs_and_bad_names(tmp_path):
  workdir = tmp_path / 'sweep'
  # Runs that fail in the trainer (batch size 0 passes the sweep's config build, not train.py).
  failing = _sweep(tmp_path, tmp_path / 'failing', variants=['full', 'local'],
                   sets=['train.batch_size=0'])
  printed = _sweep(tmp_path, workdir, '--print_commands', variants=['full', 'bigbird'],
                   sets=['train.steps=3'])
  unknown = _sweep(tmp_path, workdir, variants=['full', 'nope'])
  bad_set = _sweep(tmp_path, workdir, variants=['full'], sets=['train.stpes=3'])

  out, _ = printed.communicate(timeout=120)
  assert printed.returncode == 0, out
  lines = out.strip().splitlines()
  assert len(lines) == 3, out
  for line, variant in zip(lines, ['full', 'bigbird']):
    argv = shlex.split(line)
    assert argv[1] == os.path.join(REPO, 'train.py')
    assert f'--config={REPO}/configs/listops.py:attention={variant},tiny' in argv
    assert f'--workdir={workdir}/listops/{variant}' in argv
    assert '--config.train.steps=3' in argv
  assert lines[2].startswith(f'cd {REPO} && ') and lines[2].endswith('--table_only')
  assert '--set=train.steps=3' in lines[2]
  assert not workdir.exists()  # nothing ran

  for proc, needle in ((unknown, "--variants: unknown variant 'nope'; valid variants: full"),
                       (bad_set, "unknown config field 'stpes' in config.train")):
    out, _ = proc.communicate(timeout=120)
    lines = [line for line in out.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], out

  out, _ = failing.communicate(timeout=300)
  assert failing.returncode == 1, out[-3000:]
  assert 'run 1 of 2: listops/full: FAILED with exit code 2; going on' in out
  assert 'run 2 of 2: listops/local: FAILED with exit code 2' in out
  rows = _section((tmp_path / 'failing' / sweep.TABLE_FILE).read_text(), sweep.ACCURACY_HEADING)
  assert rows[2:] == ['| `full` | failed (exit 2) | 36.37 |',
                      '| `local` | failed (exit 2) | 15.82 |']


def _fake_run(run, steps, accuracy):
  os.makedirs(run.workdir)
  config = {'task': run.task, 'attention': {'name': run.variant}}
  with open(os.path.join(run.workdir, 'config.json'), 'w') as f:
    json.dump(config, f)
  if accuracy is not None:
    with open(os.path.join(run.workdir, 'results.json'), 'w') as f:
      json.dump({'steps': steps, 'task': run.task, 'kind': 'classify', 'test/accuracy': accuracy,
                 'best_step': steps, 'steps_per_sec': 2.5, 'peak_memory_bytes': None,
                 'host_memory_bytes': 3 * 2**20, 'num_params': 10}, f)


def test_table_states_lra_numbers_and_heatmap(tmp_path):
  runs = sweep.plan(['listops', 'pathfinder'], ['full', 'fixed', 'dilated'], 'lra', str(tmp_path))
  by = {r.name: r for r in runs}
  _fake_run(by['listops/full'], 5000, 0.375)
  _fake_run(by['listops/fixed'], 5000, 0.25)
  _fake_run(by['listops/dilated'], 4000, 0.5)  # results of another step count: not finished
  _fake_run(by['pathfinder/full'], 62400, None)  # started, no result
  os.makedirs(tmp_path / sweep.STATUS_DIR)
  with open(sweep.status_path(str(tmp_path), by['pathfinder/fixed']), 'w') as f:
    json.dump({'exit_code': 3}, f)
  steps = {'listops/' + v: 5000 for v in ('full', 'fixed', 'dilated')}
  steps.update({'pathfinder/' + v: 62400 for v in ('full', 'fixed', 'dilated')})
  table, heatmap = sweep.write_table(runs, steps, str(tmp_path), str(tmp_path / 'out'))
  markdown = open(table).read()
  assert _section(markdown, sweep.ACCURACY_HEADING)[2:] == [
      '| `full` | 37.50 | 36.37 | unfinished | 71.40 |',
      '| `fixed` | 25.00 | 17.07 | failed (exit 3) | 71.71 |',  # LRA's Sparse Transformer: fixed
      '| `dilated` | unfinished |  | not run |  |',  # LRA has no dilated model
  ]
  per_run = _section(markdown, sweep.RUNS_HEADING)
  assert any('| full | listops | full | 37.50% |' in r and '3.00 MiB (host)' in r for r in per_run)
  assert any('| full | pathfinder | full | unfinished |' in r for r in per_run)
  with open(heatmap, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_lm_runs_of_variants_without_causal_form_are_not_applicable(tmp_path):
  # Not launched (a launch could only fail), left out of --print_commands, 'n/a' in the table.
  printed = subprocess.run(
      [sys.executable, '-m', 'efficient_attn.sweep', '--tasks=lm,listops',
       '--variants=local,linformer', '--protocol=tiny', f'--workdir={tmp_path}', '--print_commands'],
      cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=120, check=False)
  assert printed.returncode == 0, printed.stderr[-3000:]
  lines = printed.stdout.strip().splitlines()
  assert [shlex.split(line)[2].rsplit(':', 1)[1] for line in lines[:-1]] == [
      'attention=local,tiny', 'attention=local,tiny', 'attention=linformer,tiny'], lines
  assert '/lm/' in lines[0] and '/listops/' in lines[1] and lines[-1].endswith('--table_only')
  runs = sweep.plan(['lm', 'listops'], ['local', 'linformer'], 'tiny', str(tmp_path))
  runs = [dataclasses.replace(r, not_applicable=sweep.not_applicable(sweep.resolve_config(r)))
          for r in runs]
  assert [r.not_applicable for r in runs] == ['', 'no causal form', '', '']
  steps = {r.name: 10 for r in runs}
  assert sweep.run_sweep([runs[1]], steps, str(tmp_path)) == (0, 0)  # skipped, not failed
  assert not (tmp_path / 'lm' / 'linformer').exists()
  table, _ = sweep.write_table(runs, steps, str(tmp_path), str(tmp_path / 'out'))
  markdown = open(table).read()
  assert markdown.startswith('# Sweep: protocol `tiny`, 3 runs (1 more not applicable)\n')
  rows = _section(markdown, sweep.ACCURACY_HEADING)
  assert rows[2:] == ['| `local` | not run | not run | 15.82 |',
                      '| `linformer` | n/a (no causal form) | not run | 35.70 |'], rows


def test_every_lra_model_maps_to_a_registered_variant():
  import efficient_attn as ea  # pylint: disable=g-import-not-at-top
  assert set(lra_reference.LRA_MODEL_OF_VARIANT) <= set(ea.ATTENTION_NAMES)
  assert set(lra_reference.LRA_MODEL_OF_VARIANT.values()) == set(lra_reference.TABLE1_ACCURACY)
  assert lra_reference.published_accuracy('lsh', 'listops') == 37.27
  assert lra_reference.published_accuracy('nystrom', 'listops') is None
  assert lra_reference.published_accuracy('full', 'lm') is None


@pytest.mark.parametrize('value, match', [
    ('nope', "unknown variant 'nope'"), ('', 'is empty'), ('full,full', 'twice')])
def test_parse_names_errors(value, match):
  with pytest.raises(sweep.UsageError, match=match):
    sweep.parse_names(value, ('full', 'local'), 'variant', 'variants')
  assert sweep.parse_names('all', ('full', 'local'), 'variant', 'variants') == ['full', 'local']
  with pytest.raises(sweep.UsageError, match='key=value'):
    sweep.parse_overrides(['train.steps'])


def test_pretrained_rows_commands_and_table(tmp_path):
  runs = sweep.plan(['listops'], ['full', 'local'], 'quick', str(tmp_path), pretrain='also')
  assert [r.name for r in runs] == ['listops/full', 'listops/full+pretrain', 'listops/local',
                                    'listops/local+pretrain']
  scratch, pretrained = runs[0], runs[1]
  assert scratch.config_spec.endswith('listops.py:attention=full,quick')
  assert pretrained.config_spec.endswith('listops.py:attention=full,quick,pretrain')
  assert pretrained.workdir == os.path.join(str(tmp_path), 'listops', 'full+pretrain')
  # The pretrained config splits the scratch run's budget: the same total number of steps.
  pre_config, total = sweep.resolve_config(pretrained), sweep.resolve_config(scratch).train.steps
  assert pre_config.pretrain.steps + pre_config.train.steps == total
  only = sweep.plan(['listops'], ['full'], 'quick', str(tmp_path), pretrain='only')
  assert [r.name for r in only] == ['listops/full+pretrain']
  with pytest.raises(sweep.UsageError, match="--pretrain: unknown mode 'yes'"):
    sweep.plan(['listops'], ['full'], 'quick', str(tmp_path), pretrain='yes')
  for run, accuracy in zip(runs, (0.25, 0.5, 0.125, None)):
    _fake_run(run, 400, accuracy)
  steps = {r.name: 400 for r in runs}
  table, _ = sweep.write_table(runs, steps, str(tmp_path), str(tmp_path / 'out'))
  assert _section(open(table).read(), sweep.ACCURACY_HEADING)[2:] == [
      '| `full` | 25.00 | 36.37 |', '| `full+pretrain` | 50.00 | 36.37 |',
      '| `local` | 12.50 | 15.82 |', '| `local+pretrain` | unfinished | 15.82 |']
