r"""Evaluates a run's best validation checkpoint, or compares runs.

  python eval.py --workdir=runs/listops-full-20250101-120000          # test accuracy (or bits/byte)
  python eval.py --compare runs/listops-full-* runs/listops-local-* --out=comparison/
      # -> comparison/comparison.md (variant, test accuracy, steps/s, tokens/s, peak memory,
      #    parameters) and comparison/validation_curves.png
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags

from efficient_attn import cli
from efficient_attn import compare
from efficient_attn import train_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory to evaluate.')
_SPLIT = flags.DEFINE_enum('split', 'test', ['test', 'validation'], 'Split to evaluate.')
_COMPARE = flags.DEFINE_bool('compare', False,
                             'Compare the run directories given as arguments instead.')
_OUT = flags.DEFINE_string('out', 'comparison', 'Output directory of --compare.')


def parse_flags(argv):
  """absl flag parsing; a bad flag exits with one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'Error: {cli.one_line_error(e)}')


def main(argv):
  if _COMPARE.value:
    if _WORKDIR.value or len(argv) < 2:
      raise app.UsageError('--compare takes run directories as arguments: '
                           'eval.py --compare W1 W2 ... [--out=DIR] (and no --workdir).')
    try:
      table, curves = compare.write_comparison(argv[1:], _OUT.value)
    except FileNotFoundError as e:
      sys.exit(f'Error: {e}')
    with open(table) as f:
      print(f.read(), end='')
    print(f'Wrote {table} and {curves}.')
    return
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])} (did you mean --compare?)')
  if not _WORKDIR.value:
    raise app.UsageError('Give --workdir=<run directory> (or --compare W1 W2 ...).')
  try:
    metrics, record = train_lib.evaluate_workdir(_WORKDIR.value, _SPLIT.value)
  except (FileNotFoundError, train_lib.ConfigError) as e:
    sys.exit(f'Error: {e}')
  if 'bits_per_byte' in metrics:
    value = f'bits per byte {metrics["bits_per_byte"]:.4f}'
  else:
    value = f'accuracy {metrics["accuracy"]:.4f}'
  print(f'{_SPLIT.value} {value} (loss {metrics["loss"]:.4f}, {int(metrics["count"])} examples; '
        f'best validation checkpoint: step {record["step"]}, validation {record["metric"]} '
        f'{record["score"]:.4f})')


if __name__ == '__main__':
  cli.quiet_library_logs()
  app.run(main, flags_parser=parse_flags)
