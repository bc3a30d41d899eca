"""Where raw data comes from: local copies or the Hugging Face Hub, with one clear error when neither.

A task first looks at `data_config.path`, then at its default local folder under `data_config.cache_dir`
(so a copy dropped there is picked up with no config change), and only then at the Hub. Without network
the Hub raises connection errors from deep inside `datasets`; those become a `DataUnavailableError`
whose message says where to put the files and the exact command that fetches them.
"""
from __future__ import annotations

import contextlib
import glob
import os
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


class DataUnavailableError(FileNotFoundError):
  """A task's data is neither on disk nor downloadable; the message says how to provide it."""


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
  """Loads `splits` of `hf_name` through `datasets.load_dataset`, turning failures into one error."""
  import datasets  # pylint: disable=g-import-not-at-top
  try:
    loaded = datasets.load_dataset(hf_name, hf_config)
  except _FETCH_ERRORS as e:
    raise DataUnavailableError(
        f'{task}: could not load {hf_name!r} from the Hugging Face Hub '
        f'({type(e).__name__}: {e}). {hint}') from e
  missing = [s for s in splits if s not in loaded]
  if missing:
    raise ValueError(f'{task}: {hf_name!r} has splits {sorted(loaded)}, missing {missing}.')
  return {s: loaded[s] for s in splits}


def load_splits(*, task: str, hf_name: str, path: str | None, cache_dir: str,
                splits: tuple[str, ...], extra_hint: str = '') -> dict[str, Any]:
  """{split: datasets.Dataset} from `path`, else `<cache_dir>/<hf_name>`, else the Hub."""
  local = default_local_dir(cache_dir, hf_name)
  hint = (f'On a machine with network access run\n  {save_to_disk_command(hf_name, local)}\n'
          f'and copy the folder to {os.path.abspath(local)} here (picked up automatically), or set '
          f'config.data.path to a save_to_disk folder or a folder of '
          f'{"/".join(splits)}*.parquet or *.csv files{extra_hint}.')
  if path:
    return load_local_splits(path, splits, task=task, hint=hint, cache_dir=cache_dir)
  if os.path.isdir(local):
    return load_local_splits(local, splits, task=task, hint=hint, cache_dir=cache_dir)
  return load_hub_splits(hf_name, splits, task=task, hint=hint)
