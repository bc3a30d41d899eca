"""Command-line presentation for train.py and eval.py: one-line errors, exit codes, the default run
directory, the result line. The training logic (train_lib) raises typed errors; this module turns them
into what a terminal or a job scheduler wants to see.

Exit codes of train.py:
  0    finished (or had already finished: its saved result is printed again)
  1    an unexpected error (with its traceback: a bug to report)
  2    a bad command line: config, data or optimizer option, --workdir (not writable, in use by
       another run, or holding no checkpoint that restores); one line on stderr, before any work
  3    training diverged: the loss or the parameters became NaN/inf (nothing of that step is saved)
  4    no space left on the device (disk full) while writing the run
  130  interrupted by SIGINT (Ctrl-C), 143 by SIGTERM: a checkpoint was saved first; launch the same
       command again to resume (a second Ctrl-C exits at once with 130, saving nothing more)
"""
from __future__ import annotations

import datetime
import difflib
import errno
import importlib.util
import json
import logging
import os
import re
import signal
import sys
from typing import Any, Callable, Mapping, Sequence

import ml_collections

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_NO_SPACE = 4
# Where runs go by default: $EFFICIENT_ATTN_RUNS/<task>-<variant>-<time>, else ./runs/...
RUNS_ENV = 'EFFICIENT_ATTN_RUNS'
DEFAULT_RUNS_DIR = 'runs'


def interrupted_exit_code(signum: int) -> int:
  """The shell's convention for a process stopped by a signal: 128 + the signal number."""
  return 128 + int(signum)


def read_json(path: str) -> Any:
  """The JSON value in `path`, or None when the file is missing, unreadable or half-written (a run
  being written as we look at it): the callers treat all of those as "no record yet"."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def one_line_error(error: BaseException) -> str:
  """A readable one-line account of `error` and its causes.

  Flag parsing wraps errors raised inside config files (with their traceback text) in its own
  errors; this returns the outermost message that is a single line ("flag --config.train.steps=abc:
  invalid literal ..."), else the last line of the innermost one (the config file's ValueError).
  """
  chain = []
  while error is not None and len(chain) < 20:
    chain.append(error)
    error = error.__cause__ or error.__context__

  def lines_of(e):
    text = str(e.args[0]) if len(e.args) == 1 else str(e)
    return [line.strip() for line in text.replace('\\n', '\n').splitlines() if line.strip()]

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


# -- the config on the command line ----------------------------------------------------------------


def flag_value(argv: Sequence[str], name: str, default: str | None = None) -> str | None:
  """The value of `--name=value` or `--name value` in argv (the last one wins), else `default`."""
  value = default
  args = list(argv)
  for i, arg in enumerate(args):
    if arg.startswith(f'--{name}='):
      value = arg.split('=', 1)[1]
    elif arg == f'--{name}' and i + 1 < len(args):
      value = args[i + 1]
  return value


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The config of 'path/to/file.py[:arg]': the file's `get_config(arg)` (as config_flags does).
  Raises what the file raises (ValueError for a bad argument), FileNotFoundError for no file."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} does not exist (give --config=path/to/config.py'
                            '[:arg], e.g. --config=configs/listops.py:quick).')
  module_spec = importlib.util.spec_from_file_location('_efficient_attn_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def override_paths(argv: Sequence[str], flag: str = 'config') -> list[str]:
  """The field paths of every `--config.<path>[=value]` (or `--noconfig.<path>`) in argv."""
  paths = []
  for arg in argv:
    for prefix in (f'--{flag}.', f'--no{flag}.'):
      if arg.startswith(prefix):
        paths.append(arg[len(prefix):].split('=', 1)[0])
  return paths


def check_override_path(config: ml_collections.ConfigDict, path: str) -> None:
  """ValueError unless `path` ('train.steps') names a field of `config`; the message suggests the
  closest field names (checked on the config itself, before the flag library applies anything)."""
  node: Any = config
  done = []
  for key in path.split('.'):
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)):
      raise ValueError(f'unknown config field {path!r}: {".".join(done)} is a value '
                       f'({type(node).__name__}), not a section.')
    if key not in node:
      where = f'config.{".".join(done)}' if done else 'the config'
      close = difflib.get_close_matches(key, list(node.keys()), n=3)
      hint = (f'did you mean {" or ".join(repr(c) for c in close)}?' if close
              else f'valid fields: {", ".join(sorted(node.keys()))}')
      raise ValueError(f'unknown config field {key!r} in {where} ({hint})')
    node = node[key]
    done.append(key)


def check_config_args(argv: Sequence[str], default_config: str, flag: str = 'config') -> None:
  """Loads the config that `argv` names (or `default_config`) and checks every override's path.

  Raises the config file's own error (a bad variant or argument) or ValueError for an unknown field,
  so a bad config argument is reported from what it is, not from the flag library's wording.
  """
  config = load_config_file(flag_value(argv, flag, default_config))
  for path in override_paths(argv, flag):
    check_override_path(config, path)


# -- runs ------------------------------------------------------------------------------------------


def default_workdir(config: ml_collections.ConfigDict, variant: str,
                    now: datetime.datetime | None = None) -> str:
  """$EFFICIENT_ATTN_RUNS/<task>-<variant>-<YYYYmmdd-HHMMSS>, or runs/... under the current
  directory when the variable is unset (as documented in README.md)."""
  stamp = (now or datetime.datetime.now()).strftime('%Y%m%d-%H%M%S')
  name = re.sub(r'[^\w.+-]', '-', f'{config.task}-{variant}-{stamp}')  # a safe directory name
  return os.path.join(os.path.expanduser(os.environ.get(RUNS_ENV) or DEFAULT_RUNS_DIR), name)


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


# -- errors ----------------------------------------------------------------------------------------


def _no_space(error: BaseException) -> BaseException | None:
  """The disk-full error in `error`'s chain: an OSError with errno ENOSPC, or (TensorStore, which
  Orbax writes with, reports errno as text) an error carrying the system's ENOSPC message."""
  message = os.strerror(errno.ENOSPC)
  seen = 0
  while error is not None and seen < 20:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return error
    if message in str(error):
      return error
    error = error.__cause__ or error.__context__
    seen += 1
  return None


