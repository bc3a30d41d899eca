r"""Trains one config and tests its best validation checkpoint.

  python train.py                                     # ListOps quick (CPU-sized), runs/<...>
  python train.py --config=configs/listops.py:attention=bigbird --workdir=runs/listops-bigbird
  python train.py --config=configs/text.py:attention=local,quick --config.train.steps=100
  python train.py --config=configs/listops.py:tiny --print_config   # the resolved config, as JSON

Without --workdir a run goes to $EFFICIENT_ATTN_RUNS/<task>-<variant>-<time>, or runs/<...> under the
current directory when that variable is unset; the log's first line names the absolute path.

Launching again with the same --workdir resumes from its latest checkpoint (exactly: same data order,
same random numbers), falling back to an older checkpoint if the newest one is damaged; a finished run
prints its result again. One run at a time per workdir (a second one exits with status 2). SIGTERM and
Ctrl-C save a checkpoint and exit with 143 and 130 (a second Ctrl-C exits at once). Every failure the
user can fix is one line on stderr; the exit codes are listed in efficient_attn/cli.py (2: bad config
or workdir, before any work; 3: NaN/inf loss; 4: disk full).
"""
from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from efficient_attn import cli
from efficient_attn import train_lib

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs',
                              'listops.py') + ':quick'
FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines --config, --workdir and --print_config. config_flags loads the default config (and
  reads overrides from sys.argv) right here, so bad config arguments surface from this call."""
  config_flags.DEFINE_config_file('config', DEFAULT_CONFIG,
                                  'Config file and its argument: path.py[:arg].', lock_config=True)
  flags.DEFINE_string('workdir', None,
                      f'Run directory (default: ${cli.RUNS_ENV}/<task>-<variant>-<time>, or '
                      f'{cli.DEFAULT_RUNS_DIR}/<task>-<variant>-<time> under the current directory).')
  flags.DEFINE_bool('print_config', False,
                    'Print the resolved config (the file, its argument and every --config.* '
                    'override applied) as JSON, and exit without training.')


def config_error(error: BaseException):
  """Exits with status 2 and one line on stderr."""
  print(f'Config error: {cli.one_line_error(error)}', file=sys.stderr)
  sys.exit(cli.EXIT_USAGE)


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
  if FLAGS.print_config:
    print(config.to_json_best_effort(indent=2, sort_keys=True))
    return
  workdir = FLAGS.workdir or cli.default_workdir(config, train_lib.variant_name(config))
  results = cli.run_reporting_errors(lambda: train_lib.train_and_evaluate(config, workdir),
                                     workdir)
  print(cli.format_results(results, workdir))


if __name__ == '__main__':
  cli.quiet_library_logs()
  try:
    # The config file's own errors and misspelt override paths, checked on the config itself before
    # the flag library sees them (its messages are not made for one line).
    cli.check_config_args(sys.argv[1:], DEFAULT_CONFIG)
    define_flags()
  except Exception as e:  # pylint: disable=broad-except
    config_error(e)
  app.run(main, flags_parser=parse_flags)
