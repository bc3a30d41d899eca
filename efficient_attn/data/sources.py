"""Where raw data comes from: local copies or the Hugging Face Hub, with one clear error when neither.

A task first looks at `data_config.path`, then at its default local folder under `data_config.cache_dir`
(so a copy dropped there is picked up with no config change), and only then at the Hub. Before asking
the Hub, a quick connection probe (`hub_unreachable`, a few seconds at most) checks that it can be
reached at all: offline, `datasets` would otherwise retry for ~25 s and log dozens of lines. Every way
of not finding the data raises a `DataUnavailableError` whose message is one line, what to do first:
where to put the files and the exact command that fetches them, then why they were not found.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import os
import socket
import threading
import urllib.parse
from typing import Any, Iterator

# Hub and network failures: ConnectionError, FileNotFoundError and datasets' DatasetNotFoundError are
# OSErrors; recent huggingface_hub versions talk through httpx, whose errors are not.
# RuntimeError: datasets >= 4 refuses script-based Hub datasets (no data to fetch either way).
_FETCH_ERRORS: tuple[type[BaseException], ...] = (OSError, RuntimeError)
try:
  import httpx  # pylint: disable=g-import-not-at-top
  _FETCH_ERRORS += (httpx.HTTPError,)
except ImportError:  # pragma: no cover - httpx ships with huggingface_hub
  pass

_TABLE_SUFFIXES = ('.parquet', '.csv')
_PROBE_TIMEOUT_S = 3.0  # a reachable Hub answers a TCP connect in well under a second
_OFFLINE_VARIABLES = ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE')
_PROXY_VARIABLES = ('HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy', 'ALL_PROXY',
                    'all_proxy')
_TRUE = ('1', 'true', 'yes', 'on')


class DataUnavailableError(FileNotFoundError, ValueError):
  """A task's data is neither on disk nor downloadable. The message is one line: how to provide the
  data first, then why it was not found.

  Both a FileNotFoundError (the files are missing) and a ValueError (the configuration points at no
  data), so command-line tools that turn ValueErrors into exit status 2 and one line handle it too.
  """


def one_line(text: str) -> str:
  """`text` with its line breaks and indentation folded into single spaces."""
  return ' '.join(text.split())


def _hub_host() -> tuple[str, int]:
  try:
    from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
    endpoint = constants.ENDPOINT
  except ImportError:  # pragma: no cover - datasets depends on huggingface_hub
    endpoint = 'https://huggingface.co'
  url = urllib.parse.urlsplit(endpoint)
  return url.hostname or 'huggingface.co', url.port or (80 if url.scheme == 'http' else 443)


@functools.lru_cache(maxsize=None)
def hub_unreachable(timeout_s: float = _PROBE_TIMEOUT_S) -> str | None:
  """None if the Hub looks reachable, else why not (one phrase). Cached for the process.

  Offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) counts as unreachable. Behind a proxy a direct
  connection proves nothing, so the Hub is then assumed reachable and `datasets` decides. Otherwise:
  a TCP connection to the Hub's host (HF_ENDPOINT's) within `timeout_s`; name resolution runs in a
  helper thread, since `getaddrinfo` ignores socket timeouts.
  """
  for name in _OFFLINE_VARIABLES:
    if os.environ.get(name, '').strip().lower() in _TRUE:
      return f'{name} is set'
  if any(os.environ.get(name) for name in _PROXY_VARIABLES):
    return None
  host, port = _hub_host()
  outcome: dict[str, Any] = {}

  def probe():
    try:
      socket.create_connection((host, port), timeout=timeout_s).close()
      outcome['ok'] = True
    except OSError as e:
      outcome['error'] = e

  thread = threading.Thread(target=probe, name='hub-probe', daemon=True)
  thread.start()
  thread.join(timeout_s + 0.5)
  if outcome.get('ok'):
    return None
  error = outcome.get('error')
  return f'cannot connect to {host}:{port} ({error or f"no answer within {timeout_s:g} s"})'


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
  """Silences `datasets` progress bars inside the block (they flood logs), restoring the setting."""
  import datasets  # pylint: disable=g-import-not-at-top
  was_disabled = datasets.is_progress_bar_enabled() is False
  datasets.disable_progress_bars()
  try:
    yield
  finally:
    if not was_disabled:
      datasets.enable_progress_bars()


def column_values(dataset: Any, column: str, *, task: str) -> list[Any]:
  """The Python values of `column` of a datasets.Dataset; ValueError naming the columns if absent."""
  if column not in dataset.column_names:
    raise ValueError(f'{task}: the data has no column {column!r}; its columns are '
                     f'{dataset.column_names}.')
  return list(dataset[column])


def default_local_dir(cache_dir: str, name: str) -> str:
  """The folder under cache_dir where a local copy of `name` ('imdb', 'uoft-cs/cifar10') is looked for."""
  return os.path.join(os.path.expanduser(cache_dir), name.replace('/', '__'))


def save_to_disk_command(hf_name: str, dest: str, hf_config: str | None = None) -> str:
  """The shell command that downloads `hf_name` and saves it where this package looks for it."""
  args = repr(hf_name) + (f', {hf_config!r}' if hf_config else '')
  return (f'python -c "import datasets; datasets.load_dataset({args})'
          f'.save_to_disk({os.path.abspath(dest)!r})"')


def _is_saved_dataset(path: str) -> bool:
  return os.path.isfile(os.path.join(path, 'dataset_dict.json')) or os.path.isfile(
      os.path.join(path, 'state.json'))


def _split_table_files(path: str, split: str) -> list[str]:
  """Parquet/csv files of `split` under `path`: names starting with the split ('train-0000.parquet')."""
  files = []
  for suffix in _TABLE_SUFFIXES:
    files += glob.glob(os.path.join(path, '**', f'{split}*{suffix}'), recursive=True)
  return sorted(files)


def load_local_splits(path: str, splits: tuple[str, ...], *, task: str, hint: str,
                      cache_dir: str | None = None) -> dict[str, Any]:
  """Reads `splits` from a local copy at `path` as {split: datasets.Dataset}.

  `path` is a `save_to_disk` folder of a DatasetDict, or a folder holding `<split>*.parquet` /
  `<split>*.csv` files (searched recursively, as in a Hub snapshot); `datasets` converts those to
  Arrow once, under `<cache_dir>/hf` (or its own default cache if cache_dir is None).
  """
  import datasets  # pylint: disable=g-import-not-at-top  (heavy; only tasks that need it pay)
  path = os.path.expanduser(path)
  if not os.path.isdir(path):
    raise DataUnavailableError(f'{task}: no data at {path!r} (not a folder). {hint}')
  if _is_saved_dataset(path):
    loaded = datasets.load_from_disk(path)
    if not isinstance(loaded, datasets.DatasetDict):
      raise DataUnavailableError(
          f'{task}: {path!r} holds a single Dataset; a DatasetDict with splits '
          f'{", ".join(splits)} is needed (save the whole `load_dataset(...)` result). {hint}')
    missing = [s for s in splits if s not in loaded]
    if missing:
      raise DataUnavailableError(f'{task}: {path!r} has splits {sorted(loaded)}, missing '
                                 f'{missing}. {hint}')
    return {s: loaded[s] for s in splits}
  out = {}
  for split in splits:
    files = _split_table_files(path, split)
    if not files:
      raise DataUnavailableError(
          f'{task}: {path!r} is neither a save_to_disk folder nor holds {split}*.parquet / '
          f'{split}*.csv files. {hint}')
    kinds = {os.path.splitext(f)[1] for f in files}
    if len(kinds) > 1:
      raise ValueError(f'{task}: {path!r} mixes parquet and csv files for split {split!r}: {files}.')
    reader = datasets.Dataset.from_parquet if kinds == {'.parquet'} else datasets.Dataset.from_csv
    out[split] = reader(files, cache_dir=os.path.join(os.path.expanduser(cache_dir), 'hf')
                        if cache_dir else None)
  return out


def load_hub_splits(hf_name: str, splits: tuple[str, ...], *, task: str, hint: str,
                    hf_config: str | None = None) -> dict[str, Any]:
  """Loads `splits` of `hf_name` through `datasets.load_dataset`, turning failures into one error.

  Without a reachable Hub (`hub_unreachable`) it fails at once, without asking `datasets`.
  """
  import datasets  # pylint: disable=g-import-not-at-top
  why = hub_unreachable()
  try:
    if why is not None:
      raise ConnectionError(f'the Hugging Face Hub is unreachable: {why}')
    loaded = datasets.load_dataset(hf_name, hf_config)
  except _FETCH_ERRORS as e:
    raise DataUnavailableError(one_line(
        f'{task}: {hf_name!r} is not on this machine. {hint} (Loading it from the Hugging Face Hub '
        f'failed: {type(e).__name__}: {e})')) from e
  missing = [s for s in splits if s not in loaded]
  if missing:
    raise ValueError(f'{task}: {hf_name!r} has splits {sorted(loaded)}, missing {missing}.')
  return {s: loaded[s] for s in splits}


def load_splits(*, task: str, hf_name: str, path: str | None, cache_dir: str,
                splits: tuple[str, ...], extra_hint: str = '') -> dict[str, Any]:
  """{split: datasets.Dataset} from `path`, else `<cache_dir>/<hf_name>`, else the Hub."""
  local = default_local_dir(cache_dir, hf_name)
  hint = (f'To provide it, run `{save_to_disk_command(hf_name, local)}` on a machine with network '
          f'access and copy the folder to {os.path.abspath(local)} here (picked up automatically), '
          f'or set config.data.path to a save_to_disk folder or a folder of '
          f'{"/".join(splits)}*.parquet or *.csv files{extra_hint}.')
  if path:
    return load_local_splits(path, splits, task=task, hint=hint, cache_dir=cache_dir)
  if os.path.isdir(local):
    return load_local_splits(local, splits, task=task, hint=hint, cache_dir=cache_dir)
  return load_hub_splits(hf_name, splits, task=task, hint=hint)