def exit_status(error: BaseException, workdir: str | None = None) -> tuple[int, str] | None:
  """(exit code, one line for stderr) for an error a command line reports without a traceback;
  None for anything else (a bug: let it raise)."""
  from efficient_attn import train_lib  # pylint: disable=import-outside-toplevel
  resume = f' Resume with the same command (--workdir={workdir}).' if workdir else ''
  if isinstance(error, train_lib.ConfigError):
    return EXIT_USAGE, f'Config error: {one_line_error(error)}'
  if isinstance(error, train_lib.WorkdirError):
    return EXIT_USAGE, f'Workdir error: {one_line_error(error)}'
  if isinstance(error, train_lib.NonFiniteLossError):
    return EXIT_DIVERGED, f'Training diverged: {one_line_error(error)}'
  if isinstance(error, train_lib.TrainingInterrupted):
    return interrupted_exit_code(error.signum), f'{error}{resume}'
  if isinstance(error, KeyboardInterrupt):
    return interrupted_exit_code(signal.SIGINT), 'Interrupted before training started; nothing saved.'
  full = _no_space(error)
  if full is not None:
    where = f' ({full.filename})' if isinstance(full, OSError) and full.filename else ''
    return EXIT_NO_SPACE, (f'No space left on device{where}: free some space or give a --workdir on '
                           'another disk, then launch again (a run resumes from its last complete '
                           'checkpoint).')
  return None


def run_reporting_errors(fn: Callable[[], Any], workdir: str | None = None) -> Any:
  """fn(); an error `exit_status` knows becomes one line on stderr and its exit code."""
  try:
    return fn()
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    status = exit_status(e, workdir)
    if status is None:
      raise
    code, line = status
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)
