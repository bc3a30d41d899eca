"""Reading the LRA release's Pathfinder images (`lra_release/pathfinder{32,64,128,256}`).

Layout: `<difficulty_dir>/imgs/<n>/sample_<k>.png` with metadata files `<difficulty_dir>/metadata/<n>.npy`
whose rows are `[imgs_subdir, filename, image_index, label, ...]` (text lines, as released, despite
the name, or saved numpy string arrays). The release has no splits; the task module carves them.

The release lists some images that are empty (0-byte files); LRA's own pipeline
(`lra_benchmarks/image/input_pipeline.py`) filters those out. We skip them too, and also images that
are missing or cannot be decoded, and log one warning with the counts.
"""
from __future__ import annotations

import math
import os

from absl import logging
import numpy as np

# The LRA release's folder for each difficulty (geometry.DIFFICULTIES).
LRA_DIFFICULTY_DIRS = {'easy': 'curv_baseline', 'intermediate': 'curv_contour_length_9',
                       'hard': 'curv_contour_length_14'}


def _read_metadata(path: str) -> list[list[str]]:
  """Rows of one LRA metadata file: text lines of space-separated fields, or a saved string array.
  """
  with open(path, 'rb') as f:
    raw = f.read()
  if raw.startswith(b'\x93NUMPY'):
    with open(path, 'rb') as f:
      array = np.load(f, allow_pickle=False)
    rows = [[str(v) for v in row] for row in np.atleast_2d(array)]
  else:
    rows = [line.split() for line in raw.decode('utf-8').splitlines() if line.strip()]
  for row in rows:
    if len(row) < 4:
      raise ValueError(f'{path}: metadata rows need >= 4 fields [imgs_subdir, filename, index, '
                       f'label, ...], got {row!r}.')
  return rows


def find_lra_dir(path: str, resolution: int, difficulty: str) -> str:
  """The LRA difficulty folder (holding imgs/ and metadata/) for `path`; ValueError if none."""
  name = LRA_DIFFICULTY_DIRS[difficulty]
  root = os.path.expanduser(path)
  candidates = [root, os.path.join(root, name),
                os.path.join(root, f'pathfinder{resolution}', name),
                os.path.join(root, 'lra_release', f'pathfinder{resolution}', name)]
  for folder in candidates:
    if os.path.isdir(os.path.join(folder, 'metadata')) and os.path.isdir(
        os.path.join(folder, 'imgs')):
      # A difficulty folder named differently from the one asked for is a configuration mistake.
      base = os.path.basename(os.path.normpath(folder))
      if base in LRA_DIFFICULTY_DIRS.values() and base != name:
        raise ValueError(f'{folder} holds {base}, but difficulty {difficulty!r} needs {name}.')
      return folder
  raise ValueError(
      f'No LRA Pathfinder layout found for path={path!r} (resolution {resolution}, difficulty '
      f'{difficulty!r}): expected a folder with metadata/<n>.npy and imgs/<n>/sample_<k>.png among '
      f'{candidates}.')


def read_lra(path: str, resolution: int, difficulty: str) -> tuple[np.ndarray, np.ndarray]:
  """All images and labels of one LRA release difficulty folder, in metadata order.

  Returns:
    images uint8 [N, R, R] and labels int32 [N]. Rows whose image file is missing, empty (0 bytes,
    as some of the release's are) or not a readable image are skipped, with one warning giving the
    counts and the first such file.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top  (only this reader needs Pillow)
  from efficient_attn.data.image import to_grayscale  # pylint: disable=g-import-not-at-top

  folder = find_lra_dir(path, resolution, difficulty)
  meta_dir = os.path.join(folder, 'metadata')
  files = [f for f in os.listdir(meta_dir) if f.endswith('.npy')]
  if not files:
    raise ValueError(f'{meta_dir} holds no metadata .npy files.')
  # Numeric order (0, 1, 2, ..., 10), as the files are named by batch number.
  files.sort(key=lambda f: (int(f[:-4]) if f[:-4].isdigit() else math.inf, f))
  images, labels = [], []
  skipped = {'missing': 0, 'empty (0 bytes)': 0, 'unreadable': 0}
  first_skipped = None
  listed = 0
  for name in files:
    for row in _read_metadata(os.path.join(meta_dir, name)):
      listed += 1
      image_path = os.path.join(folder, row[0], row[1])
      reason = None
      if not os.path.exists(image_path):
        reason = 'missing'
      elif os.path.getsize(image_path) == 0:
        reason = 'empty (0 bytes)'
      else:
        try:
          with Image.open(image_path) as img:
            # The release's PNGs are 8-bit grayscale, read as they are (LRA: decode_png); another
            # mode is made grayscale as Image does (LRA would have fed its channels unchanged).
            pixels = to_grayscale(img)
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for a corrupt file
          reason = 'unreadable'
          error = f'{type(e).__name__}: {e}'
      if reason is not None:
        skipped[reason] += 1
        if first_skipped is None:
          detail = f' ({error})' if reason == 'unreadable' else ''
          first_skipped = f'{image_path}, {reason}{detail}'
        continue
      if pixels.shape != (resolution, resolution):
        raise ValueError(f'{image_path} is {pixels.shape}, expected ({resolution}, {resolution}).')
      label = int(float(row[3]))
      if label not in (0, 1):
        raise ValueError(f'{name}: label must be 0 or 1, got {row[3]!r}.')
      images.append(pixels)
      labels.append(label)
  if first_skipped is not None:
    counts = ', '.join(f'{n} {reason}' for reason, n in skipped.items() if n)
    logging.warning('Pathfinder: skipped %d of the %d images listed in %s: %s; the first: %s.',
                    sum(skipped.values()), listed, meta_dir, counts, first_skipped)
  if not images:
    raise ValueError(f'No images found under {folder}.')
  return np.stack(images), np.asarray(labels, np.int32)
