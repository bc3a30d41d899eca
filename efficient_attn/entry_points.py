"""The console scripts of the installed package: `efficient-attn-train` and `efficient-attn-eval`.

    efficient-attn-train --config configs/listops.py:attention=bigbird --workdir runs/lb
    efficient-attn-eval --workdir runs/lb

Each runs the repository's train.py / eval.py (installed as the top-level modules `train` and
`eval`, next to the `configs` package) exactly as `python train.py ...` does: same flags, same exit
codes. A `--config` path of the form `configs/<task>.py[:arg]` that does not exist relative to the
current directory is read from the installed `configs` package, so the documented commands work from
any directory.
"""
from __future__ import annotations

import os
import runpy
import sys

_CONFIG_PREFIX = 'configs/'


def _installed_config(path: str) -> str:
  """`path` ('configs/listops.py:quick'), or the same file in the installed `configs` package."""
  file, colon, arg = path.partition(':')
  if os.path.exists(file) or not file.startswith(_CONFIG_PREFIX):
    return path
  import configs  # pylint: disable=g-import-not-at-top  (only when a path needs resolving)
  candidate = os.path.join(os.path.dirname(configs.__file__), file[len(_CONFIG_PREFIX):])
  return candidate + colon + arg if os.path.exists(candidate) else path


def resolve_config_args(argv: list[str]) -> list[str]:
  """argv with `--config=PATH` / `--config PATH` resolved by `_installed_config`."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith('--config='):
      out[i] = '--config=' + _installed_config(arg[len('--config='):])
    elif arg == '--config' and i + 1 < len(out):
      out[i + 1] = _installed_config(out[i + 1])
  return out


def _run(module: str) -> None:
  sys.argv = [sys.argv[0], *resolve_config_args(sys.argv[1:])]
  runpy.run_module(module, run_name='__main__', alter_sys=True)


def train() -> None:
  """`efficient-attn-train`: train.py's command line (train one config, test its best checkpoint)."""
  _run('train')


def evaluate() -> None:
  """`efficient-attn-eval`: eval.py's command line (evaluate a run's best checkpoint, or compare)."""
  _run('eval')
