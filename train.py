r"""Trains one config and tests its best validation checkpoint.

  python train.py                                     # ListOps quick (CPU-sized), runs/<...>
  python train.py --config=configs/listops.py:attention=bigbird --workdir=runs/listops-bigbird
  python train.py --config=configs/text.py:attention=local,quick --config.train.steps=100

Launching again with the same --workdir resumes from its latest checkpoint (exactly: same data order,
same random numbers). SIGTERM saves a checkpoint and exits with status 143. A bad config (unknown
variant, unknown field, invalid option) exits with status 2 and one line saying what is wrong.
"""
from __future__ import annotations

import datetime
import os
import re
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from efficient_attn import train_lib

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs',
                              'listops.py') + ':quick'
FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines --config and --workdir. config_flags loads the default config (and reads overrides
  from sys.argv) right here, so bad config arguments surface from this call."""
  config_flags.DEFINE_config_file('config', DEFAULT_CONFIG,
                                  'Config file and its argument: path.py[:arg].', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory (default: runs/<task>-<variant>-<timestamp>).')


def config_error(error: BaseException):
  """Exits with status 2 and one line on stderr."""
  print(f'Config error: {train_lib.one_line_error(error)}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  try:
    return FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (config files raise anything)
    config_error(e)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  try:
    config = FLAGS.config
    config.task  # pylint: disable=pointless-statement  (a config that failed to load raises here)
  except Exception as e:  # pylint: disable=broad-except
    config_error(e)
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  variant = re.sub(r'[^\w.+-]', '-', train_lib.variant_name(config))
  workdir = FLAGS.workdir or os.path.join('runs', f'{config.task}-{variant}-{stamp}')
  try:
    results = train_lib.train_and_evaluate(config, workdir)
  except train_lib.ConfigError as e:
    config_error(e)
  except train_lib.TrainingInterrupted as e:
    print(f'{e} Resume with: --workdir={workdir}', file=sys.stderr)
    sys.exit(143)
  print(train_lib.format_results(results, workdir))


if __name__ == '__main__':
  train_lib.quiet_library_logs()
  try:
    define_flags()
  except Exception as e:  # pylint: disable=broad-except
    config_error(e)
  app.run(main, flags_parser=parse_flags)
